"""Int8 activations in the CPU decode kernel (``decode_activations="int8"``): the C kernel (vector and portable
builds, every bit-width, groups of 32 / 64 / 128) against a float64 oracle that rounds the GEMV inputs to int8 the
same way, NaN propagation, and the switch through ``set_decode_activations`` and ``MCConfig`` at load."""

from __future__ import annotations

import pytest
import torch
from helpers.moe import random_experts, random_routing
from test_kernels_cpu import needs_c
from tiny_models import CORPUS, save_tiny, tiny_model
from transformers import AutoModelForCausalLM

import optimum_mc
from optimum_mc import MCConfig
from optimum_mc.errors import MCConfigError, UnsupportedArchitectureError
from optimum_mc.kernels import ACTIVATIONS, cpu
from optimum_mc.kernels.moe_cpu import DecodePlan
from optimum_mc.kernels.reference import dequantize_reference
from optimum_mc.nn import MCExperts, QuantLinear

BITS = [1, 2, 3, 4, 8, 2, 3, 2]  # every bit-width in one layer
HIDDEN, INTER = 128, 256


def _int8_rounded(x: torch.Tensor, group: int) -> torch.Tensor:
    """x (fp32) as the kernel sees it: per group, rint(x * 127 / max|x|) * (max|x| / 127), in float64."""
    g = x.float().reshape(x.shape[0], -1, group)
    amax = g.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
    return (torch.round(g * inv).double() * (amax / 127.0).double()).reshape(x.shape)


def _oracle(x, idx, w, gate_up, down, bits, group, activation="silu") -> torch.Tensor:
    """The int8-activation decode in float64 (dequantized weights; only the inputs of each GEMV are rounded)."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(idx.shape[1]):
            e = int(idx[t, k])
            if e >= len(bits):
                continue
            wgu = dequantize_reference(*gate_up[e], bits[e], torch.float64)
            wdn = dequantize_reference(*down[e], bits[e], torch.float64)
            h = (_int8_rounded(x[t : t + 1], group) @ wgu.T).float()  # the kernel keeps h in fp32
            inter = h.shape[1] // 2
            a = ACTIVATIONS[activation](h[:, :inter]) * h[:, inter:]
            out[t] += float(w[t, k]) * (_int8_rounded(a, group) @ wdn.T)[0]
    return out


def _plan(gate_up, down, bits) -> DecodePlan:
    lists = [[m[j] for m in gate_up] for j in range(3)] + [[m[j] for m in down] for j in range(3)]
    return DecodePlan(tuple(lists), bits, "silu")


def _check(plan: DecodePlan, group: int, tokens: int, hidden: int = HIDDEN) -> None:
    gate_up, down = random_experts(BITS, hidden=hidden, inter=INTER, group=group)
    idx, w = random_routing(tokens, len(BITS), k=2, seed=tokens)
    idx[0, 1] = len(BITS)  # a slot dropped by ODP costs nothing
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(5))
    got = plan(x, idx, w, int8=True).double()
    ref = _oracle(x, idx, w, gate_up, down, BITS, group)
    scale = ref.abs().max().item()
    # fp32 accumulation only: the integer dots are exact and the rounding of x is the oracle's
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * scale)
    # and the rounding is really applied: the float path differs by more than that (by a few % at most here)
    gap = (plan(x, idx, w).double() - got).abs().max().item() / scale
    assert 1e-4 < gap < 5e-2


@needs_c
@pytest.mark.parametrize("group", [32, 64, 128])  # 64 and 128: the vector kernel; 32: its portable fallback
@pytest.mark.parametrize("tokens", [1, 3, cpu.GEMV_MAX_ROWS, cpu.MOE_DECODE_MAX_TOKENS_INT8])
def test_int8_decode_matches_the_rounding_oracle(group, tokens):
    gate_up, down = random_experts(BITS, hidden=HIDDEN, inter=INTER, group=group)
    _check(_plan(gate_up, down, BITS), group, tokens)


@needs_c
@pytest.mark.parametrize("hidden", [1024, 1280])  # 16 and 20 groups of 64: the 16-group vector prologue (+ a tail)
def test_int8_decode_many_groups(hidden):
    gate_up, down = random_experts(BITS, hidden=hidden, inter=INTER, group=64)
    _check(_plan(gate_up, down, BITS), 64, 2, hidden)


@needs_c
def test_int8_decode_portable_build(tmp_path, monkeypatch):
    """Built without -march=native, the plain-C int8 loop gives the oracle's results too."""
    monkeypatch.setenv("OPTIMUM_MC_CACHE", str(tmp_path))
    portable = cpu.load(cpu.build(cpu._compiler(), tuple(f for f in cpu.FLAGS if not f.startswith("-march"))))
    assert portable.mc_i8dot_available() == 0
    gate_up, down = random_experts(BITS, hidden=HIDDEN, inter=INTER, group=64)
    plan = _plan(gate_up, down, BITS)
    plan.lib = portable
    _check(plan, 64, 2)


@needs_c
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("rows", [1, 5, cpu.GEMV_MAX_ROWS])
def test_quant_linear_int8_decode_matches_the_rounding_oracle(bits, rows):
    g = torch.Generator().manual_seed(bits)
    lin = torch.nn.Linear(1280, 200, bias=True)  # 20 groups of 64: vector prologue and tail
    with torch.no_grad():
        lin.weight.copy_(torch.randn(200, 1280, generator=g) * 0.05)
    q = QuantLinear.from_linear(lin, bits, 64)
    x = torch.randn(rows, 1280, generator=g)
    w = dequantize_reference(q.qweight, q.scales, q.zeros, bits, torch.float64)
    ref = _int8_rounded(x, 64) @ w.T + lin.bias.double()
    many = torch.randn(cpu.GEMV_MAX_ROWS + 1, 1280, generator=g)
    with torch.no_grad():
        flt, flt_many = q(x).double(), q(many)
        q.decode_activations = "int8"
        got = q(x).double()
        assert torch.equal(q(many), flt_many)  # prefill keeps the float path
    scale = ref.abs().max().item()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * scale)
    assert 1e-4 < (flt - got).abs().max().item() / scale < 5e-2


@needs_c
def test_int8_decode_propagates_nan():
    gate_up, down = random_experts([2, 3], hidden=HIDDEN, inter=INTER, group=64)
    x = torch.randn(1, HIDDEN)
    x[0, 5] = float("nan")
    out = _plan(gate_up, down, [2, 3])(x, torch.tensor([[0, 1]]), torch.tensor([[0.6, 0.4]]), int8=True)
    assert out.isnan().all()


def test_set_decode_activations_switches_every_expert_module():
    model = tiny_model("mixtral")
    with pytest.raises(UnsupportedArchitectureError, match="no MC-packed modules"):
        optimum_mc.set_decode_activations(model, "int8")
    for block in [m for m in model.modules() if hasattr(m, "experts") and hasattr(m.experts, "gate_up_proj")]:
        block.experts = MCExperts.from_float(block.experts, [2, 3] * (block.experts.gate_up_proj.shape[0] // 2), 32)
    with pytest.raises(MCConfigError, match="one of"):
        optimum_mc.set_decode_activations(model, "fp8")
    ids = torch.randint(3, 300, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        float_logits = model(input_ids=ids).logits
        n = optimum_mc.set_decode_activations(model, "int8")
        packed = [m for m in model.modules() if isinstance(m, (MCExperts, QuantLinear))]
        assert n == len(packed) > model.config.num_hidden_layers
        assert all(m.decode_activations == "int8" for m in packed)
        out = model.generate(ids, max_new_tokens=4, do_sample=False)  # decode steps take the int8 kernel
        assert out.shape == (1, 10)
        optimum_mc.set_decode_activations(model, "float")
        assert torch.equal(model(input_ids=ids).logits, float_logits)


def test_config_validates_decode_activations():
    with pytest.raises(MCConfigError, match="decode_activations"):
        MCConfig(decode_activations="int4")
    assert MCConfig(decode_activations="int8").to_dict()["decode_activations"] == "int8"


@needs_c
@pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")
def test_decode_activations_passed_at_load_is_applied(tmp_path):
    path = save_tiny("mixtral", tmp_path / "f")
    quick = dict(group_size=32, num_samples=4, seq_len=16, dataset=CORPUS, show_progress=False)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=MCConfig(bits=2.5, **quick))
    assert {m.decode_activations for m in model.modules() if isinstance(m, MCExperts)} == {"auto"}
    model.save_pretrained(tmp_path / "q")
    passed = MCConfig(decode_activations="int8")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q", quantization_config=passed)
    assert loaded.config.quantization_config.decode_activations == "int8"
    assert {m.decode_activations for m in loaded.modules() if isinstance(m, MCExperts)} == {"int8"}
    ids = torch.randint(3, 300, (1, 1), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # one token: a decode step, where int8 applies
        a, b = model(input_ids=ids).logits, loaded(input_ids=ids).logits
    assert not torch.equal(a, b)
    torch.testing.assert_close(a, b, rtol=0.05, atol=0.05 * a.abs().max().item())


@needs_c
def test_integer_dot_decode_does_not_depend_on_the_thread_count():
    gate_up, down = random_experts(BITS, hidden=1280, inter=INTER, group=64)
    plan = _plan(gate_up, down, BITS)
    idx, w = random_routing(3, len(BITS), k=2, seed=9)
    x = torch.randn(3, 1280, generator=torch.Generator().manual_seed(9))
    lin = QuantLinear.from_linear(torch.nn.Linear(1280, 512, bias=False), 3, 64)
    before, outs = torch.get_num_threads(), []
    try:
        for threads in (1, 2):  # large enough for the OpenMP regions to run in parallel at 2
            torch.set_num_threads(threads)
            with torch.no_grad():
                lin.decode_activations = "int8"
                q8 = lin(x)
                lin.decode_activations = "float"
                outs.append((plan(x, idx, w), plan(x, idx, w, int8=True), q8, lin(x)))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(*outs))


def test_int8_without_the_vector_kernel_warns(monkeypatch, caplog):
    model = tiny_model("mixtral")
    for block in [m for m in model.modules() if hasattr(m, "experts") and hasattr(m.experts, "gate_up_proj")]:
        block.experts = MCExperts.from_float(block.experts, [2] * block.experts.gate_up_proj.shape[0], 32)

    class NoVNNI:
        def mc_i8dot_available(self):
            return 0

    monkeypatch.setattr(cpu, "library", lambda: NoVNNI())
    with caplog.at_level("WARNING", logger="optimum_mc"):
        optimum_mc.set_decode_activations(model, "int8")
    assert "portable loop" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="optimum_mc"):
        optimum_mc.set_decode_activations(model, "float")
    assert caplog.text == ""


def test_auto_takes_int8_for_half_inputs_only_where_the_vector_kernel_runs(monkeypatch):
    assert cpu.int8_decode("int8", torch.float32) and not cpu.int8_decode("float", torch.bfloat16)
    assert not cpu.int8_decode("auto", torch.float32)
    for available in (True, False):
        monkeypatch.setattr(cpu, "i8dot_available", lambda a=available: a)
        assert cpu.int8_decode("auto", torch.bfloat16) is available
        assert cpu.int8_decode("auto", torch.float16) is available
    assert MCConfig().decode_activations == "auto"


@needs_c
@pytest.mark.skipif(not cpu.i8dot_available(), reason="auto picks int8 only with the AVX512-VNNI/VBMI kernel")
def test_auto_decode_of_a_bf16_model_is_the_int8_decode_in_eager_and_compiled_mode():
    torch.manual_seed(0)
    model = tiny_model("mixtral")
    for blk in list(model.modules()):
        if type(blk).__name__ == "MixtralSparseMoeBlock":
            blk.experts = MCExperts.from_float(blk.experts, [2, 3, 2, 3], 32)
    model = model.to(torch.bfloat16).eval()
    experts = next(m for m in model.modules() if isinstance(m, MCExperts))
    x = torch.randn(1, experts.hidden_dim).to(torch.bfloat16)
    idx, w = random_routing(1, experts.num_experts, k=2, seed=3)
    w = w.to(torch.bfloat16)
    with torch.no_grad():
        auto = experts(x, idx, w)
        optimum_mc.set_decode_activations(model, "int8")
        int8 = experts(x, idx, w)
        optimum_mc.set_decode_activations(model, "float")
        flt = experts(x, idx, w)
        optimum_mc.set_decode_activations(model, "auto")
        compiled = torch.compile(experts, fullgraph=True)(x, idx, w)
    assert torch.equal(auto, int8) and not torch.equal(auto, flt)
    assert torch.equal(compiled, auto)  # the mode is an argument of the op: compiled decode is eager decode
    lin = QuantLinear.from_linear(torch.nn.Linear(128, 64), 4, 32).to(torch.bfloat16)
    xl = torch.randn(1, 128).to(torch.bfloat16)
    with torch.no_grad():
        eager = lin(xl)
        lin.decode_activations = "int8"
        assert torch.equal(eager, lin(xl))
        lin.decode_activations = "auto"
        assert torch.equal(torch.compile(lin, fullgraph=True)(xl), eager)


@needs_c
def test_int8_decode_serves_batches_up_to_its_own_token_limit(monkeypatch):
    """With int8 activations the whole-layer decode kernel serves up to MOE_DECODE_MAX_TOKENS_INT8 tokens (a
    decode batch, e.g. vLLM at concurrency 16); fp32 activations hand over to the grouped path above GEMV_MAX_ROWS."""
    from optimum_mc.kernels import moe_cpu, moe_op

    assert cpu.GEMV_MAX_ROWS < cpu.MOE_DECODE_MAX_TOKENS_INT8
    assert cpu.moe_decode_tokens(True) == cpu.MOE_DECODE_MAX_TOKENS_INT8
    assert cpu.moe_decode_tokens(False) == cpu.GEMV_MAX_ROWS
    gate_up, down = random_experts(BITS, hidden=HIDDEN, inter=INTER, group=64)
    lists = [[m[j] for m in gate_up] for j in range(3)] + [[m[j] for m in down] for j in range(3)]
    calls = []
    real_decode, real_prefill = moe_cpu._decode, moe_cpu._prefill
    monkeypatch.setattr(moe_cpu, "_decode", lambda *a, **k: calls.append("decode") or real_decode(*a, **k))
    monkeypatch.setattr(moe_cpu, "_prefill", lambda *a, **k: calls.append("grouped") or real_prefill(*a, **k))
    limit = cpu.MOE_DECODE_MAX_TOKENS_INT8
    for tokens, mode, path in (
        (cpu.GEMV_MAX_ROWS + 1, "int8", "decode"),
        (limit, "int8", "decode"),
        (limit + 1, "int8", "grouped"),
        (cpu.GEMV_MAX_ROWS + 1, "float", "grouped"),
    ):
        calls.clear()
        idx, w = random_routing(tokens, len(BITS), k=2, seed=tokens)
        x = torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(tokens))
        got = moe_op(x, idx, w, *lists, BITS, "silu", mode)
        assert calls == [path], (tokens, mode, calls)
        ref = _oracle(x, idx, w, gate_up, down, BITS, 64) if mode == "int8" and path == "decode" else None
        if ref is not None:
            torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
