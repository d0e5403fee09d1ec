"""router_output_positions: which element of a router's output tuple is the logits, the weights and the index."""

import torch

from optimum_mc.architectures import router_output_positions

LOGITS, WEIGHTS, INDEX = torch.randn(5, 8), torch.rand(5, 2), torch.randint(0, 8, (5, 2))


def test_the_usual_order():
    assert router_output_positions((LOGITS, WEIGHTS, INDEX)) == (0, 1, 2)


def test_index_first_order_of_older_routers():
    # GraniteMoe's router before transformers 5.20 returns (index, weights, logits)
    assert router_output_positions((INDEX, WEIGHTS, LOGITS)) == (2, 1, 0)
    assert router_output_positions((INDEX, LOGITS, WEIGHTS)) == (1, 2, 0)


def test_top_k_equal_to_expert_count_keeps_the_usual_float_order():
    index = torch.randint(0, 8, (5, 8))
    assert router_output_positions((index, torch.rand(5, 8), torch.randn(5, 8))) == (1, 2, 0)
    assert router_output_positions((LOGITS, WEIGHTS, INDEX, "extra")) == (0, 1, 2)
