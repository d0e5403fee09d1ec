"""MCConfig: defaults, JSON round trip, validation errors raised before anything is loaded."""

import json

import pytest

from optimum_mc import MCConfig
from optimum_mc.errors import MCConfigError


def test_defaults_and_json_round_trip():
    cfg = MCConfig(bits=2.5, odp=True, odp_threshold=[0.4, 0.5], dataset=["a b c"])
    assert cfg.quant_method == "mc" and cfg.candidate_bits is None and cfg.attn_bits == 4
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


# --- the lean top level: grouped options (gptq=, allocation_options=, experimental=), flat names as config.json ---


def test_top_level_has_at_most_25_options():
    import inspect

    params = [p for p in inspect.signature(MCConfig.__init__).parameters.values() if p.kind == p.POSITIONAL_OR_KEYWORD]
    assert len(params) - 1 <= 25, [p.name for p in params]  # less self


def test_grouped_options_equal_their_flat_names_and_round_trip():
    from optimum_mc.config import _OMITTED_AT_DEFAULT, ALLOCATION_OPTIONS, EXPERIMENTAL_OPTIONS, GPTQ_OPTIONS

    grouped = MCConfig(
        gptq={"damp_percent": 0.02, "act_order": False},
        allocation_options={"beta": 1.0, "allocation_solver": "dp"},
        experimental={"tune_exponents": True},
        dataset={"name": "me/corpus", "config": "v2", "split": "validation", "text_column": "body"},
    )
    flat = MCConfig(
        damp_percent=0.02, act_order=False, beta=1.0, allocation_solver="dp", tune_exponents=True,
        dataset="me/corpus", dataset_config="v2", dataset_split="validation", text_column="body",
    )  # fmt: skip
    assert grouped.to_dict() == flat.to_dict()
    assert (grouped.damp_percent, grouped.beta, grouped.tune_exponents, grouped.dataset_split) == (
        0.02, 1.0, True, "validation")  # fmt: skip
    assert MCConfig.from_dict(json.loads(grouped.to_json_string())) == grouped
    # the groups' defaults are the attributes' defaults; config.json keeps every option flat, as before
    d = MCConfig().to_dict()
    for group in (GPTQ_OPTIONS, ALLOCATION_OPTIONS, EXPERIMENTAL_OPTIONS):
        for name, default in group.items():
            assert getattr(MCConfig(), name) == default
            assert name in d or name in _OMITTED_AT_DEFAULT  # options left out of config.json at their defaults
    assert not {"gptq", "allocation_options", "experimental"} & set(d)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"experimental": {"damp_percent": 0.1}}, r"unknown experimental option\(s\): damp_percent.*belongs in gptq="),
        ({"gptq": {"dampening": 0.1}}, r"unknown gptq option\(s\): dampening; gptq takes damp_percent"),
        ({"gptq": 0.1}, "gptq must be a dict"),
        ({"gptq": {"damp_percent": 0.1}, "damp_percent": 0.2}, "given twice"),
        ({"dataset": {"name": "me/x", "column": "t"}}, "dataset dict keys must be among"),
        ({"dataset": {"name": "me/x", "split": "a"}, "dataset_split": "b"}, "given twice"),
        ({"experimental": {"tune_exponents": True}, "allocation": "global"}, "tune_exponents=True needs"),
    ],
)
def test_grouped_options_are_checked(kwargs, match):
    with pytest.raises(MCConfigError, match=match):
        MCConfig(**kwargs)


def test_nf4_without_bitsandbytes_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else real(n, *a))
    with pytest.raises(MCConfigError, match=r"optimum-mc\[nf4\]"):
        MCConfig(experimental={"nonexpert_method": "bnb_nf4"})
    MCConfig()  # the default needs no bitsandbytes


@pytest.mark.parametrize(
    "kwargs,experts,want",
    [
        ({}, [8, 8], [1, 2, 3]),  # 2.5 code bits: the paper's candidates
        ({"bits": 2.375}, [8, 8], [2, 3]),
        ({"bits": 2.125}, [8, 8], [2, 3]),  # 17 bits: one expert at 3 (the constraints), the rest at 2
        ({"bits": 2.0}, [8, 8], [1, 2, 3]),  # [2, 3] cannot meet the constraints at exactly 2
        ({"bits": 2.0, "allocation_constraints": False}, [8, 8], [2, 3]),
        ({"bits": 2.125}, [8, 4], [1, 2, 3]),  # a 4-expert layer has 8 bits: [2, 3] needs 9
        ({"bits": 1.75}, [8], [1, 2, 3]),
        ({"bits": 2.375, "bits_budget": "stored"}, [8], [2, 3]),  # 2.125 code bits at group 128
        ({"bits": 2.25, "bits_budget": "stored"}, [8], [1, 2, 3]),  # 2.0 code bits
        ({"bits": 2.75, "bits_budget": "stored"}, [8], [1, 2, 3]),  # 2.5 code bits
    ],
)
def test_default_candidates_leave_1_bit_out_below_2_5_code_bits_where_the_budget_allows(kwargs, experts, want):
    from optimum_mc.budget import check_budget

    cfg = MCConfig(**kwargs)
    assert cfg.candidate_bits is None and cfg.to_dict()["candidate_bits"] is None
    check_budget(cfg, experts, [cfg.code_bits(128, 128)] * len(experts))
    assert cfg.candidate_bits == want
    assert MCConfig.from_dict(cfg.to_dict()).candidate_bits == want  # config.json records the resolved list
    given = MCConfig(candidate_bits=[1, 2, 3], **kwargs)
    check_budget(given, experts, [given.code_bits(128, 128)] * len(experts))
    assert given.candidate_bits == [1, 2, 3]  # an explicit list is kept
