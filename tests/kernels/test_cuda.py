"""On a CUDA GPU (skipped elsewhere): the Triton kernels on the device, calibration on the GPU, inference, ODP,
determinism and torch.compile. Run where a GPU is present: ``pytest tests/kernels/test_cuda.py``."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

# MC_TEST_DEVICE=cpu runs the same checks on the CPU kernels (to check the tests themselves where no GPU is)
DEVICE = os.environ.get("MC_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")

from tiny_models import CORPUS, save_tiny  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import optimum_mc  # noqa: E402
from optimum_mc.group_quant import rtn_quantize  # noqa: E402
from optimum_mc.kernels import moe  # noqa: E402
from optimum_mc.kernels.reference import dequantize_reference, moe_reference, qmatmul_reference  # noqa: E402
from optimum_mc.packing import pack  # noqa: E402

IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11, 64, 128, 31, 8]])
HALF_TOL = {torch.float16: 3e-3, torch.bfloat16: 1.5e-2}  # relative (norm) error of half tiles vs the fp32 reference


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm()).item()


def mc_config(**kw) -> optimum_mc.MCConfig:
    base = dict(bits=2.5, group_size=32, num_samples=8, seq_len=32, dataset=CORPUS, show_progress=False)
    return optimum_mc.MCConfig(**{**base, **kw})


def digest(model, folder: Path) -> str:
    model.save_pretrained(folder)
    return hashlib.sha256(b"".join(f.read_bytes() for f in sorted(folder.glob("*.safetensors")))).hexdigest()


def logits(model, device="cpu"):
    with torch.no_grad():
        return model(input_ids=IDS.to(device)).logits.float().cpu()


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    return save_tiny("mixtral", tmp_path_factory.mktemp("float"), num_hidden_layers=3)


@pytest.fixture(scope="module")
def cpu_quantized(float_dir, tmp_path_factory):
    model = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=mc_config(device="cpu"))
    out = tmp_path_factory.mktemp("cpu-q")
    model.save_pretrained(out)
    return model, str(out)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_ops_match_the_reference_on_cuda(bits):
    from optimum_mc.kernels import triton

    assert triton.TRITON_AVAILABLE or DEVICE == "cpu"  # the Triton kernels serve CUDA tensors
    g = torch.Generator().manual_seed(bits)
    for out_f, in_f, group in ((256, 512, 64), (33, 128, 128)):
        q, s, z = rtn_quantize(torch.randn(out_f, in_f, generator=g), bits, group)
        p = pack(q, bits)
        ref_w = dequantize_reference(p, s, z, bits, torch.float32)
        dev = [t.to(DEVICE) for t in (p, s, z)]
        assert torch.equal(torch.ops.optimum_mc.dequantize(*dev, bits, torch.float32).cpu(), ref_w)
        for rows in (1, 5, 70):
            x = torch.randn(rows, in_f, generator=g)
            ref = qmatmul_reference(x, p, s, z, bits)
            y = torch.ops.optimum_mc.qmatmul(x.to(DEVICE), *dev, bits).cpu()
            assert (y - ref).abs().max().item() <= 1e-5 * (x.abs() @ ref_w.abs().t()).max().item() + 1e-6
            for dtype, tol in HALF_TOL.items():
                yh = torch.ops.optimum_mc.qmatmul(x.to(DEVICE).to(dtype), *dev, bits)
                assert yh.dtype == dtype and rel(yh, qmatmul_reference(x.to(dtype).float(), p, s, z, bits)) <= tol


@pytest.mark.parametrize("kernel", ["fused", "tiled"])  # OPTIMUM_MC_CUDA_MOE: the fused kernels, the previous ones
@pytest.mark.parametrize("tokens", [1, 7, 300])
def test_fused_moe_matches_the_reference_on_cuda(tokens, kernel, monkeypatch):
    monkeypatch.setenv("OPTIMUM_MC_CUDA_MOE", kernel)
    bits = [1, 2, 3, 4, 8, 3, 2, 2]
    g = torch.Generator().manual_seed(tokens)
    hidden, inter = 256, 384
    gate_up, down = [], []
    for b in bits:
        q, s, z = rtn_quantize(torch.randn(2 * inter, hidden, generator=g) * 0.1, b, 64)
        gate_up.append((pack(q, b), s, z))
        q, s, z = rtn_quantize(torch.randn(hidden, inter, generator=g) * 0.1, b, 128)
        down.append((pack(q, b), s, z))
    cuda = [[tuple(t.to(DEVICE) for t in m) for m in ms] for ms in (gate_up, down)]
    idx = torch.stack([torch.randperm(len(bits), generator=g)[:2] for _ in range(tokens)])
    idx[0, 1] = len(bits)  # dropped by ODP
    w = torch.rand(tokens, 2, generator=g)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.randn(tokens, hidden, generator=g).to(dtype)
        ref = moe_reference(x.float(), idx, w, gate_up, down, bits, "silu")
        out = moe(x.to(DEVICE), idx.to(DEVICE), w.to(DEVICE), cuda[0], cuda[1], bits)
        assert out.dtype == dtype and torch.isfinite(out).all()
        if dtype == torch.float32:
            assert (out.cpu() - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
        else:
            assert rel(out, ref) <= HALF_TOL[dtype], (dtype, rel(out, ref))


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs")
@pytest.mark.parametrize("tokens", [1, 40])
def test_fused_moe_replays_in_a_cuda_graph(tokens):
    """The op captured in a CUDA graph (after one eager call, which builds the GPU layout) replays to the eager
    result for new inputs copied into the captured buffers, routing included (no host sync in the op)."""
    from optimum_mc.errors import GraphCaptureError

    bits = [2, 3, 1, 4]
    g = torch.Generator().manual_seed(5)
    hidden, inter = 256, 384
    gate_up, down = [], []
    for b in bits:
        q, s, z = rtn_quantize(torch.randn(2 * inter, hidden, generator=g) * 0.1, b, 128)
        gate_up.append(tuple(t.cuda() for t in (pack(q, b), s, z)))
        q, s, z = rtn_quantize(torch.randn(hidden, inter, generator=g) * 0.1, b, 128)
        down.append(tuple(t.cuda() for t in (pack(q, b), s, z)))

    def inputs():
        idx = torch.stack([torch.randperm(len(bits), generator=g)[:2] for _ in range(tokens)])
        idx[0, 1] = len(bits)  # dropped
        x = torch.randn(tokens, hidden, generator=g).to(torch.bfloat16)
        return idx.cuda(), torch.rand(tokens, 2, generator=g).cuda(), x.cuda()

    idx, w, x = inputs()
    fresh = [tuple(t.clone() for t in m) for m in gate_up]  # buffers whose layout was never built
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(GraphCaptureError, match="once before capturing"):
        with torch.cuda.graph(graph):
            moe(x, idx, w, fresh, down, bits)
    moe(x, idx, w, gate_up, down, bits)  # warm-up: builds the layout, compiles
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe(x, idx, w, gate_up, down, bits)
    idx2, w2, x2 = inputs()
    idx.copy_(idx2), w.copy_(w2), x.copy_(x2)
    graph.replay()
    assert torch.equal(out, moe(x, idx, w, gate_up, down, bits))


def test_quantized_model_on_cuda_matches_cpu(cpu_quantized):
    from optimum_mc.nn import MCExperts
    from optimum_mc.pruning import get_odp_stats, set_odp

    model, path = cpu_quantized
    on_gpu = AutoModelForCausalLM.from_pretrained(path, device_map=DEVICE)
    tensors = [*on_gpu.parameters(), *on_gpu.buffers()]
    assert {t.device.type for t in tensors} == {torch.device(DEVICE).type}
    ref = logits(model)
    assert rel(logits(on_gpu, DEVICE), ref) <= 1e-4
    half = AutoModelForCausalLM.from_pretrained(path, device_map=DEVICE, dtype=torch.float16)
    assert rel(logits(half, DEVICE), ref) <= 2e-2
    assert set_odp(on_gpu, True, threshold=0.8)
    ids = IDS.to(DEVICE)
    with torch.no_grad():
        fused = on_gpu(input_ids=ids).logits
        loop = MCExperts.forward
        try:
            MCExperts.forward = MCExperts.forward_per_expert
            per_expert = on_gpu(input_ids=ids).logits
        finally:
            MCExperts.forward = loop
    assert rel(fused, per_expert) <= 1e-4
    assert get_odp_stats(on_gpu)["total"]["skipped_fraction"] > 0
    out = on_gpu.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape == (1, IDS.shape[1] + 8)


def test_calibration_on_cuda(float_dir, cpu_quantized, tmp_path):
    """``MCConfig(device=DEVICE)`` calibrates and runs GPTQ on the GPU while the float model stays on disk / CPU;
    the packed model ends where the device map asks, and is as close to the float model as a CPU-calibrated one."""
    float_model = AutoModelForCausalLM.from_pretrained(float_dir)
    ref = logits(float_model)
    cpu_model, _ = cpu_quantized
    on_host = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=mc_config(device=DEVICE))
    assert {p.device.type for p in on_host.parameters()} == {"cpu"}
    bits = on_host.config.quantization_config.expert_bits
    assert sum(map(sum, bits)) / sum(map(len, bits)) <= 2.5
    err_cuda, err_cpu = rel(logits(on_host), ref), rel(logits(cpu_model), ref)
    print(f"relative logit error vs float: GPU-calibrated {err_cuda:.4f}, CPU-calibrated {err_cpu:.4f}")
    assert err_cuda <= 1.25 * err_cpu + 1e-3
    # determinism: the same inputs and seed give the same bytes on the GPU too
    again = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=mc_config(device=DEVICE))
    assert not torch.are_deterministic_algorithms_enabled()  # the caller's setting is restored
    first = digest(on_host, tmp_path / "a")
    assert first == digest(again, tmp_path / "b")
    on_gpu = AutoModelForCausalLM.from_pretrained(
        float_dir, quantization_config=mc_config(device=DEVICE), device_map=DEVICE
    )
    assert {p.device.type for p in on_gpu.parameters()} == {torch.device(DEVICE).type}
    err_gpu = rel(logits(on_gpu, DEVICE), ref)
    same = digest(on_gpu, tmp_path / "c") == first
    print(f"packed model placed on the GPU: error vs float {err_gpu:.4f}; same bytes as placed on the host: {same}")
    assert err_gpu <= 1.25 * err_cpu + 1e-3


def test_compiled_static_cache_generate_matches_eager_on_cuda(cpu_quantized):
    _, path = cpu_quantized
    model = AutoModelForCausalLM.from_pretrained(path, device_map=DEVICE)
    ids = IDS.to(DEVICE)
    kw = dict(max_new_tokens=6, do_sample=False, cache_implementation="static")
    with torch.no_grad():
        eager = model.generate(ids, **kw)
        torch._dynamo.reset()
        model.forward = torch.compile(model.forward)  # inductor, the default backend
        compiled = model.generate(ids, **kw)
    assert torch.equal(eager, compiled)
