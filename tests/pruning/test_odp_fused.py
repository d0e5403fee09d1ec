"""ODP inside the fused MoE op: the C kernel's routing rule and statistics equal the torch rule's (pruning/rule.py),
and a model whose MCExperts pass ODP to ``optimum_mc::moe`` gives the same logits and statistics as one whose router
hook rewrites the routing."""

from __future__ import annotations

import pytest
import torch
from helpers.moe import quantized_blocks
from tiny_models import tiny_model

from optimum_mc.architectures import moe_blocks
from optimum_mc.kernels import cpu, moe_op
from optimum_mc.pruning import get_odp_stats, reset_odp_stats, set_odp
from optimum_mc.pruning.rule import apply_drop, count_routing, drop_mask


def random_routing(tokens: int, experts: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)])
    w = torch.rand(tokens, k, generator=g).softmax(-1)
    w[0] = 1.0 / k  # a tie: every slot equals the top weight, none is dropped
    return idx, w


@pytest.mark.skipif(cpu.library() is None, reason="C kernels unavailable")
@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.8, 1.0])
def test_c_kernel_rule_and_counts_equal_the_torch_rule(k, threshold):
    experts = next(moe_blocks(quantized_blocks(tiny_model("mixtral")))).experts
    e = experts.num_experts
    for tokens in (1, 5, cpu.GEMV_MAX_ROWS):
        idx, w = random_routing(tokens, e, k, seed=tokens)
        x = torch.randn(tokens, experts.hidden_dim, generator=torch.Generator().manual_seed(tokens))
        counts = torch.zeros(e + 3, dtype=torch.int64)
        with torch.no_grad():
            lists = experts.packed_weights()
            got = moe_op(x, idx, w, *lists, experts.op_bits, "silu", "float", None, None, threshold, counts)
            i2, w2 = idx, w
            if threshold > 0:
                i2, w2 = apply_drop(idx, w, drop_mask(w, threshold), e)
            want = experts(x, i2, w2)
        expect = torch.zeros(e + 3, dtype=torch.int64)
        count_routing(expect, i2, None, e)
        assert torch.equal(got, want)  # same routing reaches the same kernel: bit-identical
        assert torch.equal(counts, expect)
        assert counts[e + 2] == tokens and counts[: e + 1].sum() == tokens * k


def test_count_routing_skips_padding():
    counts = torch.zeros(4 + 3, dtype=torch.int64)
    idx = torch.tensor([[0, 1], [2, 4], [3, 3]])
    count_routing(counts, idx, torch.tensor([True, True, False]), 4)
    assert counts.tolist() == [1, 1, 1, 0, 1, 2, 2]  # slots of experts 0-3, dropped, padding, tokens


@pytest.mark.parametrize("protect", [0.0, 0.5])
def test_model_with_rule_in_experts_equals_rule_in_hook(protect, monkeypatch):
    from optimum_mc.kernels.moe_cpu import DecodePlan

    calls = []
    real = DecodePlan.__call__

    # whether the C kernel got ODP's counters (the rule and counts inside it)
    def spy(self, *a, **kw):
        calls.append(a[4] is not None)
        return real(self, *a, **kw)

    monkeypatch.setattr(DecodePlan, "__call__", spy)
    base = quantized_blocks(tiny_model("mixtral")).eval()
    ids = torch.randint(3, 300, (1, 20), generator=torch.Generator().manual_seed(0))
    results = []
    for delegate in (True, False):
        model = base
        set_odp(model, True, threshold=0.8, protect_ratio=protect, layers=2)
        states = [b.router._mc_odp for b in moe_blocks(model)]
        if not delegate:
            for st, blk in zip(states, moe_blocks(model)):
                st.experts = blk.experts.odp = None  # the router hook's rule, as for float experts
        reset_odp_stats(model)
        with torch.no_grad():
            prefill = model(input_ids=ids).logits
            out = model.generate(ids[:, :6], max_new_tokens=6, min_new_tokens=6, do_sample=False)
        results.append((prefill, out, get_odp_stats(model)))
        # decode steps ran the rule in C (the plan called with threshold and counter) only when handed to the experts
        assert (True in calls) == (delegate and cpu.library() is not None)
        calls.clear()
        set_odp(model, False)
    (p1, o1, s1), (p2, o2, s2) = results
    torch.testing.assert_close(p1, p2, rtol=1e-6, atol=1e-6)
    assert torch.equal(o1, o2)
    assert s1 == s2 and s1["total"]["skipped_fraction"] > 0


def test_decode_plan_follows_replaced_buffers_and_copies():
    import copy

    from optimum_mc.kernels import moe

    experts = next(moe_blocks(quantized_blocks(tiny_model("mixtral")))).experts
    idx, w = random_routing(2, experts.num_experts, 2, seed=3)
    idx[:, 0] = 0
    x = torch.randn(2, experts.hidden_dim, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = experts(x, idx, w)
        clone = copy.deepcopy(experts)  # its plan must point at its own buffers
        lin = experts.packed[0].gate_up
        lin._buffers["qweight"] = torch.flip(lin.qweight, [0]).contiguous()  # a new buffer object, new codes
        after = experts(x, idx, w)
        gu = [(p.gate_up.qweight, p.gate_up.scales, p.gate_up.zeros) for p in experts.packed]
        dn = [(p.down.qweight, p.down.scales, p.down.zeros) for p in experts.packed]
        want = moe(x, idx, w, gu, dn, experts.bits, experts.activation)
        del experts, lin
        copied = clone(x, idx, w)
    assert torch.equal(after, want) and not torch.equal(after, before)
    assert torch.equal(copied, before)
