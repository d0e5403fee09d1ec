"""The C CPU kernels: exact dequantization, qmatmul against the reference, dispatch, build cache and fallbacks."""

import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from optimum_mc.group_quant import rtn_quantize
from optimum_mc.kernels import cpu, dequantize, qmatmul
from optimum_mc.kernels.reference import dequantize_reference
from optimum_mc.packing import pack

needs_c = pytest.mark.skipif(
    cpu.library() is None,
    reason=f"CPU kernels unavailable (no C compiler, failed build, or {cpu.ENV_KERNEL}=reference)",
)

BITS = [1, 2, 3, 4, 8]
# (out_features, in_features, group_size): odd row counts hit the last-row padding and partial 4-row blocks
SHAPES = [(37, 256, 64), (8, 96, 32), (5, 160, -1), (64, 512, 128)]


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


def _packed(bits, out_f, in_f, group, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen) * torch.rand(out_f, 1, generator=gen)
    q, s, z = rtn_quantize(w, bits, group)
    return pack(q, bits), s, z


def _assert_close_to_reference(y, x, p, s, z, bits, rtol=2e-6, weights=torch.float32):
    """|y - ref| <= rtol * (|x| @ |W|^T) (+ one rounding of the output dtype): fp32 sums in another order. ``ref``
    is x @ W^T with W dequantized exactly, or rounded to ``weights`` (bf16: the bf16 prefill kernels' contract)."""
    w = dequantize_reference(p, s, z, bits, torch.float32).to(weights).float()
    ref = (x.float() @ w.t()).to(x.dtype).float()
    bound = rtol * (x.float().abs() @ w.abs().t()) + 1e-30
    if x.dtype != torch.float32:
        bound = bound + 2 * torch.finfo(x.dtype).eps * ref.abs()
    err = (y.float() - ref).abs()
    assert y.dtype == x.dtype and y.shape == ref.shape
    assert bool((err <= bound).all()), f"max err/bound {(err / bound).max().item():.3g}"


@needs_c
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("bits", BITS)
def test_dequantize_is_bit_identical(bits, shape):
    p, s, z = _packed(bits, *shape)
    ref = dequantize_reference(p, s, z, bits, torch.float32)
    assert torch.equal(cpu.dequantize_cpu(p, s, z, bits, torch.float32), ref)
    assert torch.equal(dequantize(p, s, z, bits, torch.bfloat16), ref.bfloat16())


@needs_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [1, 3, 8, 64])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("bits", BITS)
def test_qmatmul_matches_reference(bits, shape, rows, dtype):
    p, s, z = _packed(bits, *shape, seed=rows)
    x = torch.randn(rows, shape[1], generator=torch.Generator().manual_seed(1)).to(dtype)
    group = shape[1] // s.shape[1]
    lib = cpu.library()
    prefill = dtype == torch.bfloat16 and rows > cpu.gemv_rows(lib, dtype, shape[1], group, bits)
    bf16_weights = prefill and cpu.bf16_prefill_kernel(lib, shape[1], group, bits) is not None
    # bf16 prefill rows are multiplied by bf16(W) where the CPU has a bf16 kernel (as a bf16 float model's weights)
    weights = torch.bfloat16 if bf16_weights else torch.float32
    _assert_close_to_reference(qmatmul(x, p, s, z, bits), x, p, s, z, bits, weights=weights)


@needs_c
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", [64, 128])
def test_fp32_decode_limbs_stay_within_the_fp32_bound(bits, group):
    """Where the CPU has VNNI, fp32 decode splits x into int8 limbs per group: outliers (a fourth limb), peaked and
    flat groups, all-zero and subnormal groups, and large magnitudes all stay within the FMA path's bound."""
    p, s, z = _packed(bits, 70, 1024, group, seed=bits)
    g = torch.Generator().manual_seed(group + bits)
    x = torch.randn(4, 1024, generator=g)
    x[0, 5] = 300.0  # an outlier: its group takes four limbs (near 1000x the FMA GEMV itself reaches the bound)
    x[1, group : 2 * group] = 0.0  # an all-zero group
    x[1, 2 * group : 3 * group] *= 1e-40  # a subnormal group
    x[2] *= 1e30  # large magnitudes
    x[3, ::7] *= 20.0  # peaked groups
    _assert_close_to_reference(qmatmul(x, p, s, z, bits), x, p, s, z, bits)
    for r in range(4):  # one row at a time (M = 1) as well
        _assert_close_to_reference(qmatmul(x[r : r + 1], p, s, z, bits), x[r : r + 1], p, s, z, bits)
    bad = x[:1].clone()
    bad[0, 3] = float("inf")
    assert qmatmul(bad, p, s, z, bits).isnan().any() or qmatmul(bad, p, s, z, bits).isinf().any()


@needs_c
@pytest.mark.parametrize("bits", [2, 3])
def test_qmatmul_paths_agree_on_many_shapes(bits, monkeypatch):
    """GEMV (every x-row count up to the threshold, 3-D x) and blocked GEMM (forced small blocks) vs reference."""
    p, s, z = _packed(bits, 45, 192, 64, seed=3)
    x = torch.randn(2, 8, 192) * 10
    assert x.shape[0] * x.shape[1] > cpu.GEMV_MAX_ROWS
    for rows in range(1, cpu.GEMV_MAX_ROWS + 2):
        xr = x.reshape(-1, 192)[:rows]
        _assert_close_to_reference(qmatmul(xr, p, s, z, bits), xr, p, s, z, bits)
    y = qmatmul(x[:, :3], p, s, z, bits)
    assert y.shape == (2, 3, 45)
    _assert_close_to_reference(y, x[:, :3], p, s, z, bits)
    monkeypatch.setattr(cpu, "GEMM_BLOCK_BYTES", 4 * 192 * 7)  # 7 weight rows per block, last block partial
    x = torch.randn(20, 192)
    _assert_close_to_reference(qmatmul(x, p, s, z, bits), x, p, s, z, bits)
    x_t = torch.randn(192, 20).t()  # non-contiguous input
    _assert_close_to_reference(qmatmul(x_t, p, s, z, bits), x_t, p, s, z, bits)


@needs_c
def test_multithreaded_matches_single_thread():
    """Large enough to run the OpenMP regions in parallel; results do not depend on the thread count."""
    p, s, z = _packed(3, 512, 1024, 128)
    x = torch.randn(2, 1024)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1, w1 = qmatmul(x, p, s, z, 3), dequantize(p, s, z, 3)
        torch.set_num_threads(2)
        y2, w2 = qmatmul(x, p, s, z, 3), dequantize(p, s, z, 3)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(y1, y2) and torch.equal(w1, w2)
    assert torch.equal(w1, dequantize_reference(p, s, z, 3, torch.float32))


@needs_c
def test_empty_and_unaligned_groups():
    p, s, z = _packed(4, 6, 64, 32)
    assert qmatmul(torch.randn(0, 64), p, s, z, 4).shape == (0, 6)
    # 16-wide groups are outside the format's contract (multiples of 32) but the op must stay correct: reference
    codes = torch.randint(0, 16, (6, 64), dtype=torch.uint8)
    s16, z16 = torch.rand(6, 4).half() + 0.1, torch.rand(6, 4).half() * 8
    p16 = pack(codes, 4)
    assert torch.equal(dequantize(p16, s16, z16, 4), dequantize_reference(p16, s16, z16, 4, torch.float32))


@needs_c
def test_ops_dispatch_to_the_c_kernels(monkeypatch):
    calls, real = [], cpu.library

    def counting_library():
        calls.append(1)
        return real()

    monkeypatch.setattr(cpu, "library", counting_library)
    p, s, z = _packed(2, 16, 64, 32)
    qmatmul(torch.randn(1, 64), p, s, z, 2)
    dequantize(p, s, z, 2)
    qmatmul(torch.randn(40, 64), p, s, z, 2)
    assert len(calls) == 3


@needs_c
def test_portable_c_path(tmp_path, monkeypatch):
    """Built without -march=native (no AVX2 on x86), the plain-C loops serve: same exactness and accuracy."""
    monkeypatch.setenv("OPTIMUM_MC_CACHE", str(tmp_path))
    portable = cpu.load(cpu.build(cpu._compiler(), tuple(f for f in cpu.FLAGS if not f.startswith("-march"))))
    monkeypatch.setattr(cpu, "library", lambda: portable)
    for bits in BITS:
        p, s, z = _packed(bits, 7, 160, 32, seed=bits)
        assert torch.equal(dequantize(p, s, z, bits), dequantize_reference(p, s, z, bits, torch.float32))
        for rows in (1, 6, 20):
            x = torch.randn(rows, 160)
            _assert_close_to_reference(qmatmul(x, p, s, z, bits), x, p, s, z, bits)


@needs_c
def test_torch_compile_over_qmatmul():
    p, s, z = _packed(3, 24, 128, 32)
    x = torch.randn(3, 128)
    eager = qmatmul(x, p, s, z, 3)
    compiled = torch.compile(lambda t: qmatmul(t, p, s, z, 3) * 2, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), eager * 2)


@needs_c
def test_build_is_cached_atomic_and_keyed(tmp_path, monkeypatch):
    monkeypatch.setenv("OPTIMUM_MC_CACHE", str(tmp_path))
    cc = cpu._compiler()
    path = cpu.build(cc)
    assert path.parent == tmp_path / "kernels" and path.exists()
    assert [f.name for f in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    mtime = path.stat().st_mtime_ns
    assert cpu.build(cc) == path and path.stat().st_mtime_ns == mtime  # reused, not rebuilt
    src = tmp_path / "k.c"
    src.write_text(cpu.SOURCE.read_text() + "\n/* changed */\n")
    monkeypatch.setattr(cpu, "SOURCE", src)
    assert cpu.build(cc) != path  # the source is part of the key


@needs_c
def test_compiling_is_announced_in_one_line_and_a_cached_build_says_nothing(tmp_path, monkeypatch, caplog):
    """Issue 20: the first command after install compiled for seconds without a word (read as a slow model)."""
    monkeypatch.setenv("OPTIMUM_MC_CACHE", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger=cpu.__name__):
        cpu.build(cpu._compiler())
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [
        "optimum-mc: compiling the CPU kernels for this CPU, once"
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=cpu.__name__):
        cpu.build(cpu._compiler())
    assert not caplog.records


def test_no_compiler_or_failed_build_falls_back_with_one_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("OPTIMUM_MC_CACHE", str(tmp_path))
    monkeypatch.delenv(cpu.ENV_KERNEL, raising=False)
    monkeypatch.setattr(cpu, "_compiler", lambda: None)
    with caplog.at_level(logging.WARNING, logger=cpu.__name__):
        assert cpu.library.__wrapped__() is None
    assert len(caplog.records) == 1 and "no C compiler" in caplog.text
    caplog.clear()
    if cpu.shutil.which("cc") is None:
        pytest.skip("no C compiler to produce a failing build with")
    monkeypatch.setattr(cpu, "_compiler", lambda: "cc")
    bad = tmp_path / "bad.c"
    bad.write_text("this is not C\n")
    monkeypatch.setattr(cpu, "SOURCE", bad)
    with caplog.at_level(logging.WARNING, logger=cpu.__name__):
        assert cpu.library.__wrapped__() is None
    failures = [r for r in caplog.records if "compiling the CPU kernels" not in r.getMessage()]
    assert len(failures) == 1 and "failed" in caplog.text
    assert not list((tmp_path / "kernels").iterdir())  # the failed build left nothing behind


@needs_c
def test_compiler_without_openmp_still_builds_the_kernels(tmp_path, monkeypatch, caplog):
    """Apple's clang rejects -fopenmp: the kernels are built without it (one thread) instead of the reference."""
    wrapper = tmp_path / "cc-without-openmp"
    wrapper.write_text(
        '#!/bin/sh\nfor a in "$@"; do\n  if [ "$a" = -fopenmp ]; then\n'
        "    echo \"clang: error: unsupported option '-fopenmp'\" >&2; exit 1\n  fi\ndone\n"
        f'exec {cpu._compiler()} "$@"\n'
    )
    wrapper.chmod(0o755)
    monkeypatch.setenv("OPTIMUM_MC_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(cpu.ENV_KERNEL, raising=False)
    monkeypatch.setattr(cpu, "_compiler", lambda: str(wrapper))
    with caplog.at_level(logging.WARNING, logger=cpu.__name__):
        lib = cpu.library.__wrapped__()
    said = [r.getMessage() for r in caplog.records]
    assert lib is not None and len(said) == 2 and "compiling the CPU kernels" in said[0], said  # announced once
    assert "rejected -fopenmp" in caplog.text and "single-threaded" in caplog.text
    p, s, z = _packed(3, 37, 256, 64)
    out = torch.empty(37, 256)
    assert lib.mc_dequantize(p.data_ptr(), s.data_ptr(), z.data_ptr(), out.data_ptr(), 37, 256, 3, 64, 2) == 0
    assert torch.equal(out, dequantize_reference(p, s, z, 3, torch.float32))


GUARD_PAGE_SCRIPT = """
import ctypes, mmap, torch
from optimum_mc.group_quant import rtn_quantize
from optimum_mc.kernels import cpu, dequantize, qmatmul
from optimum_mc.kernels.reference import dequantize_reference
from optimum_mc.packing import pack
assert cpu.library() is not None
libc = ctypes.CDLL(None)
keep = []
def guarded(t):  # a copy of t whose last byte sits just before an inaccessible page
    nbytes, page = t.numel() * 4, mmap.PAGESIZE
    pages = -(-nbytes // page) + 1
    mm = mmap.mmap(-1, pages * page)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    assert libc.mprotect(ctypes.c_void_p(addr + (pages - 1) * page), ctypes.c_size_t(page), 0) == 0
    g = torch.frombuffer(mm, dtype=torch.int32, count=t.numel(), offset=(pages - 1) * page - nbytes)
    keep.append(mm)
    return g.view(t.shape).copy_(t)
for bits in (1, 2, 3, 4, 8):
    q, s, z = rtn_quantize(torch.randn(3, 256), bits, 64)
    p = guarded(pack(q, bits))
    assert torch.equal(dequantize(p, s, z, bits), dequantize_reference(p, s, z, bits, torch.float32))
    for rows in (1, 5):
        qmatmul(torch.randn(rows, 256), p, s, z, bits)
print("guard-ok")
"""


@needs_c
def test_no_read_past_the_packed_weights():
    """Chunk loads near the end of the last row must not touch the next page (run in a child: a crash fails)."""
    out = subprocess.run([sys.executable, "-c", GUARD_PAGE_SCRIPT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "guard-ok" in out.stdout, (out.returncode, out.stderr[-2000:])


def test_reference_env_var_disables_the_c_kernels():
    code = textwrap.dedent(
        """
        import torch
        from optimum_mc.group_quant import rtn_quantize
        from optimum_mc.kernels import cpu, qmatmul
        from optimum_mc.kernels.reference import qmatmul_reference
        from optimum_mc.packing import pack
        assert cpu.library() is None
        q, s, z = rtn_quantize(torch.randn(8, 64), 3, 32)
        p, x = pack(q, 3), torch.randn(2, 64)
        assert torch.equal(qmatmul(x, p, s, z, 3), qmatmul_reference(x, p, s, z, 3))
        print("reference-ok")
        """
    )
    env = {**os.environ, cpu.ENV_KERNEL: "reference"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "reference-ok" in out.stdout


def test_kernels_wait_passively_without_changing_the_process_environment(monkeypatch):
    """The kernels' library is loaded with OMP_WAIT_POLICY=PASSIVE (where it brings its own OpenMP runtime next to
    torch's, spinning threads of one starve the other), set only while it loads: the process's environment stays as
    the user set it, and a user's own policy wins."""
    seen = []
    monkeypatch.setattr(cpu.ctypes, "CDLL", lambda path: seen.append(os.environ.get("OMP_WAIT_POLICY")) or path)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    cpu._open("lib.so")
    assert seen == ["PASSIVE"] and "OMP_WAIT_POLICY" not in os.environ
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    cpu._open("lib.so")
    assert seen == ["PASSIVE", "ACTIVE"] and os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    script = "import os, optimum_mc, optimum_mc.kernels; print('ENV', os.environ.get('OMP_WAIT_POLICY'))"
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ENV None" in out.stdout, out.stderr[-2000:]
