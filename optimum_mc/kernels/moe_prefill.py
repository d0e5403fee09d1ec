"""Many tokens (prefill) through ``optimum_mc::moe`` on CPU: the grouped path of :mod:`.moe_cpu`.

Token-expert pairs are sorted by expert (dropped slots sort last and are never computed). Each projection then
runs over every expert, expert after expert in index order, and its fp32 sums go through an epilogue
(``csrc/moe_epilogue.c``) instead of torch ops:

- gate/up: ``glu(gate + b, up + b)`` (:data:`~.activations.GATED`) written as the activated hidden ``(pairs, I)``,
  bf16 for bf16 hidden states (rounded as torch's cast), else fp32;
- down: ``out[token] += (y + b) * weight``, the same fp32 operations in the same order as adding the bias,
  multiplying by the routing weight and ``index_add_`` (so that part is bit-identical to those torch ops).

On AMX with bf16 hidden states the epilogue runs inside the prefill kernel (``mc_amx_linear_epi``) on each block of
sums while it is in L1; the fused gate/up takes 16 gate and the matching 16 up rows of the weight per block, so no
``(pairs, 2I)`` tensor exists. Elsewhere (experts with few rows: the grouped GEMV ``mc_moe_gemv``; the AVX512-BF16,
AVX2 and fp32 BLAS paths of :func:`.cpu.dense_rows`) an expert's sums land in an fp32 scratch and
``mc_moe_epilogue`` applies the same epilogue. The activation's exp is a ~1 ulp AVX-512 polynomial, torch's is
Sleef's: the activated hidden agrees with ``GATED`` to a few fp32 ulp (relu: exactly).
"""

from __future__ import annotations

import ctypes

import torch

from ..bitwidths import from_op_bits
from . import cpu
from .moe import check_index_values

# mc_moe_decode's / the epilogue's activation argument
ACT_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3, "clamped_swiglu": 4}
STORE, GLU, SCATTER = 0, 1, 2  # the epilogue modes (csrc/moe_epilogue.c)


class Epilogue(ctypes.Structure):
    """``mc_epi`` (csrc/moe_epilogue.c): where a prefill kernel's sums go."""

    _fields_ = [
        ("mode", ctypes.c_int32), ("act", ctypes.c_int32), ("out_bf16", ctypes.c_int32), ("reserved", ctypes.c_int32),
        ("inter", ctypes.c_int64), ("ld", ctypes.c_int64), ("out", ctypes.c_void_p), ("bias", ctypes.c_void_p),
        ("weight", ctypes.c_void_p), ("dst", ctypes.c_void_p),
    ]  # fmt: skip


def ptrs(ts) -> ctypes.Array:
    return (ctypes.c_int64 * len(ts))(*(t.data_ptr() for t in ts))


def _check(rc: int, what: str) -> None:
    if rc == -2:
        raise MemoryError(f"optimum-mc CPU MoE {what} could not allocate its buffers")
    if rc:
        raise RuntimeError(f"optimum-mc CPU MoE {what} failed with code {rc} (internal error)")


def _project(lib, x: torch.Tensor, mats, bits: list[int], starts: list[int], counts: list[int], out_f: int,
             epilogue) -> None:  # fmt: skip
    """Rows ``starts[e] : starts[e] + counts[e]`` of ``x`` (fp32, or bf16) times expert ``e``'s weight, for every
    expert in index order, the sums going through ``epilogue(e, start)`` (an :class:`Epilogue`)."""
    qws, ss, zs = mats
    rows, in_f = x.shape
    group, threads = in_f // ss[0].shape[1], torch.get_num_threads()
    by_width = {b: cpu.gemv_rows(lib, x.dtype, in_f, group, b) for b in set(bits)}
    small = [c if c <= by_width[b] else 0 for c, b in zip(counts, bits)]
    y = None
    if any(small):  # one grouped GEMV for every expert with few rows; its sums land in y's rows
        y = torch.empty(rows, out_f, dtype=torch.float32)
        xf = x if x.dtype == torch.float32 else x.float()
        # tables referenced by name until the call returns (a temporary's memory could be reused before it)
        tables = (ptrs(qws), ptrs(ss), ptrs(zs), (ctypes.c_int32 * len(bits))(*bits),
                  (ctypes.c_int64 * len(bits))(*starts), (ctypes.c_int64 * len(bits))(*small))  # fmt: skip
        rc = lib.mc_moe_gemv(xf.data_ptr(), *tables, len(bits), y.data_ptr(), out_f, in_f, group, threads, 0)
        if rc not in (0, -2):
            raise RuntimeError(f"optimum-mc CPU MoE GEMV rejected bits={bits} (internal error)")
        _check(rc, "GEMV")
    amx = x.dtype == torch.bfloat16 and cpu.amx_available()
    scratch = None
    for e, (a, c) in enumerate(zip(starts, counts)):
        if not c:
            continue
        epi = epilogue(e, a)
        if small[e]:
            _check(lib.mc_moe_epilogue(ctypes.addressof(epi), y[a].data_ptr(), out_f, c, out_f, threads), "epilogue")
            continue
        xe = x[a : a + c]
        if amx and cpu.bf16_prefill_kernel(lib, in_f, group, bits[e]) is not None:
            rc = lib.mc_amx_linear_epi(
                xe.data_ptr(), c, in_f, qws[e].data_ptr(), ss[e].data_ptr(), zs[e].data_ptr(), out_f, bits[e],
                group, ctypes.addressof(epi), threads,
            )  # fmt: skip
            if rc != -1:  # -1: a shape the fused kernel does not take (the GLU needs I % 16 == 0)
                _check(rc, "AMX prefill kernel")
                continue
        if scratch is None:
            scratch = torch.empty(max(counts), out_f, dtype=torch.float32)
        cpu.dense_rows(lib, xe, qws[e], ss[e], zs[e], bits[e], scratch[:c])
        _check(lib.mc_moe_epilogue(ctypes.addressof(epi), scratch.data_ptr(), out_f, c, out_f, threads), "epilogue")


def prefill(lib, x, top_k_index, top_k_weights, gu, dn, bits: list[int], activation: str,
            biases=(None, None)) -> torch.Tensor:  # fmt: skip
    """Many tokens: pairs sorted by expert, each projection grouped over the experts with its epilogue fused."""
    num_experts, (tokens, k), hidden = len(gu[0]), top_k_index.shape, x.shape[1]
    gu_bits, dn_bits = from_op_bits(bits, num_experts)
    check_index_values(top_k_index, num_experts)
    flat = top_k_index.reshape(-1).long()
    counts = torch.bincount(flat, minlength=num_experts + 1)[:num_experts].tolist()
    pairs = torch.argsort(flat, stable=True)[: sum(counts)]  # dropped slots (index E) sort last
    token = (pairs // k).contiguous()
    starts = [0] * num_experts
    for e in range(1, num_experts):
        starts[e] = starts[e - 1] + counts[e - 1]
    keep_bf16 = x.dtype == torch.bfloat16
    xg = x.index_select(0, token)
    xg = xg.contiguous() if keep_bf16 else xg.float().contiguous()
    inter = gu[0][0].shape[0] // 2
    gb, db = (None if b is None else b.float().contiguous() for b in biases)
    h = torch.empty(len(pairs), inter, dtype=xg.dtype)  # the activated hidden: bf16 for bf16 hidden states
    out = torch.zeros(tokens, hidden, dtype=torch.float32)
    weights = top_k_weights.reshape(-1).index_select(0, pairs).float().contiguous()
    act, hs = ACT_CODES[activation], h.element_size()

    def glu(e: int, a: int) -> Epilogue:
        bias = None if gb is None else gb[e].data_ptr()
        return Epilogue(GLU, act, int(keep_bf16), 0, inter, inter, h.data_ptr() + a * inter * hs, bias)

    def scatter(e: int, a: int) -> Epilogue:
        bias = None if db is None else db[e].data_ptr()
        return Epilogue(SCATTER, 0, 0, 0, 0, hidden, out.data_ptr(), bias, weights.data_ptr() + 4 * a,
                        token.data_ptr() + 8 * a)  # fmt: skip

    _project(lib, xg, gu, gu_bits, starts, counts, 2 * inter, glu)
    _project(lib, h, dn, dn_bits, starts, counts, hidden, scatter)
    return out.to(x.dtype)
