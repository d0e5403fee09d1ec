"""Triton implementation of ``optimum_mc::moe`` for CUDA (testable on CPU with ``TRITON_INTERPRET=1``).

Layout (computed on the device, no device-to-host sync): the ``T * K`` (token, slot) pairs are sorted by expert,
and each expert's run of pairs is padded to a multiple of ``BLOCK_M`` rows, so every block of ``BLOCK_M`` sorted
rows belongs to one expert (``block_expert``; blocks past the last expert's run are idle). Padding rows and dropped
slots (index ``E``) point at the sentinel pair ``T * K`` and are neither loaded nor stored. The row count is bounded
statically by ``T * K + E * (BLOCK_M - 1)``, so the launch grid never depends on routing values.

One launch per projection covers every expert: a program takes one ``BLOCK_M`` block of rows and one ``BLOCK_N``
block of output features, reads its expert's bit-width and the addresses of its packed ``qweight`` / ``scales`` /
``zeros`` from small per-expert tables, and accumulates ``x_tile @ ((q - zero) * scale)ᵀ`` in fp32, decoding the
codes of any bit-width (1-8) from the int32 words at run time. gate_up gathers its input rows by token; down reads
the rows of ``act(gate) * up`` in sorted order. The routing-weighted sum over slots is done in torch.
"""

from __future__ import annotations

import torch

from .activations import ACTIVATIONS
from .triton import TRITON_AVAILABLE

BLOCK_M, BLOCK_N, BLOCK_K = 16, 32, 32

if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    @triton.jit
    def _codes_any_bits(qw_ptr, row, k, words_per_row, bits):
        """Codes at (row, k) (broadcast tensors) for a run-time bit-width, as int32."""
        pos = k * bits
        shift = (pos & 31).to(tl.uint32)
        base = qw_ptr + row * words_per_row + (pos >> 5)
        v = tl.load(base).to(tl.uint32, bitcast=True) >> shift
        straddle = shift + bits > 32
        hi = tl.load(base + 1, mask=straddle, other=0).to(tl.uint32, bitcast=True)
        v = v | tl.where(straddle, hi << (32 - shift), 0)
        return (v & ((1 << bits) - 1)).to(tl.int32)

    @triton.jit
    def _moe_proj_kernel(x_ptr, rows_ptr, block_expert_ptr, qw_tab, s_tab, z_tab, bits_tab, y_ptr, N, K, groups,
                         group_size, num_experts, top_k, sentinel, GATHER: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
        e = tl.load(block_expert_ptr + tl.program_id(0))
        if e < num_experts:
            bits = tl.load(bits_tab + e)
            qw = tl.load(qw_tab + e).to(tl.pointer_type(tl.int32))
            sp = tl.load(s_tab + e).to(tl.pointer_type(tl.float16))
            zp = tl.load(z_tab + e).to(tl.pointer_type(tl.float16))
            words = K * bits // 32
            rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
            pair = tl.load(rows_ptr + rm)
            valid = pair < sentinel
            if GATHER:
                src = tl.where(valid, pair // top_k, 0)
            else:
                src = rm
            rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
            rn_c = tl.where(rn < N, rn, 0)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                xm = valid[:, None] & (rk[None, :] < K)
                x = tl.load(x_ptr + src[:, None] * K + rk[None, :], mask=xm, other=0.0).to(tl.float32)
                kk = tl.where(rk < K, rk, 0)[:, None]
                q = _codes_any_bits(qw, rn_c[None, :], kk, words, bits).to(tl.float32)  # (BLOCK_K, BLOCK_N)
                g = kk // group_size
                s = tl.load(sp + rn_c[None, :] * groups + g).to(tl.float32)
                z = tl.load(zp + rn_c[None, :] * groups + g).to(tl.float32)
                w = tl.where(rk[:, None] < K, (q - z) * s, 0.0)
                acc += tl.dot(x, w, input_precision="ieee")
            tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc, mask=valid[:, None] & (rn[None, :] < N))


def sorted_layout(top_k_index: torch.Tensor, num_experts: int, block_m: int = BLOCK_M):
    """``(rows, block_expert)``: pair ids sorted by expert and padded per expert to ``block_m`` rows (sentinel
    ``T * K`` for padding), and the expert of every ``block_m`` block (``num_experts`` for idle blocks)."""
    flat = top_k_index.reshape(-1).long()
    pairs, dev = flat.numel(), flat.device
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts[:num_experts] + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    count_start = torch.cumsum(counts, 0) - counts
    sorted_e, order = torch.sort(flat, stable=True)
    rank = torch.arange(pairs, device=dev) - count_start[sorted_e]
    max_rows = (pairs + num_experts * (block_m - 1) + block_m - 1) // block_m * block_m
    kept = sorted_e < num_experts
    first = (padded_end - padded)[sorted_e.clamp(max=num_experts - 1)]
    dest = torch.where(kept, first + rank, max_rows)  # dropped slots go to a scratch row past the end
    rows = torch.full((max_rows + 1,), pairs, dtype=torch.long, device=dev)
    rows.scatter_(0, dest, torch.where(kept, order, pairs))
    block_start = torch.arange(0, max_rows, block_m, device=dev)
    block_expert = torch.searchsorted(padded_end, block_start, right=True)
    return rows[:max_rows].contiguous(), block_expert.contiguous()


def _tables(qws, ss, zs, bits, device):
    ptrs = torch.tensor([[t.data_ptr() for t in ts] for ts in (qws, ss, zs)], dtype=torch.int64, device=device)
    return ptrs[0], ptrs[1], ptrs[2], torch.tensor(bits, dtype=torch.int32, device=device)


def triton_moe(x, top_k_index, top_k_weights, gate_up_qweight, gate_up_scales, gate_up_zeros, down_qweight,
               down_scales, down_zeros, bits: list[int], activation: str) -> torch.Tensor:  # fmt: skip
    """``optimum_mc::moe`` with two Triton launches (gate_up for all experts, down for all experts)."""
    from .moe import check_index_values

    check_index_values(top_k_index, len(bits))
    (tokens, hidden), top_k = x.shape, top_k_index.shape[1]
    inter = gate_up_qweight[0].shape[0] // 2
    rows, block_expert = sorted_layout(top_k_index, len(bits))
    sentinel = tokens * top_k
    xc = x.contiguous()
    gu = _tables(gate_up_qweight, gate_up_scales, gate_up_zeros, bits, x.device)
    dn = _tables(down_qweight, down_scales, down_zeros, bits, x.device)

    def launch(inp, tables, out_f, in_f, groups, gather):
        y = torch.empty(rows.numel(), out_f, dtype=torch.float32, device=x.device)
        grid = (block_expert.numel(), triton.cdiv(out_f, BLOCK_N))
        _moe_proj_kernel[grid](inp, rows, block_expert, *tables, y, out_f, in_f, groups, in_f // groups, len(bits),
                               top_k, sentinel, GATHER=gather, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                               BLOCK_K=BLOCK_K)  # fmt: skip
        return y

    h = launch(xc, gu, 2 * inter, hidden, gate_up_scales[0].shape[1], True)
    a = (ACTIVATIONS[activation](h[:, :inter]) * h[:, inter:]).contiguous()
    y = launch(a, dn, hidden, inter, down_scales[0].shape[1], False)
    per_pair = torch.zeros(sentinel + 1, hidden, dtype=torch.float32, device=x.device)
    per_pair.index_add_(0, rows, torch.nan_to_num(y))  # padding rows (never stored) land in the scratch row
    out = (per_pair[:sentinel].view(tokens, top_k, hidden) * top_k_weights.float().unsqueeze(-1)).sum(1)
    return out.to(x.dtype)


def register() -> bool:
    """Register the Triton MoE kernel for the "cuda" key (when Triton imports); return whether it was."""
    if not TRITON_AVAILABLE:
        return False
    torch.library.register_kernel("optimum_mc::moe", "cuda", triton_moe)
    return True
