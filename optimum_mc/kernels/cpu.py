"""The fast CPU path: C kernels (``cpu_kernels.c``) compiled on first use and registered for the "cpu" key.

- ``dequantize``: multithreaded unpack + ``(q - zero) * scale``, bit-identical to the reference.
- ``qmatmul`` with few rows (decode, <= ``GEMV_MAX_ROWS``): a lookup-table GEMV reading the packed bits directly
  (no dequantized copy); with more rows (prefill): dequantize once in C, then BLAS matmul.

The library is built with the system C compiler into ``$OPTIMUM_MC_CACHE`` (default ``~/.cache/optimum_mc``),
named by a hash of source, flags and machine, written to a temporary file and renamed into place. Without a
compiler, or with ``OPTIMUM_MC_CPU_KERNEL=reference``, the pure-torch reference serves the CPU instead.
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
from pathlib import Path

import torch

from .reference import dequantize_reference, qmatmul_reference

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC")
GEMV_MAX_ROWS = 4

_P = ctypes.c_void_p
_I = ctypes.c_int64


def _cache_dir() -> Path:
    return Path(os.environ.get("OPTIMUM_MC_CACHE", Path.home() / ".cache" / "optimum_mc")) / "kernels"


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def _build() -> Path | None:
    cc = _compiler()
    if cc is None:
        return None
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + " ".join((cc, *FLAGS, platform.machine(), platform.node())).encode()).hexdigest()[:16]
    out = _cache_dir() / f"mc_cpu_{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp], check=True, capture_output=True, timeout=120)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None (reference path) when disabled or not buildable."""
    if os.environ.get("OPTIMUM_MC_CPU_KERNEL", "").lower() == "reference" or sys.byteorder != "little":
        return None
    try:
        path = _build()
        if path is None:
            logger.warning("optimum-mc: no C compiler found; CPU kernels fall back to the pure-torch reference")
            return None
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as exc:
        logger.warning("optimum-mc: building the CPU kernels failed (%s); using the pure-torch reference", exc)
        return None
    lib.mc_dequantize.argtypes = [_P, _P, _P, _P, _I, _I, ctypes.c_int, _I]
    lib.mc_gemv_lut.argtypes = [_P, _P, _P, _P, _P, _I, _I, _I, ctypes.c_int, _I]
    lib.mc_gemv_8bit.argtypes = [_P, _P, _P, _P, _P, _I, _I, _I, _I]
    for f in (lib.mc_dequantize, lib.mc_gemv_lut, lib.mc_gemv_8bit):
        f.restype = None
    return lib


def _params(qweight, scales, zeros):
    return qweight.contiguous(), scales.float().contiguous(), zeros.float().contiguous()


def dequantize_cpu(qweight, scales, zeros, bits: int, dtype: torch.dtype) -> torch.Tensor:
    lib = library()
    if lib is None:
        return dequantize_reference(qweight, scales, zeros, bits, dtype)
    qw, s, z = _params(qweight, scales, zeros)
    out_f = qw.shape[0]
    in_f = qw.shape[1] * 32 // bits
    out = torch.empty(out_f, in_f, dtype=torch.float32)
    lib.mc_dequantize(qw.data_ptr(), s.data_ptr(), z.data_ptr(), out.data_ptr(), out_f, in_f, bits, in_f // s.shape[1])
    return out.to(dtype)


def qmatmul_cpu(x, qweight, scales, zeros, bits: int) -> torch.Tensor:
    lib = library()
    if lib is None:
        return qmatmul_reference(x, qweight, scales, zeros, bits)
    out_f = qweight.shape[0]
    in_f = x.shape[-1]
    rows = x.reshape(-1, in_f)
    if rows.shape[0] == 0:
        return x.new_zeros((*x.shape[:-1], out_f))
    if rows.shape[0] > GEMV_MAX_ROWS:
        w = dequantize_cpu(qweight, scales, zeros, bits, torch.float32)
        return (rows.float() @ w.t()).to(x.dtype).reshape(*x.shape[:-1], out_f)
    qw, s, z = _params(qweight, scales, zeros)
    xf = rows.float().contiguous()
    y = torch.empty(rows.shape[0], out_f, dtype=torch.float32)
    group = in_f // s.shape[1]
    ptrs = (xf.data_ptr(), qw.data_ptr(), s.data_ptr(), z.data_ptr(), y.data_ptr())
    if bits == 8:
        lib.mc_gemv_8bit(*ptrs, rows.shape[0], out_f, in_f, group)
    else:
        lib.mc_gemv_lut(*ptrs, rows.shape[0], out_f, in_f, bits, group)
    return y.to(x.dtype).reshape(*x.shape[:-1], out_f)


def register() -> None:
    """Register the CPU implementations of both ops (the dispatcher picks them for CPU tensors)."""
    torch.library.register_kernel("optimum_mc::dequantize", "cpu", dequantize_cpu)
    torch.library.register_kernel("optimum_mc::qmatmul", "cpu", qmatmul_cpu)
