"""MCConfig: defaults, JSON round trip, validation errors raised before anything is loaded."""

import json

import pytest

from optimum_mc import MCConfig
from optimum_mc.errors import MCConfigError


def test_defaults_and_json_round_trip():
    cfg = MCConfig(bits=2.5, odp=True, odp_threshold=[0.4, 0.5], dataset=["a b c"])
    assert cfg.quant_method == "mc" and cfg.candidate_bits == [1, 2, 3] and cfg.attn_bits == 4
    again = MCConfig.from_dict(json.loads(cfg.to_json_string()))
    assert again == cfg and again.to_dict() == cfg.to_dict()


def test_uniform_config():
    cfg = MCConfig(bits=2, candidate_bits=[2])
    assert cfg.is_uniform and not cfg.is_quantized


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"bits": 3.5}, "infeasible"),
        ({"bits": 0.5}, "infeasible"),
        ({"candidate_bits": [5]}, "candidate_bits"),
        ({"candidate_bits": []}, "candidate_bits"),
        ({"candidate_bits": [2, 2]}, "duplicates"),
        ({"attn_bits": 1}, "attn_bits"),
        ({"group_size": 100}, "group_size"),
        ({"allocation": "best"}, "allocation"),
        ({"gamma": -1}, "gamma"),
        ({"nonexpert_method": "awq"}, "nonexpert_method"),
        ({"damp_percent": 0}, "damp_percent"),
        ({"num_samples": 0}, "num_samples"),
        ({"seq_len": 4}, "too short"),
        ({"dataset": []}, "non-empty list"),
        ({"odp_threshold": 1.5}, r"\(0, 1\]"),
        ({"odp_threshold": 0}, r"\(0, 1\]"),
        ({"odp_protect_ratio": -0.1}, r"\[0, 1\]"),
        ({"odp_layers": [-1]}, "odp_layers"),
        ({"not_an_option": 1}, "unknown MCConfig option"),
    ],
)
def test_invalid_options_raise_typed_errors(kwargs, match):
    with pytest.raises(MCConfigError, match=match):
        MCConfig(**kwargs)


def test_error_is_also_a_value_error():
    with pytest.raises(ValueError):
        MCConfig(bits=9)
