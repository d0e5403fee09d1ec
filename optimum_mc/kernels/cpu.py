"""The fast CPU path: C kernels (``csrc/``, one translation unit ``csrc/mc_kernels.c``) compiled on first use and
registered for the "cpu" key.

- ``dequantize``: multithreaded unpack + ``(q - zero) * scale`` in fp32, bit-identical to the reference.
- ``qmatmul`` with at most ``GEMV_MAX_ROWS`` rows of ``x`` (decode; bf16 rows on AMX: fewer than ``AMX_MIN_ROWS``,
  :func:`gemv_rows`): a fused GEMV that reads the packed bits
  directly, never materializing a dequantized copy. With more rows (prefill): bf16 rows go through the fused bf16
  kernels below; fp32 rows: blocks of the weight are dequantized in C into a reused fp32 buffer and multiplied with
  BLAS (``torch.mm``).

Every path sums in fp32 and casts the result to ``x.dtype``. Weights are dequantized exactly (fp32), except in
the bf16 prefill (bf16 rows past :func:`gemv_rows`, in ``qmatmul`` and in the fused MoE op alike,
:func:`dense_rows`): there the kernels round the weights to bf16, as a bf16 float model's weights are — AMX
``mc_amx_linear`` where the CPU has AMX, else ``mc_bf16_linear`` / ``mc_bf16_linear_fma`` with AVX512-BF16
(:func:`bf16_prefill_kernel`) — and CPUs with neither compute it in fp32: ``mc_fma_linear`` with AVX2 + FMA.

Switches, read once per process: ``OPTIMUM_MC_CPU_AMX=0`` turns the AMX kernel off, ``OPTIMUM_MC_CPU_AVX512BF16=0``
the AVX512-BF16 ones (to measure and test the other paths on a CPU that has these units),
``OPTIMUM_MC_CPU_BF16_DOT=dp|fma`` picks the AVX512-BF16 variant (see :func:`bf16_dot`),
``OPTIMUM_MC_CPU_MARCH=haswell`` builds for that ``-march`` instead of ``native`` (emulating an AVX2-only CPU).

The library is built with the system C compiler
(``$CC``, ``cc``, ``gcc`` or ``clang``) into ``$OPTIMUM_MC_CACHE/kernels`` (default ``~/.cache/optimum_mc``),
named by a hash of source, flags and CPU, written to a temporary file and renamed into place, then loaded with
ctypes (which releases the GIL during calls). Without a compiler, when the build fails, or with
``OPTIMUM_MC_CPU_KERNEL=reference``, the pure-torch reference serves the CPU instead (one warning is logged).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import weakref
from pathlib import Path

import torch

from ..filecheck import digest_path, find_verified
from ..packing import SUPPORTED_BITS, WORD_BITS
from .reference import dequantize_reference, qmatmul_reference

logger = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")  # the kernels, one file per concern (csrc/mc_kernels.c lists them)
SOURCE = CSRC / "mc_kernels.c"  # the translation unit compiled: it includes the other files
FLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC")
ENV_KERNEL = "OPTIMUM_MC_CPU_KERNEL"
ENV_AMX = "OPTIMUM_MC_CPU_AMX"  # "0": never use the AMX prefill kernel
ENV_AVX512BF16 = "OPTIMUM_MC_CPU_AVX512BF16"  # "0": never use the AVX512-BF16 prefill kernels
ENV_MARCH = "OPTIMUM_MC_CPU_MARCH"  # e.g. "haswell": build for that -march instead of native (emulation)
ENV_BF16_DOT = "OPTIMUM_MC_CPU_BF16_DOT"  # "dp" / "fma": which AVX512-BF16 prefill kernel (default: by CPU vendor)
GEMV_MAX_ROWS = 12  # x rows up to which the fused GEMV beats dequantize + BLAS (measured: docs/kernels.md)
AMX_MIN_ROWS = 6  # bf16 rows from which the AMX prefill kernel beats the fused GEMV (measured: docs/kernels.md)
# tokens up to which the whole-layer MoE decode kernel with int8 activations (mc_moe_decode) beats the grouped
# prefill path: 2.2x at 16 tokens, 1.2x at 32, 0.95x at 40 (Mixtral of 1/4 width, 2/3-bit experts, bf16, 2 threads;
# scripts/bench_kernels.py --moe-decode-crossover; docs/kernels.md). Without int8 activations the fp32 limbs cost
# 4x the integer dots and the decode kernel stops at GEMV_MAX_ROWS.
MOE_DECODE_MAX_TOKENS_INT8 = 32
# weight block dequantized per BLAS call (QuantLinear and the MoE prefill). Measured on one Mixtral expert layer, 256
# tokens, fp32: 16 MiB beat 4/8/12/24/32/64 MiB at 2 threads (973 ms vs 1055 at 8 MiB and 1411 at 64 MiB) and 8 MiB
# at 1 thread (1725 vs 1871 ms): smaller blocks cost BLAS efficiency, larger ones fall out of the caches
GEMM_BLOCK_BYTES = 16 << 20

_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


def cache_dir() -> Path:
    """Where compiled kernels are kept: ``$OPTIMUM_MC_CACHE/kernels`` or ``~/.cache/optimum_mc/kernels``."""
    root = os.environ.get("OPTIMUM_MC_CACHE") or Path.home() / ".cache" / "optimum_mc"
    return Path(root) / "kernels"


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def _cpu_id() -> str:
    """What ``-march=native`` depends on: the CPU model and feature flags (falls back to the platform)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    keys = ("model name", "flags", "Features", "CPU part")
    return "|".join(dict.fromkeys(line for line in lines if line.split(":")[0].strip() in keys))


def build(cc: str, flags: tuple[str, ...] = FLAGS, announce: bool = True) -> Path:
    """Compile the kernels with ``cc`` unless a build for this source, flags and CPU is cached; return its path.
    ``announce``: log one line before compiling (a fallback build after a rejected flag set says nothing more)."""
    parts = [SOURCE.read_bytes()] + [f.name.encode() + f.read_bytes() for f in sorted(CSRC.glob("*.[ch]"))]
    key_src = b"\0".join([*parts, " ".join((cc, *flags)).encode(), platform.machine().encode()])
    key = hashlib.sha256(key_src + _cpu_id().encode()).hexdigest()[:16]
    cached, bad = find_verified(cache_dir(), f"mc_cpu_{key}", ".so")  # issue 11: never dlopen a damaged file
    if bad:
        logger.warning("optimum-mc: removed damaged cached CPU kernels %s (checksum mismatch); rebuilding", bad[0])
    if cached is not None:
        return cached
    cache_dir().mkdir(parents=True, exist_ok=True)
    # said before the wait (5 s on a quiet machine, much longer on a busy one), so a first run's time is not read as
    # the quantized model's speed (issue 20)
    if announce:
        logger.warning(
            "optimum-mc: compiling the CPU kernels for this CPU, once (a few seconds; kept in %s)", cache_dir()
        )
    fd, tmp = tempfile.mkstemp(prefix=f"mc_cpu_{key}", suffix=".tmp.so", dir=cache_dir())
    os.close(fd)
    try:
        cmd = [cc, *flags, f"-I{CSRC}", str(SOURCE), "-o", tmp, "-lm"]
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120)
        out = digest_path(cache_dir(), f"mc_cpu_{key}", ".so", tmp)  # the name carries a checksum of the bytes
        os.replace(tmp, out)  # atomic: concurrent builders never load a half-written file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@functools.cache
def i8dot_available() -> bool:
    """Whether the integer-dot decode kernels (AVX512-VNNI/VBMI) run on this CPU and build."""
    lib = library()
    return lib is not None and bool(lib.mc_i8dot_available())


def int8_decode(mode: str, dtype: torch.dtype) -> bool:
    """Whether a CPU decode GEMV takes int8 activations under ``decode_activations=mode``: always for ``"int8"``;
    for ``"auto"`` when the inputs are bf16 / fp16 (they carry 8 / 11 significant bits, so per-group int8 rounding
    adds an error of their own order) and the CPU has the integer-dot kernels; never for ``"float"``."""
    if mode == "int8":
        return True
    return mode == "auto" and dtype in (torch.bfloat16, torch.float16) and i8dot_available()


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None when the reference serves the CPU (disabled, or not buildable)."""
    if os.environ.get(ENV_KERNEL, "").strip().lower() == "reference":
        return None
    if sys.byteorder != "little":  # the kernels read int32 words as a little-endian byte stream
        logger.warning("optimum-mc: big-endian CPU; CPU kernels fall back to the pure-torch reference")
        return None
    cc = _compiler()
    if cc is None:
        logger.warning("optimum-mc: no C compiler found ($CC, cc, gcc, clang); using the slow pure-torch reference")
        return None
    first_error = None
    for i, flags in enumerate(fallback_flags()):
        try:
            lib = load(build(cc, flags, announce=i == 0))
        except subprocess.CalledProcessError as exc:
            first_error = first_error or exc.stderr
            continue
        except (OSError, subprocess.SubprocessError) as exc:
            logger.warning("optimum-mc: building the CPU kernels failed (%s); using the pure-torch reference", exc)
            return None
        if flags != fallback_flags()[0]:
            dropped = " ".join(f for f in fallback_flags()[0] if f not in flags)
            logger.warning(
                "optimum-mc: %s rejected %s; CPU kernels built without it (%s)", cc, dropped,
                "single-threaded" if "-fopenmp" in dropped else "generic instruction set",
            )  # fmt: skip
        return lib
    logger.warning("optimum-mc: building the CPU kernels failed; using the pure-torch reference:\n%s", first_error)
    return None


def fallback_flags() -> tuple[tuple[str, ...], ...]:
    """Compiler flag sets tried in order. A compiler without OpenMP (Apple's clang) or one that rejects
    ``-march=native`` still builds the C kernels (the OpenMP pragmas are then ignored: one thread; the vector
    kernels are guarded by the instruction sets the compiler targets) instead of leaving the slow pure-torch
    reference to serve every call. ``OPTIMUM_MC_CPU_MARCH=<arch>`` builds for ``-march=<arch>`` instead of
    ``-march=native`` (to emulate an older CPU, e.g. ``haswell`` for AVX2 only, on a newer one)."""
    march = os.environ.get(ENV_MARCH, "").strip()
    flags = tuple(f"-march={march}" if f == "-march=native" and march else f for f in FLAGS)
    no_omp = tuple(f for f in flags if f != "-fopenmp")
    return flags, no_omp, tuple(f for f in no_omp if not f.startswith("-march="))


def _open(path: Path) -> ctypes.CDLL:
    """``ctypes.CDLL(path)`` with passive OpenMP waiting for the kernels' OpenMP runtime (unless the user set
    ``OMP_WAIT_POLICY``). Where that runtime is not torch's (pip's torch bundles ``libgomp.so.1``, which the kernels
    then share; a torch on Intel OpenMP does not), spinning idle threads of one starve the other (GPTQ's small torch
    ops ran 5-10x slower once the kernels had run). A runtime reads the variable when it is loaded, so it is set only
    for that moment: the process's environment is left as the user set it."""
    if "OMP_WAIT_POLICY" in os.environ:
        return ctypes.CDLL(str(path))
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        return ctypes.CDLL(str(path))
    finally:
        del os.environ["OMP_WAIT_POLICY"]


def load(path: Path) -> ctypes.CDLL:
    """Load a built kernel library and declare its C signatures."""
    lib = _open(path)
    missing = [name for name in ("mc_dequantize", "mc_gemv") if not hasattr(lib, name)]
    if missing:  # issue 11: an OSError makes library() fall back to the reference with one warning
        raise OSError(f"{path} lacks the symbols {missing}; delete it to rebuild")
    lib.mc_dequantize.argtypes = [_P, _P, _P, _P, _I64, _I64, _INT, _I64, _INT]
    lib.mc_dequantize.restype = _INT
    lib.mc_gemv.argtypes = [_P, _P, _P, _P, _P, _I64, _I64, _I64, _INT, _I64, _INT]
    lib.mc_gemv.restype = _INT
    lib.mc_gemv_i8.argtypes = [_P, _P, _P, _P, _P, _I64, _I64, _I64, _INT, _I64, _INT]
    lib.mc_gemv_i8.restype = _INT
    lib.mc_dequantize_bf16.argtypes = [_P, _P, _P, _P, _I64, _I64, _INT, _I64, _INT]
    lib.mc_dequantize_bf16.restype = _INT
    lib.mc_moe_gemv.argtypes = [_P, _P, _P, _P, _P, _P, _P, _I64, _P, _I64, _I64, _I64, _INT, _INT]
    lib.mc_moe_gemv.restype = _INT
    decode_args = [_P, _I64, _I64, _P, _P, *[_P] * 7, *[_I64] * 5, _INT, _P, _INT, ctypes.c_float, _P, _INT, _P, _P]
    lib.mc_moe_decode.argtypes = decode_args
    lib.mc_moe_decode.restype = _INT
    lib.mc_i8dot_available.argtypes = []
    lib.mc_i8dot_available.restype = _INT
    lib.mc_amx_available.argtypes = []
    lib.mc_amx_available.restype = _INT
    lib.mc_amx_linear.argtypes = [_P, _I64, _I64, _P, _P, _P, _I64, _INT, _I64, _P, _I64, _INT]
    lib.mc_amx_linear.restype = _INT
    lib.mc_bf16_available.argtypes = []
    lib.mc_bf16_available.restype = _INT
    lib.mc_bf16_linear.argtypes = lib.mc_amx_linear.argtypes
    lib.mc_bf16_linear.restype = _INT
    lib.mc_bf16_linear_fma.argtypes = lib.mc_amx_linear.argtypes
    lib.mc_bf16_linear_fma.restype = _INT
    lib.mc_fma_available.argtypes = []
    lib.mc_fma_available.restype = _INT
    lib.mc_fma_linear.argtypes = lib.mc_amx_linear.argtypes
    lib.mc_fma_linear.restype = _INT
    lib.mc_amx_linear_epi.argtypes = [_P, _I64, _I64, _P, _P, _P, _I64, _INT, _I64, _P, _INT]
    lib.mc_amx_linear_epi.restype = _INT
    lib.mc_moe_epilogue.argtypes = [_P, _P, _I64, _I64, _I64, _INT]
    lib.mc_moe_epilogue.restype = _INT
    return lib


def _switched_off(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("0", "false", "no", "off")


@functools.cache
def amx_available() -> bool:
    """Whether the AMX bf16 prefill kernel runs here (CPU, compiler and kernel support; asked once).
    ``OPTIMUM_MC_CPU_AMX=0`` turns it off (the non-AMX paths can then be measured and tested on an AMX CPU)."""
    if _switched_off(ENV_AMX):
        return False
    lib = library()
    return lib is not None and bool(lib.mc_amx_available())


@functools.cache
def avx512bf16_available() -> bool:
    """Whether the AVX512-BF16 bf16 prefill kernel (``mc_bf16_linear``) runs here (built with AVX512-BF16, which
    ``-march=native`` only enables on a CPU that has it; asked once). ``OPTIMUM_MC_CPU_AVX512BF16=0`` turns it off
    (bf16 prefill then takes the fallback of CPUs without it)."""
    if _switched_off(ENV_AVX512BF16):
        return False
    lib = library()
    return lib is not None and bool(lib.mc_bf16_available())


@functools.cache
def fma_available() -> bool:
    """Whether the AVX2 + FMA prefill kernel (``mc_fma_linear``: fp32 inputs, exactly dequantized fp32 weights,
    fp32 FMA sums) is built; it serves bf16 prefill on CPUs without AVX512-BF16 (asked once)."""
    lib = library()
    return lib is not None and bool(lib.mc_fma_available())


@functools.cache
def bf16_dot() -> str:
    """Which AVX512-BF16 prefill kernel serves bf16 prefill without AMX: ``"dp"`` (``mc_bf16_linear``,
    vdpbf16ps) or ``"fma"`` (``mc_bf16_linear_fma``, fp32 FMA on the same bf16-rounded weights; same contract).
    ``OPTIMUM_MC_CPU_BF16_DOT`` picks one; by default AMD CPUs get ``"dp"`` (Zen 4/5 run vdpbf16ps at the rate of
    fp32 FMA, so twice the products; from published instruction tables, not measured here) and others ``"fma"``
    (measured on Sapphire Rapids: vdpbf16ps at ~1/4 the instruction rate of FMA, the FMA kernel 1.3-1.5x faster)."""
    choice = os.environ.get(ENV_BF16_DOT, "").strip().lower()
    if choice in ("dp", "fma"):
        return choice
    try:
        amd = "AuthenticAMD" in Path("/proc/cpuinfo").read_text()
    except OSError:
        amd = "AMD" in platform.processor()
    return "dp" if amd else "fma"


def _fast_path(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int) -> ctypes.CDLL | None:
    """The library if the C kernels take this matrix, else None: the reference then serves it (or raises the
    typed error, for inputs that skipped ``ops.check_packed``). The C kernels need the canonical dtypes and
    groups of whole 32-code blocks."""
    lib = library()
    if (
        lib is None
        or bits not in SUPPORTED_BITS
        or qweight.dtype != torch.int32
        or scales.dtype != torch.float16
        or zeros.dtype != torch.float16
        or qweight.dim() != 2
        or qweight.numel() == 0
        or scales.shape != zeros.shape
        or scales.shape != (qweight.shape[0], scales.shape[-1])
        or scales.shape[1] == 0
        or qweight.shape[1] * WORD_BITS % bits
        or (qweight.shape[1] * WORD_BITS // bits) % scales.shape[1]
        or (qweight.shape[1] * WORD_BITS // bits // scales.shape[1]) % 32
    ):
        return None
    return lib


def _dequantize_into(lib, out: torch.Tensor, qweight, scales, zeros, bits: int, start: int, stop: int) -> None:
    """Dequantize rows ``start:stop`` of contiguous ``qweight`` / fp16 ``scales`` / ``zeros`` into fp32 ``out``."""
    words, groups = qweight.shape[1], scales.shape[1]
    in_f = words * WORD_BITS // bits
    rc = lib.mc_dequantize(
        qweight.data_ptr() + start * words * 4,
        scales.data_ptr() + start * groups * 2,
        zeros.data_ptr() + start * groups * 2,
        out.data_ptr(),
        stop - start,
        in_f,
        bits,
        in_f // groups,
        torch.get_num_threads(),
    )
    if rc:
        raise MemoryError("optimum-mc CPU dequantize could not allocate its row buffer")


def dequantize_cpu(qweight, scales, zeros, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """CPU implementation of ``optimum_mc::dequantize``."""
    lib = _fast_path(qweight, scales, zeros, bits)
    if lib is None:
        return dequantize_reference(qweight, scales, zeros, bits, dtype)
    qw, s, z = qweight.contiguous(), scales.contiguous(), zeros.contiguous()
    out = torch.empty(qw.shape[0], qw.shape[1] * WORD_BITS // bits, dtype=torch.float32)
    _dequantize_into(lib, out, qw, s, z, bits, 0, qw.shape[0])
    return out.to(dtype)


def bf16_prefill_kernel(lib: ctypes.CDLL, in_f: int, group: int, bits: int):
    """The fused kernel multiplying bf16 rows by ``bf16(W)`` with fp32 sums that this CPU runs for a matrix of
    ``in_f`` columns in groups of ``group`` at ``bits`` (AMX, else AVX512-BF16), or None (shapes it does not take,
    or neither unit)."""
    if in_f % WORD_BITS or group < 32 or group % 32 or in_f % group or bits not in (1, 2, 3, 4, 8):
        return None
    if amx_available():
        return lib.mc_amx_linear
    if avx512bf16_available():
        return lib.mc_bf16_linear if bf16_dot() == "dp" else lib.mc_bf16_linear_fma
    return None


def moe_decode_tokens(int8: bool) -> int:
    """Tokens up to which ``optimum_mc::moe`` on CPU runs the whole layer in one decode call (``mc_moe_decode``)
    rather than the grouped prefill path: :data:`MOE_DECODE_MAX_TOKENS_INT8` with int8 activations
    (:func:`int8_decode`), else :data:`GEMV_MAX_ROWS`."""
    return MOE_DECODE_MAX_TOKENS_INT8 if int8 else GEMV_MAX_ROWS


def gemv_rows(lib: ctypes.CDLL, dtype: torch.dtype, in_f: int, group: int, bits: int) -> int:
    """Rows of ``x`` up to which the fused GEMV serves ``x @ W.T``; more go to :func:`dense_rows`. bf16 rows on AMX
    leave the GEMV earlier (``AMX_MIN_ROWS``): the AMX kernel's cost hardly grows with rows while the GEMV's grows
    linearly (docs/kernels.md); elsewhere ``GEMV_MAX_ROWS``."""
    if dtype == torch.bfloat16 and amx_available() and bf16_prefill_kernel(lib, in_f, group, bits) is not None:
        return AMX_MIN_ROWS - 1
    return GEMV_MAX_ROWS


def dense_rows(lib: ctypes.CDLL, x: torch.Tensor, qw, s, z, bits: int, out: torch.Tensor) -> None:
    """``out = x @ W.T`` for many rows (prefill), ``out`` fp32. bf16 ``x``: a fused kernel (AMX, else AVX512-BF16,
    :func:`bf16_prefill_kernel`) that dequantizes small blocks of ``W`` into bf16 and multiplies them while they are
    in cache; on CPUs with neither, ``x`` is widened to fp32 (without AVX512-BF16, bf16 BLAS is several times slower
    than fp32 BLAS; docs/kernels.md) and the fused AVX2 + FMA kernel multiplies it with exactly dequantized fp32
    weights. fp32 ``x`` (and the AVX2 kernel's absence): row blocks of ``W`` are dequantized into fp32 and
    multiplied with fp32 BLAS."""
    out_f, in_f = qw.shape[0], x.shape[1]
    groups, words = s.shape[1], qw.shape[1]
    fused = None
    if x.dtype == torch.bfloat16 and out.is_contiguous():
        fused = bf16_prefill_kernel(lib, in_f, in_f // groups, bits)
        if fused is None and fma_available():
            x, fused = x.float(), lib.mc_fma_linear
    if fused is not None:
        # dequantized blocks of rows go straight into the tile unit / the multiply-add registers
        rc = fused(
            x.data_ptr(), x.shape[0], in_f, qw.data_ptr(), s.data_ptr(), z.data_ptr(), out_f, bits,
            in_f // groups, out.data_ptr(), out.stride(0), torch.get_num_threads(),
        )  # fmt: skip
        if rc == -2:
            raise MemoryError("optimum-mc CPU prefill kernel could not allocate its buffers")
        if rc == 0:
            return
    if x.dtype != torch.float32:
        x = x.float()
    block = max(1, min(out_f, GEMM_BLOCK_BYTES // (4 * in_f)))
    buf = torch.empty(block, in_f, dtype=torch.float32)
    for start in range(0, out_f, block):
        stop = min(out_f, start + block)
        rc = lib.mc_dequantize(
            qw.data_ptr() + start * words * 4, s.data_ptr() + start * groups * 2, z.data_ptr() + start * groups * 2,
            buf.data_ptr(), stop - start, in_f, bits, in_f // groups, torch.get_num_threads(),
        )  # fmt: skip
        if rc:
            raise MemoryError("optimum-mc CPU dequantize could not allocate its row buffer")
        if block == out_f and out.dtype == torch.float32 and out.is_contiguous():
            torch.mm(x, buf.t(), out=out)  # the whole matrix in one block: straight into the output rows
        else:
            out[:, start:stop] = torch.mm(x, buf[: stop - start].t())


# packed matrices found fit for the C kernels as they are (contiguous): id(qweight) -> weak references to the three
# buffers, the bits and qweight's address. A hit skips _fast_path's checks (~4 µs, a fifth of a small decode GEMV).
_FIT: dict[int, tuple] = {}


def _fit(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int) -> bool:
    """Whether these exact buffers were already found fit (same objects, same memory, same bits)."""
    hit = _FIT.get(id(qweight))
    return (
        hit is not None
        and hit[0]() is qweight
        and hit[1]() is scales
        and hit[2]() is zeros
        and hit[3] == bits
        and hit[4] == qweight.data_ptr()
    )


def _remember_fit(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int) -> None:
    key = id(qweight)
    if key not in _FIT:
        weakref.finalize(qweight, _FIT.pop, key, None)  # the id is free again once the tensor is gone
    _FIT[key] = (weakref.ref(qweight), weakref.ref(scales), weakref.ref(zeros), bits, qweight.data_ptr())


def qmatmul_cpu(x, qweight, scales, zeros, bits: int, decode_activations: str = "float") -> torch.Tensor:
    """CPU implementation of ``optimum_mc::qmatmul``: fused GEMV for few rows (int8 activations per
    :func:`int8_decode`), dequantize + BLAS otherwise."""
    lib = library() if _fit(qweight, scales, zeros, bits) else None
    if lib is None:
        lib = _fast_path(qweight, scales, zeros, bits)
        if lib is None:
            return qmatmul_reference(x, qweight, scales, zeros, bits)
        if qweight.is_contiguous() and scales.is_contiguous() and zeros.is_contiguous():
            _remember_fit(qweight, scales, zeros, bits)
        else:
            qweight, scales, zeros = qweight.contiguous(), scales.contiguous(), zeros.contiguous()
    return qmatmul_validated(lib, x, qweight, scales, zeros, bits, int8_decode(decode_activations, x.dtype))


def qmatmul_validated(lib: ctypes.CDLL, x: torch.Tensor, qw, s, z, bits: int, int8: bool = False) -> torch.Tensor:
    """``qmatmul`` on a packed matrix already known to suit the C kernels (contiguous, canonical dtypes and shapes:
    checked by :func:`_fast_path`, or once by the module holding it) and ``x`` with ``in_features`` columns.
    ``int8``: a few rows (decode) go through the int8-activation GEMV (``decode_activations="int8"``)."""
    out_f, in_f, flat = qw.shape[0], x.shape[-1], x.dim() == 2
    xf = x if flat else x.reshape(-1, in_f)
    rows = xf.shape[0]
    if rows == 0:
        return x.new_zeros((*x.shape[:-1], out_f))
    # (the common decode case, a row or two, never asks the bf16 kernels: below AMX_MIN_ROWS every path is the GEMV)
    limit = GEMV_MAX_ROWS if rows < AMX_MIN_ROWS else gemv_rows(lib, xf.dtype, in_f, in_f // s.shape[1], bits)
    if xf.dtype != torch.float32 and not (rows > limit and xf.dtype == torch.bfloat16):
        xf = xf.float()  # bf16 prefill rows stay bf16: dense_rows multiplies them by bf16(W)
    if not xf.is_contiguous():
        xf = xf.contiguous()
    if rows > limit:  # bf16: the fused prefill kernels; fp32: dequantized blocks of W and BLAS
        y = torch.empty(rows, out_f, dtype=torch.float32)
        dense_rows(lib, xf, qw, s, z, bits, y)
    else:
        y = torch.empty(rows, out_f, dtype=torch.float32)
        rc = (lib.mc_gemv_i8 if int8 else lib.mc_gemv)(
            xf.data_ptr(), qw.data_ptr(), s.data_ptr(), z.data_ptr(), y.data_ptr(),
            rows, out_f, in_f, bits, in_f // s.shape[1], torch.get_num_threads(),
        )  # fmt: skip
        if rc == -2:
            raise MemoryError("optimum-mc CPU GEMV could not allocate its buffers")
        if rc:
            raise RuntimeError(f"optimum-mc CPU GEMV rejected bits={bits}, rows={rows} (internal error)")
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    return y if flat else y.view(*x.shape[:-1], out_f)


_LIB = None


def register() -> None:
    """Register the CPU implementations of both ops; the dispatcher then picks them for CPU tensors (idempotent)."""
    global _LIB
    if _LIB is None:
        _LIB = torch.library.Library("optimum_mc", "IMPL")
        _LIB.impl("dequantize", dequantize_cpu, "CPU")
        _LIB.impl("qmatmul", qmatmul_cpu, "CPU")
