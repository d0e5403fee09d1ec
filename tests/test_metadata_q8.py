"""metadata="q8" (issue 23 item 2): compact scales / zeros.

Scales are 8-bit codes times a power of two per 16 rows of a group column, zeros are integer codes at the code width:
``(8.5 + b) / g`` stored bits per weight instead of ``32 / g``. Checked here: the grid and its exact stored form, codes
chosen on the stored grid, error close to fp16 metadata, config refusals, stored-bits accounting, and the checkpoint
(exact, byte-deterministic save / load; fp16 checkpoints unchanged).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from tiny_models import CORPUS, save_tiny
from transformers import AutoModelForCausalLM

import optimum_mc
from optimum_mc.bitwidths import code_bits_for_stored, group_metadata_bits, stored_bits
from optimum_mc.checkpoint import FORMAT_KEY, expert_stored_bits, read_safetensors_metadata
from optimum_mc.errors import CheckpointError, MCConfigError, ShapeError
from optimum_mc.gptq import calibration_free_quantize, gptq_quantize, weight_mse
from optimum_mc.group_quant import (
    Q8_ROWS,
    compact_metadata,
    dequantize_matrix,
    expand_metadata,
    quantize_codes,
    rtn_quantize,
)
from optimum_mc.model_card import build_card
from optimum_mc.nn import QuantLinear
from optimum_mc.packing import unpack
from optimum_mc.tools.inspect_model import load_quant_config, size_breakdown

WIDTHS = (1, 2, 3, 4, 8)


def _weights(rows: int = 37, cols: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # rows of different spread, one all-zero group, one offset group: the grid's edge cases
    w = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g).add(0.05)
    w[3, :128] = 0
    w[5, 128:] += 3.0
    return w


# ------------------------------------------------------------------------------------------ the grid


@pytest.mark.parametrize("bits", WIDTHS)
def test_scales_are_codes_times_a_block_power_of_two(bits):
    w = _weights()
    _, s, z = rtn_quantize(w, bits, 128, "q8")
    assert s.dtype == z.dtype == torch.float16
    for b0 in range(0, w.shape[0], Q8_ROWS):
        blk = s[b0 : b0 + Q8_ROWS].float()
        for col in range(blk.shape[1]):
            m = blk[:, col].max()
            k = int(torch.ceil(torch.log2(m / 255)))
            unit = 2.0**k
            q = blk[:, col] / unit
            assert torch.equal(q, torch.round(q)) and q.min() >= 1 and q.max() <= 255
    if bits == 1:
        assert torch.all(z == 0.5)  # symmetric binary form
    else:
        assert torch.equal(z, torch.round(z)) and z.min() >= 0 and z.max() <= (1 << bits) - 1


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("rows", [16, 37, 128])
def test_compact_form_round_trips_exactly(bits, rows):
    w = _weights(rows)
    _, s, z = rtn_quantize(w, bits, 64, "q8")
    codes, exps, zeros = compact_metadata(s, z, bits)
    assert codes.dtype == torch.uint8 and codes.shape == s.shape
    assert exps.dtype == torch.int8 and exps.shape == (-(-rows // 16), s.shape[1])
    assert zeros.dtype == torch.int32 and zeros.numel() == -(-s.numel() // 32) * bits
    s2, z2 = expand_metadata(codes, exps, zeros, bits)
    assert torch.equal(s2, s) and torch.equal(z2, z)


@pytest.mark.parametrize("bits", (2, 3, 4))
def test_dequantized_weights_follow_the_reference_formula(bits):
    """w = (code - zero) * (scale_code * 2^exp), evaluated by hand from the stored tensors."""
    w = _weights(40)
    q, s, z = rtn_quantize(w, bits, 128, "q8")
    sc, ex, zc = compact_metadata(s, z, bits)
    rows, groups = sc.shape
    zero = unpack(zc, bits)[: rows * groups].reshape(rows, groups).double()
    scale = sc.double() * torch.pow(2.0, ex.double()).repeat_interleave(16, 0)[:rows]
    ref = (q.double().reshape(rows, groups, 128) - zero[..., None]) * scale[..., None]
    got = dequantize_matrix(q, s, z, 128)
    assert torch.equal(got.double(), ref.reshape(rows, -1))
    lin = QuantLinear.from_codes(q, s, z, bits, dtype=torch.float32, metadata="q8")
    assert torch.equal(lin.dequantize_weight(torch.float32), got)


def test_off_grid_metadata_is_refused():
    _, s, z = rtn_quantize(_weights(), 2, 128, "int")  # fp16 scales: not q * 2^k
    with pytest.raises(ShapeError, match="not on the q8 grid"):
        compact_metadata(s, z, 2)
    q, s, z = rtn_quantize(_weights(), 2, 128, "float")
    with pytest.raises(CheckpointError, match="not on the q8 grid"):
        QuantLinear.from_codes(q, s, z, 2, metadata="q8")


@pytest.mark.parametrize("method", ["rtn", "calibration_free", "gptq", "gptq_act_order_clip"])
@pytest.mark.parametrize("bits", (1, 2, 3, 4))
def test_codes_are_chosen_on_the_stored_grid(method, bits):
    w = _weights(48)
    if method == "rtn":
        q, s, z = rtn_quantize(w, bits, 128, "q8")
    elif method == "calibration_free":
        q, s, z = calibration_free_quantize(w, bits, 128, zero_point="q8")
    else:
        x = torch.randn(512, w.shape[1], generator=torch.Generator().manual_seed(1))
        extra = dict(act_order=True, clip_search=True) if method.endswith("clip") else {}
        q, s, z = gptq_quantize(w, x.T @ x / 512, bits, 128, zero_point="q8", **extra)
    compact_metadata(s, z, bits)  # on the grid (raises otherwise)
    if method in ("rtn", "calibration_free"):  # round to nearest on the stored grid
        wg = w.reshape(w.shape[0], -1, 128)
        assert torch.equal(q.reshape(wg.shape), quantize_codes(wg, s.float(), z.float(), bits))


@pytest.mark.parametrize("bits", (2, 3, 4))
def test_error_is_close_to_fp16_metadata_on_gaussian_weights(bits):
    """Same integer-zero grid, scales on 8 bits: reconstruction error within 5% of fp16 metadata's (RTN, GPTQ)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 512, generator=g)
    x = torch.randn(2048, 512, generator=g)
    h = x.T @ x / x.shape[0]
    for run in (lambda zp: rtn_quantize(w, bits, 128, zp), lambda zp: gptq_quantize(w, h, bits, 128, zero_point=zp)):
        ref = weight_mse(w, dequantize_matrix(*run("int"), 128))
        got = weight_mse(w, dequantize_matrix(*run("q8"), 128))
        assert got < 1.05 * ref, (bits, got / ref)


def test_one_bit_symmetric_form_error_is_close_to_the_binary_form():
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))
    ref = weight_mse(w, dequantize_matrix(*rtn_quantize(w, 1, 128, "int"), 128))
    got = weight_mse(w, dequantize_matrix(*rtn_quantize(w, 1, 128, "q8"), 128))
    assert got < 1.05 * ref


# ------------------------------------------------------------------------------------------ config and accounting


def test_default_is_fp16_and_not_written():
    cfg = optimum_mc.MCConfig()
    assert cfg.metadata == "fp16" and "metadata" not in cfg.to_dict() and cfg.to_dict()["format_version"] == 1


def test_q8_config_round_trips_with_format_3():
    cfg = optimum_mc.MCConfig(metadata="q8", zero_point="int")
    d = cfg.to_dict()
    assert d["metadata"] == "q8" and d["format_version"] == 3
    assert optimum_mc.MCConfig.from_dict(json.loads(json.dumps(d))) == cfg


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(metadata="q8"), "zero_point='float' cannot be stored"),
        (dict(metadata="q8", zero_point="int", group_size=-1), "group_size=-1"),
        (dict(metadata="int8"), "metadata must be one of"),
    ],
)
def test_combinations_no_format_serves_are_refused(kw, match):
    with pytest.raises(MCConfigError, match=match) as exc:
        optimum_mc.MCConfig(**kw)
    if kw.get("metadata") == "q8":
        assert "Combinations that work: metadata='fp16'" in str(exc.value)


def test_overhead_formula_per_width():
    assert [group_metadata_bits(b, "q8") / 128 for b in (1, 2, 3, 4)] == [
        9.5 / 128,
        10.5 / 128,
        11.5 / 128,
        12.5 / 128,
    ]
    assert group_metadata_bits(2, "q8") / 128 <= 0.1  # the target at 2 bits, g = 128
    assert group_metadata_bits(3, "fp16") == 32
    assert stored_bits(2, 4096, 14336, 128, "q8") == pytest.approx(2 + 10.5 / 128)
    assert stored_bits([2, 3], 256, 512, 128, "q8") == pytest.approx((2 * (2 + 10.5 / 128) + 3 + 11.5 / 128) / 3)
    # a stored budget buys more code bits: (T - 8.5/g) / (1 + 1/g) instead of T - 32/g
    assert code_bits_for_stored(2.5, 256, 512, 128, "q8") == pytest.approx((2.5 - 8.5 / 128) / (1 + 1 / 128))
    assert code_bits_for_stored(2.5, 256, 512, 128) == pytest.approx(2.25)
    cfg = optimum_mc.MCConfig(bits=2.5, bits_budget="stored", metadata="q8", zero_point="int")
    assert cfg.code_bits(256, 512) == pytest.approx(2.4148, abs=1e-4)


def test_stored_range_uses_the_q8_overhead():
    kw = dict(bits_budget="stored", metadata="q8", zero_point="int")
    optimum_mc.MCConfig(bits=1 + 9.5 / 128, **kw)
    optimum_mc.MCConfig(bits=3 + 11.5 / 128, **kw)
    with pytest.raises(MCConfigError, match="stored bits"):
        optimum_mc.MCConfig(bits=1.05, **kw)


# ------------------------------------------------------------------------------------------ end to end


def _cfg(**kw) -> optimum_mc.MCConfig:
    base = dict(num_samples=8, seq_len=32, dataset=CORPUS, show_progress=False, group_size=32)
    return optimum_mc.MCConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def q8_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("q8")
    src = save_tiny("mixtral", root / "m")
    cfg = _cfg(bits=3.0, bits_budget="stored", metadata="q8", zero_point="int")
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg)
    model.save_pretrained(root / "q")
    return src, model, root / "q"


def test_checkpoint_holds_the_compact_tensors(q8_model):
    _, _, out = q8_model
    (f,) = out.glob("*.safetensors")
    assert read_safetensors_metadata(str(f))[FORMAT_KEY] == "3"
    with safe_open(str(f), "pt") as st:
        keys = list(st.keys())
        assert not any(k.endswith((".scales", ".zeros")) for k in keys)  # every packed matrix (attention too)
        key = next(k for k in keys if k.endswith("experts.packed.0.gate_up.scale_codes"))
        assert st.get_tensor(key).dtype == torch.uint8
        assert st.get_tensor(key.replace("scale_codes", "scale_exps")).dtype == torch.int8
        assert st.get_tensor(key.replace("scale_codes", "zero_codes")).dtype == torch.int32
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format_version"] == 3


def test_save_load_is_exact_and_byte_deterministic(q8_model, tmp_path):
    _, model, out = q8_model
    back = AutoModelForCausalLM.from_pretrained(out)
    a, b = dict(model.named_buffers()), dict(back.named_buffers())
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)  # compact tensors and the expanded fp16 grid
    sa, sb = model.state_dict(), back.state_dict()
    assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, back(ids).logits)
    back.save_pretrained(tmp_path / "again")
    model.save_pretrained(tmp_path / "twice")
    (first,) = out.glob("*.safetensors")
    for folder in ("again", "twice"):
        (f,) = (tmp_path / folder).glob("*.safetensors")
        assert f.read_bytes() == first.read_bytes()


def test_stored_bits_accounting(q8_model):
    _, model, out = q8_model
    cfg = model.config.quantization_config
    # g = 32: 3.0 stored bits buy (3 - 8.5/32) / (1 + 1/32) = 2.65 code bits: 10 over 4 experts (fp16: 2.0, 8)
    assert all(sum(b) == 10 for b in cfg.expert_bits)
    expect = 2.5 * (1 + 1 / 32) + 8.5 / 32
    stored, code = expert_stored_bits(out, load_quant_config(out))
    assert stored == pytest.approx(expect, abs=1e-12) and code == pytest.approx(2.5, abs=1e-12)
    assert stored <= 3.0
    assert f"stored bits per expert weight: {expect:.4f}" in size_breakdown(out, load_quant_config(out))
    card = str(build_card(model, out))
    assert f"stored bits per expert weight | {expect:.3f}" in card and "q8: 8-bit scale codes" in card
    fp16 = _cfg(bits=3.0, bits_budget="stored")
    assert fp16.code_bits(64, 64) == pytest.approx(2.0)


def test_fp16_checkpoints_keep_their_format(q8_model, tmp_path):
    src, _, _ = q8_model
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=_cfg(bits=2.5))
    model.save_pretrained(tmp_path / "q")
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert "metadata" not in qc and qc["format_version"] == 1
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    lin = next(m for m in back.modules() if isinstance(m, QuantLinear))
    assert lin.metadata == "fp16" and "scales" in dict(lin.state_dict())
    a, b = model.state_dict(), back.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_reader_of_formats_1_2_refuses_q8_and_says_upgrade(q8_model, monkeypatch):
    from optimum_mc.errors import CheckpointVersionError

    _, _, out = q8_model
    monkeypatch.setattr("optimum_mc.config.FORMAT_VERSION", 2)
    with pytest.raises(CheckpointVersionError, match="upgrade"):
        AutoModelForCausalLM.from_pretrained(out)
