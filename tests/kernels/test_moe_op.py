"""``optimum_mc::moe`` (the fused mixed-bit MoE op): CPU kernel vs the pure-torch reference, MCExperts vs its
per-expert path on every family, ODP, bad input, fake tensors and torch.compile."""

from __future__ import annotations

import pytest
import torch
from helpers.moe import BITS, quantized_blocks, random_experts, random_routing, tolerance
from tiny_models import FAMILIES, tiny_model

from optimum_mc.architectures import moe_blocks
from optimum_mc.errors import DeviceMismatchError, DTypeError, RoutingError, ShapeError
from optimum_mc.kernels import ACTIVATIONS, activation_name, cpu, moe, moe_cpu, moe_op
from optimum_mc.kernels.reference import moe_reference
from optimum_mc.nn import MCExperts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 4, cpu.GEMV_MAX_ROWS, cpu.GEMV_MAX_ROWS + 1, 70])
def test_cpu_kernel_matches_reference_mixed_bits_with_odp(tokens, dtype):
    gate_up, down = random_experts(BITS)
    idx, w = random_routing(tokens, len(BITS), skew=tokens == 70)
    idx[0, 1] = len(BITS)  # a slot dropped by ODP
    x = torch.randn(tokens, 128, generator=torch.Generator().manual_seed(2)).to(dtype)
    ref = moe_reference(x, idx, w, gate_up, down, BITS, "silu")
    got = moe(x, idx, w, gate_up, down, BITS, "silu")
    assert got.dtype == dtype and got.shape == x.shape
    torch.testing.assert_close(got.float(), ref.float(), **tolerance(ref, dtype, tokens > cpu.GEMV_MAX_ROWS))
    # the dispatcher (torch.ops, as torch.compile calls it) reaches the same CPU kernel
    lists = [[m[j] for m in gate_up] for j in range(3)] + [[m[j] for m in down] for j in range(3)]
    assert torch.equal(torch.ops.optimum_mc.moe(x, idx, w, *lists, BITS, "silu"), got)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("tokens", [3, 40])
def test_every_activation(activation, tokens):
    gate_up, down = random_experts([2, 3, 4, 2], group=-1)  # one group per row: 128 and 96 wide
    idx, w = random_routing(tokens, 4)
    x = torch.randn(tokens, 128, generator=torch.Generator().manual_seed(3))
    ref = moe_reference(x, idx, w, gate_up, down, [2, 3, 4, 2], activation)
    got = moe(x, idx, w, gate_up, down, [2, 3, 4, 2], activation)
    torch.testing.assert_close(got, ref, **tolerance(ref, torch.float32, tokens > cpu.GEMV_MAX_ROWS))


def test_activation_names_are_probed():
    import transformers.activations as A

    assert activation_name(torch.nn.SiLU()) == "silu" and activation_name(A.ACT2FN["swish"]) == "silu"
    assert activation_name(A.ACT2FN["gelu"]) == "gelu" and activation_name(A.ACT2FN["relu"]) == "relu"
    assert activation_name(A.ACT2FN["gelu_pytorch_tanh"]) == "gelu_tanh"
    assert activation_name(torch.tanh) is None and activation_name(lambda t: t[:1]) is None


@pytest.mark.parametrize("tokens", [2, 30])
def test_dropped_slots_contribute_nothing(tokens):
    gate_up, down = random_experts([2, 3, 2, 3])
    idx, w = random_routing(tokens, 4)
    x = torch.randn(tokens, 128)
    assert torch.equal(moe(x, torch.full_like(idx, 4), w, gate_up, down, [2, 3, 2, 3]), torch.zeros_like(x))
    half = idx.clone()
    half[:, 1] = 4
    only_first = moe(x, idx[:, :1], w[:, :1], gate_up, down, [2, 3, 2, 3])
    torch.testing.assert_close(moe(x, half, w, gate_up, down, [2, 3, 2, 3]), only_first, rtol=1e-6, atol=1e-6)


def test_decode_uses_the_fused_c_kernel(monkeypatch):
    calls = []
    real = moe_cpu._decode
    monkeypatch.setattr(moe_cpu, "_decode", lambda *a: calls.append(1) or real(*a))
    gate_up, down = random_experts([2, 3])
    idx, w = random_routing(1, 2)
    moe(torch.randn(1, 128), idx, w, gate_up, down, [2, 3])
    if cpu.library() is not None:
        assert calls == [1]


def test_bad_input_raises_typed_errors():
    gate_up, down = random_experts([2, 3, 2, 3])
    x = torch.randn(5, 128)
    idx, w = random_routing(5, 4)
    for bad in (-1, 5):
        wrong = idx.clone()
        wrong[2, 0] = bad
        for tokens in (1, 5):  # decode (C) and prefill paths
            with pytest.raises(RoutingError, match=r"\[0, 4\]"):
                moe(x[:tokens], wrong[:tokens] if tokens > 1 else wrong[2:3], w[:tokens], gate_up, down, [2, 3, 2, 3])
    with pytest.raises(RoutingError):
        moe(x, idx, w[:, :1], gate_up, down, [2, 3, 2, 3])
    with pytest.raises(RoutingError):
        moe(x, idx[:4], w[:4], gate_up, down, [2, 3, 2, 3])
    with pytest.raises(DTypeError):
        moe(x, idx.float(), w, gate_up, down, [2, 3, 2, 3])
    with pytest.raises(ShapeError):
        moe(x[:, :64], idx, w, gate_up, down, [2, 3, 2, 3])
    with pytest.raises(DeviceMismatchError):
        moe(x.to("meta"), idx, w, gate_up, down, [2, 3, 2, 3])
    bad_scales = [(q, s.float(), z) for q, s, z in gate_up]
    with pytest.raises(DTypeError):
        moe(x, idx, w, bad_scales, down, [2, 3, 2, 3])
    with pytest.raises(ShapeError):
        moe(x, idx, w, gate_up, down, [2, 3, 2])


def test_fake_tensors_and_meta():
    gate_up, down = random_experts([2, 3])
    meta = lambda ts: [tuple(t.to("meta") for t in m) for m in ts]  # noqa: E731
    out = moe(torch.randn(3, 128, device="meta"), torch.zeros(3, 2, dtype=torch.long, device="meta"),
              torch.rand(3, 2, device="meta"), meta(gate_up), meta(down), [2, 3])  # fmt: skip
    assert out.shape == (3, 128) and out.device.type == "meta"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_mcexperts_fused_equals_per_expert_path(family):
    model = quantized_blocks(tiny_model(family))
    experts = next(moe_blocks(model)).experts
    assert isinstance(experts, MCExperts) and experts.activation == "silu"
    e, k = experts.num_experts, 2
    for tokens in (1, 3, 40):
        idx, w = random_routing(tokens, e, k)
        idx[-1, -1] = e  # ODP
        x = torch.randn(tokens, experts.hidden_dim)
        with torch.no_grad():
            torch.testing.assert_close(experts(x, idx, w), experts.forward_per_expert(x, idx, w), rtol=1e-5,
                                       atol=1e-6)  # fmt: skip


def test_model_batch_with_padding_and_odp_matches_per_expert_path(monkeypatch):
    from optimum_mc.pruning import get_odp_stats, set_odp

    model = quantized_blocks(tiny_model("mixtral")).eval()
    ids = torch.randint(3, 300, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    mask[2, :2] = 0
    with torch.no_grad():
        fused = model(input_ids=ids, attention_mask=mask).logits
        monkeypatch.setattr(MCExperts, "forward", MCExperts.forward_per_expert)
        loop = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(fused, loop, rtol=1e-4, atol=1e-4)
    monkeypatch.undo()
    assert set_odp(model, True, threshold=0.8, layers=2)  # drops many second experts
    with torch.no_grad():
        fused = model(input_ids=ids, attention_mask=mask).logits
        for m in model.modules():  # MCExperts' own per-expert loop (for activations the op lacks), ODP included
            if isinstance(m, MCExperts):
                monkeypatch.setattr(m, "activation", None)
        loop = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(fused, loop, rtol=1e-4, atol=1e-4)
    assert get_odp_stats(model)["total"]["skipped_fraction"] > 0


def test_moe_op_compiles_without_graph_breaks():
    model = quantized_blocks(tiny_model("mixtral"))
    experts = next(moe_blocks(model)).experts
    idx, w = random_routing(8, experts.num_experts)
    x = torch.randn(8, experts.hidden_dim)
    explained = torch._dynamo.explain(experts)(x, idx, w)
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(experts, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, idx, w), experts(x, idx, w), rtol=0, atol=0)
    assert moe_op is not None


def _quantized_model():
    from optimum_mc.nn import QuantLinear

    model = quantized_blocks(tiny_model("mixtral")).eval()
    for layer in model.model.layers:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(layer.self_attn, name, QuantLinear.from_linear(getattr(layer.self_attn, name), 4, 32))
    return model


def test_quantized_model_compiles_and_static_cache_generate_matches_eager():
    model = _quantized_model()
    ids = torch.randint(3, 300, (1, 8), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(input_ids=ids)
    assert explained.graph_break_count == 0, explained.break_reasons  # MoE and linear modules included
    kw = dict(max_new_tokens=10, do_sample=False, cache_implementation="static")
    with torch.no_grad():
        eager = model.generate(ids, **kw)
        torch._dynamo.reset()
        # aot_eager traces through the fake implementations and functionalization like inductor does (inductor
        # itself also gives the same tokens; it is left out here because it compiles for over a minute on CPU)
        model.forward = torch.compile(model.forward, backend="aot_eager")
        compiled = model.generate(ids, **kw)
    assert torch.equal(eager, compiled)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_bf16_dequantize_is_the_rounded_reference(bits):
    lib = cpu.library()
    if lib is None:
        pytest.skip("no C compiler: the reference serves the CPU")
    qw, s, z = random_experts([bits], hidden=256, inter=128, group=64)[0][0]  # gate_up: 256 x 256
    out = torch.empty(qw.shape[0], 256, dtype=torch.bfloat16)
    assert lib.mc_dequantize_bf16(qw.data_ptr(), s.data_ptr(), z.data_ptr(), out.data_ptr(), qw.shape[0], 256, bits,
                                  64, 2) == 0  # fmt: skip
    from optimum_mc.kernels.reference import dequantize_reference

    assert torch.equal(out, dequantize_reference(qw, s, z, bits, torch.float32).to(torch.bfloat16))
