"""Triton kernels for the canonical packed format (CUDA; testable on CPU with ``TRITON_INTERPRET=1``).

- ``_dequant_kernel``: packed codes -> ``(q - zero) * scale`` in fp32 (bit-identical to the reference), cast.
- ``_gemm_kernel`` (prefill): tiles of ``x (M, K)`` times a weight tile dequantized in registers, fp32 accumulate.
- ``_gemv_kernel`` (decode, few rows): each program owns ``BLOCK_N`` output rows of one ``x`` row and streams
  the packed words of those rows once.

Codes are read straight from the int32 words: code ``k`` of a row starts at stream bit ``k * bits``, i.e. word
``(k * bits) >> 5``, shift ``(k * bits) & 31``; a 3-bit code that straddles two words takes its high bits from the
next word. Importing this module never fails: ``TRITON_AVAILABLE`` says whether the kernels exist. Triton is only
imported where it can run: with CUDA, or under its CPU interpreter (``TRITON_INTERPRET=1``); elsewhere its ~100 MB
native library would only add to the resident memory of CPU quantization and inference.
"""

from __future__ import annotations

import os

import torch

TRITON_AVAILABLE = False
if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
    try:
        import triton
        import triton.language as tl

        TRITON_AVAILABLE = True
    except ImportError:  # pragma: no cover - Triton is an optional extra
        pass

GEMV_MAX_ROWS = 8

if TRITON_AVAILABLE:

    @triton.jit
    def _codes(qw_ptr, row, k, words_per_row, BITS: tl.constexpr):
        """Codes at (row, k) (broadcast tensors) as int32."""
        pos = k * BITS
        word = pos >> 5
        shift = (pos & 31).to(tl.uint32)
        base = qw_ptr + row * words_per_row + word
        w0 = tl.load(base).to(tl.uint32, bitcast=True)
        v = w0 >> shift
        if BITS == 3:
            straddle = shift > 29
            w1 = tl.load(base + 1, mask=straddle, other=0).to(tl.uint32, bitcast=True)
            v = v | tl.where(straddle, w1 << (32 - shift), 0)
        return (v & ((1 << BITS) - 1)).to(tl.int32)

    @triton.jit
    def _weight_tile(q, s_ptr, z_ptr, rn_c, kk, kin, k0, groups, group_size, GROUP_TILE: tl.constexpr):
        """``(q - zero) * scale`` in fp32 for a ``(BLOCK_N, BLOCK_K)`` tile of codes ``q`` (rows ``rn_c``, columns
        ``kk``, k fastest), 0 where ``kin`` is false. ``GROUP_TILE``: the tile lies inside one quantization group,
        so one scale and zero per row are loaded instead of one per element."""
        if GROUP_TILE:
            s = tl.load(s_ptr + rn_c * groups + k0 // group_size).to(tl.float32)[:, None]
            z = tl.load(z_ptr + rn_c * groups + k0 // group_size).to(tl.float32)[:, None]
        else:
            s = tl.load(s_ptr + rn_c[:, None] * groups + kk // group_size).to(tl.float32)
            z = tl.load(z_ptr + rn_c[:, None] * groups + kk // group_size).to(tl.float32)
        return tl.where(kin[None, :], (q - z) * s, 0.0)

    @triton.jit
    def _dot_acc(acc, x, w, HALF: tl.constexpr):
        """``acc + x @ w`` (fp32 accumulate). ``HALF``: 0 exact fp32; 1 fp16/bf16 ``x`` with ``w`` rounded to its
        dtype, tensor-core dot; 2 the same products in exact fp32 (Triton's CPU interpreter has no bf16 dot)."""
        if HALF == 1:
            return acc + tl.dot(x, w.to(x.dtype))
        elif HALF == 2:
            return acc + tl.dot(x.to(tl.float32), w.to(x.dtype).to(tl.float32), input_precision="ieee")
        return acc + tl.dot(x.to(tl.float32), w, input_precision="ieee")

    @triton.jit
    def _dequant_kernel(qw_ptr, s_ptr, z_ptr, out_ptr, N, K, words_per_row, groups, group_size,
                        BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)[:, None]
        rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]
        ok = (rn < N) & (rk < K)
        rn_c = tl.where(ok, rn, 0)
        rk_c = tl.where(ok, rk, 0)
        q = _codes(qw_ptr, rn_c, rk_c, words_per_row, BITS).to(tl.float32)
        g = rk_c // group_size
        s = tl.load(s_ptr + rn_c * groups + g).to(tl.float32)
        z = tl.load(z_ptr + rn_c * groups + g).to(tl.float32)
        d = q - z
        tl.store(out_ptr + rn * K + rk, (d * s).to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _gemm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, M, N, K, words_per_row, groups, gs, BITS: tl.constexpr,
                     HALF: tl.constexpr, GROUP_TILE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr):  # fmt: skip
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        rn_c = tl.where(rn < N, rn, 0)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            kin = rk < K
            x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & kin[None, :], other=0.0)
            kk = tl.where(kin, rk, 0)[None, :]
            # the weight tile as (BLOCK_N, BLOCK_K), k fastest: neighbouring lanes read neighbouring words
            q = _codes(qw_ptr, rn_c[:, None], kk, words_per_row, BITS).to(tl.float32)
            w = _weight_tile(q, s_ptr, z_ptr, rn_c, kk, kin, k0, groups, gs, GROUP_TILE)
            acc = _dot_acc(acc, x, tl.trans(w), HALF)
        tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N))

    @triton.jit
    def _gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, N, K, words_per_row, groups, group_size,
                     BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
        m = tl.program_id(1)
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rn_c = tl.where(rn < N, rn, 0)[:, None]
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + m * K + rk, mask=rk < K, other=0.0).to(tl.float32)
            kk = tl.where(rk < K, rk, 0)[None, :]
            q = _codes(qw_ptr, rn_c, kk, words_per_row, BITS).to(tl.float32)
            g = kk // group_size
            s = tl.load(s_ptr + rn_c * groups + g).to(tl.float32)
            z = tl.load(z_ptr + rn_c * groups + g).to(tl.float32)
            acc += tl.sum((q - z) * s * x[None, :], axis=1)
        tl.store(y_ptr + m * N + rn, acc, mask=rn < N)


def half_mode(dtype: torch.dtype) -> int:
    """How tiles of ``dtype`` rows are multiplied: 0 exact fp32, 1 tensor-core fp16/bf16, 2 the same products as 1
    in exact fp32 (bf16 under Triton's CPU interpreter, which has no bf16 dot)."""
    if dtype not in (torch.float16, torch.bfloat16):
        return 0
    return 2 if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1" else 1


def _shapes(qweight, scales, bits):
    n, words = qweight.shape
    k = words * 32 // bits
    groups = scales.shape[1]
    return n, k, words, groups, k // groups


def triton_dequantize(qweight, scales, zeros, bits: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    n, k, words, groups, gs = _shapes(qweight, scales, bits)
    out = torch.empty(n, k, dtype=torch.float32, device=qweight.device)
    return dequantize_into(out, qweight, scales, zeros, bits).to(dtype)


def dequantize_into(out: torch.Tensor, qweight, scales, zeros, bits: int) -> torch.Tensor:
    """Dequantize into ``out`` (contiguous ``(n, k)``, any float dtype: the fp32 value ``(q - zero) * scale`` is
    rounded to it on store, as ``.to(dtype)`` would)."""
    n, k, words, groups, gs = _shapes(qweight, scales, bits)
    grid = (triton.cdiv(n, 32), triton.cdiv(k, 64))
    _dequant_kernel[grid](qweight, scales, zeros, out, n, k, words, groups, gs, BITS=bits, BLOCK_N=32, BLOCK_K=64)
    return out


def triton_gemm(x, qweight, scales, zeros, bits: int) -> torch.Tensor:
    n, k, words, groups, gs = _shapes(qweight, scales, bits)
    rows = x.reshape(-1, k).contiguous()
    m = rows.shape[0]
    y = torch.empty(m, n, dtype=torch.float32, device=x.device)
    block_m = 16 if m <= 16 else 64
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, 64))
    _gemm_kernel[grid](rows, qweight, scales, zeros, y, m, n, k, words, groups, gs, BITS=bits,
                       HALF=half_mode(x.dtype), GROUP_TILE=gs % 32 == 0, BLOCK_M=block_m, BLOCK_N=64,
                       BLOCK_K=32)  # fmt: skip
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def triton_gemv(x, qweight, scales, zeros, bits: int) -> torch.Tensor:
    n, k, words, groups, gs = _shapes(qweight, scales, bits)
    rows = x.reshape(-1, k).contiguous()
    m = rows.shape[0]
    y = torch.empty(m, n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n, 32), m)
    _gemv_kernel[grid](rows, qweight, scales, zeros, y, n, k, words, groups, gs, BITS=bits, BLOCK_N=32, BLOCK_K=64)
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def triton_qmatmul(x, qweight, scales, zeros, bits: int, decode_activations: str = "float") -> torch.Tensor:
    """``optimum_mc::qmatmul`` on CUDA (``decode_activations`` is a CPU decode option: ignored here)."""
    rows = x.numel() // x.shape[-1]
    return (triton_gemv if rows <= GEMV_MAX_ROWS else triton_gemm)(x, qweight, scales, zeros, bits)


_LIB = None


def register() -> bool:
    """Register the Triton kernels for the "CUDA" key (when Triton imports); return whether they were."""
    global _LIB
    if not TRITON_AVAILABLE:
        return False
    if _LIB is None:
        _LIB = torch.library.Library("optimum_mc", "IMPL")
        _LIB.impl("dequantize", triton_dequantize, "CUDA")
        _LIB.impl("qmatmul", triton_qmatmul, "CUDA")
    return True
