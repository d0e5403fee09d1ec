"""GPTQ's Hessian-weighted grid search (``clip_search``): never a worse weighted rounding error per group than the
min/max grid, lower output error on weights with outlier columns, exact through the pipeline."""

from __future__ import annotations

import pytest
import torch
from test_quantize_e2e import logits, quantize
from tiny_models import save_tiny
from transformers import AutoModelForCausalLM

from optimum_mc import MCConfig
from optimum_mc.errors import MCConfigError
from optimum_mc.gptq import gptq_quantize, searched_qparams
from optimum_mc.group_quant import dequantize_codes, dequantize_matrix, group_qparams, quantize_codes


def _weighted_error(w, s, z, bits, cw):
    return ((dequantize_codes(quantize_codes(w, s, z, bits), s, z) - w).pow(2) * cw).sum(-1)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("zero_point", ["float", "int"])
def test_search_never_raises_the_weighted_error(bits, zero_point):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(16, 4, 32, generator=g) * torch.rand(16, 4, 1, generator=g)
    w[:, :, 0] *= 8  # an outlier column per group
    cw = torch.rand(4, 32, generator=g) + 0.01
    base = group_qparams(w, bits, zero_point)
    s, z = searched_qparams(w, bits, zero_point, cw)
    assert torch.equal(torch.stack(searched_qparams(w, bits, zero_point, None)), torch.stack(base))
    got, ref = _weighted_error(w, s, z, bits, cw), _weighted_error(w, *base, bits, cw)
    assert (got <= ref).all()
    if bits in (2, 3):
        assert (got < ref).any()  # the outliers make shrinking pay in some group
    if bits == 1:
        assert torch.equal(s, base[0]) and torch.equal(z, base[1])  # the binary form is kept


@pytest.mark.parametrize("act_order", [True, False])
def test_search_lowers_the_output_error_with_outlier_columns(act_order):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g)
    w[:, :4] *= 6
    x = torch.randn(2048, 256, generator=g) * (torch.rand(256, generator=g) * 3 + 0.1)
    h = 2 * x.t() @ x / x.shape[0]

    def rel_error(clip: bool) -> float:
        q = dequantize_matrix(*gptq_quantize(w, h, 2, 64, act_order=act_order, clip_search=clip), 64)
        return float((x @ (w - q).t()).pow(2).sum() / (x @ w.t()).pow(2).sum())

    assert rel_error(True) < 0.7 * rel_error(False)


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    return save_tiny("mixtral", tmp_path_factory.mktemp("mixtral-clip"))


def test_clip_search_end_to_end(mixtral_dir, tmp_path):
    model = quantize(mixtral_dir, clip_search=True)
    assert model.config.quantization_config.clip_search is True
    model.save_pretrained(tmp_path / "q")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert again.config.quantization_config.clip_search is True
    assert torch.equal(logits(again), logits(model))
    twin = quantize(mixtral_dir, clip_search=True)
    sd, sd2 = model.state_dict(), twin.state_dict()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd if k.endswith((".zeros", ".scales", ".qweight")))
    plain = quantize(mixtral_dir, clip_search=False).state_dict()
    assert any(not torch.equal(sd[k], plain[k]) for k in sd if k.endswith(".scales"))


def test_clip_search_must_be_a_bool():
    with pytest.raises(MCConfigError, match="clip_search"):
        MCConfig(clip_search="yes")
