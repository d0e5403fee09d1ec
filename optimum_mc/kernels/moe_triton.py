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
the rows of ``glu(gate, up)`` in sorted order. The routing-weighted sum over slots is done in torch.

bf16 prefill (at least ``DEQUANT_MIN_PAIRS`` pairs) takes a third path: every expert's matrix is dequantized
into the input dtype (one Triton launch per expert, into one ``(E, N, K)`` buffer per projection, freed after it) and
the sorted rows go through transformers' grouped matmul (``torch.nn.functional.grouped_mm`` where the GPU has it, its
fallback elsewhere), i.e. the dense layer's own kernel; rows of dropped slots sort past the last offset and are
masked, as transformers does for expert parallelism. No device-to-host sync.
"""

from __future__ import annotations

import functools

import torch

from ..bitwidths import from_op_bits
from .activations import GATED
from .triton import TRITON_AVAILABLE, half_mode

if TRITON_AVAILABLE:
    from .triton import _dot_acc, _shapes, _weight_tile, dequantize_into

# (BLOCK_M, BLOCK_N, BLOCK_K, warps): decode-sized calls, and calls whose experts average more than BLOCK_M rows.
# The fastest of 32 candidates on an H200 (scripts/tune_triton_moe.py, Mixtral-shaped layer, fp16; docs/kernels.md)
DECODE_TILES = (16, 16, 128, 4)
PREFILL_TILES = (128, 128, 32, 4)
BLOCK_M = DECODE_TILES[0]
GEMV_MAX_PAIRS = 16  # (token, slot) pairs up to which the per-pair GEMV kernel serves the call
GEMV_TILES = (8, 128, 2)  # BLOCK_N, BLOCK_K, warps of the GEMV kernel: the fastest of 24 on an H200 at 1 and 8 tokens
# (token, slot) pairs from which bf16 prefill dequantizes and uses the grouped matmul. Set from the H200
# numbers, not yet timed as a whole: the tiled kernel took 15.2 ms at 16 pairs and 19.1 ms at 512 where the dense
# fp16 layer took 1.5-2.1 ms, and dequantizing all 8 experts of the layer took 13.4 ms through fp32 (dequantize_into
# writes fp16 directly, less than half the traffic), so past 32 pairs this path should win; scripts/
# tune_triton_moe.py --dequant times both paths to set it.
DEQUANT_MIN_PAIRS = 32
# input dtypes the grouped matmul takes per device type: torch's CUDA grouped_mm expects bf16 (its docstring, torch
# 2.13); fp16 on CUDA keeps the tiled kernel. Other device types (the interpreter's CPU tensors) take both halves.
GROUPED_MM_DTYPES = {"cuda": (torch.bfloat16,)}

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
    def _expert_entry(e, qw_tab, s_tab, z_tab, bits_tab):
        """Expert ``e``'s bit-width and the addresses of its packed codes, scales and zeros, from the tables."""
        bits = tl.load(bits_tab + e)
        qw = tl.load(qw_tab + e).to(tl.pointer_type(tl.int32))
        sp = tl.load(s_tab + e).to(tl.pointer_type(tl.float16))
        zp = tl.load(z_tab + e).to(tl.pointer_type(tl.float16))
        return bits, qw, sp, zp

    @triton.jit
    def _moe_proj_kernel(x_ptr, rows_ptr, block_expert_ptr, qw_tab, s_tab, z_tab, bits_tab, y_ptr, N, K, groups,
                         group_size, num_experts, top_k, sentinel, GATHER: tl.constexpr, HALF: tl.constexpr,
                         GROUP_TILE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr):  # fmt: skip
        e = tl.load(block_expert_ptr + tl.program_id(0))
        if e < num_experts:
            bits, qw, sp, zp = _expert_entry(e, qw_tab, s_tab, z_tab, bits_tab)
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
                kin = rk < K
                x = tl.load(x_ptr + src[:, None] * K + rk[None, :], mask=valid[:, None] & kin[None, :], other=0.0)
                kk = tl.where(kin, rk, 0)[None, :]
                # the weight tile as (BLOCK_N, BLOCK_K), k fastest: neighbouring lanes read neighbouring words
                q = _codes_any_bits(qw, rn_c[:, None], kk, words, bits).to(tl.float32)
                w = _weight_tile(q, sp, zp, rn_c, kk, kin, k0, groups, group_size, GROUP_TILE)
                acc = _dot_acc(acc, x, tl.trans(w), HALF)
            tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc, mask=valid[:, None] & (rn[None, :] < N))

    @triton.jit
    def _moe_gemv_kernel(x_ptr, idx_ptr, qw_tab, s_tab, z_tab, bits_tab, y_ptr, N, K, groups, group_size,
                         num_experts, top_k, GATHER: tl.constexpr, GROUP_TILE: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr):  # fmt: skip
        """Decode: one program per (token, slot) pair and ``BLOCK_N`` output rows; fp32 products, no tiles of
        padding rows (the dot-based kernel computes ``BLOCK_M`` rows per expert whatever the pair count)."""
        p = tl.program_id(0)
        e = tl.load(idx_ptr + p)
        if e < num_experts:
            bits, qw, sp, zp = _expert_entry(e, qw_tab, s_tab, z_tab, bits_tab)
            words = K * bits // 32
            if GATHER:
                src = p // top_k
            else:
                src = p
            rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
            rn_c = tl.where(rn < N, rn, 0)
            acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                kin = rk < K
                kk = tl.where(kin, rk, 0)[None, :]
                x = tl.load(x_ptr + src * K + rk, mask=kin, other=0.0).to(tl.float32)
                q = _codes_any_bits(qw, rn_c[:, None], kk, words, bits).to(tl.float32)  # (BLOCK_N, BLOCK_K)
                w = _weight_tile(q, sp, zp, rn_c, kk, kin, k0, groups, group_size, GROUP_TILE)
                acc += tl.sum(w * x[None, :], axis=1)
            tl.store(y_ptr + p * N + rn, acc, mask=rn < N)


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
    key = tuple(t.data_ptr() for ts in (qws, ss, zs) for t in ts)
    return _device_tables(key, tuple(bits), str(device))


@functools.lru_cache(maxsize=1024)
def _device_tables(ptrs: tuple[int, ...], bits: tuple[int, ...], device: str):
    """The per-expert address and bit-width tables on the device, built once per set of buffers: a host-to-device
    copy per call would be a sync point and is not allowed inside CUDA-graph capture. The tables hold only the
    addresses they are keyed by, so a reused address gives a table with the right content."""
    t = torch.tensor(ptrs, dtype=torch.int64, device=device).view(3, -1)
    return t[0], t[1], t[2], torch.tensor(bits, dtype=torch.int32, device=device)


def triton_moe(x, top_k_index, top_k_weights, gate_up_qweight, gate_up_scales, gate_up_zeros, down_qweight,
               down_scales, down_zeros, bits: list[int], activation: str, decode_activations: str = "float",
               gate_up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None,
               tiles: tuple[int, int, int, int] | None = None, gemv: bool | None = None,
               dequant: bool | None = None) -> torch.Tensor:  # fmt: skip
    """``optimum_mc::moe`` with two Triton launches (gate_up for all experts, down for all experts).

    fp16/bf16 inputs use tensor-core dots on weights rounded to the input dtype (what a dense layer in that dtype
    computes); fp32 inputs use exact fp32 dots. ``tiles`` (BLOCK_M, BLOCK_N, BLOCK_K, warps) defaults to
    ``DECODE_TILES``, or ``PREFILL_TILES`` once experts average more than BLOCK_M rows (chosen from shapes: no
    device sync). Calls of at most ``GEMV_MAX_PAIRS`` (token, slot) pairs use the per-pair GEMV kernel instead
    (``gemv`` forces the choice); bf16 calls (on CUDA; ``GROUPED_MM_DTYPES``) of at least ``DEQUANT_MIN_PAIRS`` pairs
    dequantize and use the grouped matmul (``dequant`` forces the choice). ``decode_activations`` is a CPU
    decode option, ignored here. Expert biases (gpt-oss) are added in torch to the rows each launch returns, by
    the rows' experts (a zero row for padding and dropped slots).
    """
    from .moe import check_index_values

    experts = len(gate_up_qweight)
    check_index_values(top_k_index, experts)
    gu_bits, dn_bits = from_op_bits(bits, experts)
    (tokens, hidden), top_k = x.shape, top_k_index.shape[1]
    inter = gate_up_qweight[0].shape[0] // 2
    if dequant is None:  # fp32 keeps the exact fp32 dots of the tiled kernel
        grouped = x.dtype in GROUPED_MM_DTYPES.get(x.device.type, (torch.float16, torch.bfloat16))
        dequant = grouped and tiles is None and not gemv and tokens * top_k >= DEQUANT_MIN_PAIRS
    if dequant:
        gu, dn = (gate_up_qweight, gate_up_scales, gate_up_zeros), (down_qweight, down_scales, down_zeros)
        return _dequant_grouped(x, top_k_index, top_k_weights, gu, dn, (gu_bits, dn_bits), activation,
                                (gate_up_bias, down_bias))  # fmt: skip
    if gemv is None:
        gemv = tiles is None and tokens * top_k <= GEMV_MAX_PAIRS
    if gemv:
        project, to_pairs, mid_dtype = _gemv_launcher(x, top_k_index, experts)
        row_expert = top_k_index.reshape(-1)  # rows are the (token, slot) pairs
    else:
        project, to_pairs, row_expert = _tiled_launcher(x, top_k_index, experts, tiles)
        mid_dtype = x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.float32
    gu = _tables(gate_up_qweight, gate_up_scales, gate_up_zeros, gu_bits, x.device)
    dn = _tables(down_qweight, down_scales, down_zeros, dn_bits, x.device)
    h = _plus_bias(project(x.contiguous(), gu, 2 * inter, hidden, gate_up_scales[0].shape[1], True), gate_up_bias,
                   row_expert)  # fmt: skip
    a = GATED[activation](h[:, :inter], h[:, inter:]).to(mid_dtype).contiguous()
    y = to_pairs(_plus_bias(project(a, dn, hidden, inter, down_scales[0].shape[1], False), down_bias, row_expert))
    out = (y.view(tokens, top_k, hidden) * top_k_weights.float().unsqueeze(-1)).sum(1)
    return out.to(x.dtype)


def _plus_bias(y: torch.Tensor, bias: torch.Tensor | None, row_expert: torch.Tensor) -> torch.Tensor:
    """``y`` (rows, N) plus the bias row of each row's expert; rows whose expert is ``E`` (padding, dropped slots)
    get nothing."""
    if bias is None:
        return y
    padded = torch.cat([bias.float(), bias.new_zeros(1, bias.shape[1], dtype=torch.float32)])
    return y.float() + padded.index_select(0, row_expert.long())


def _dequantized(lists, bits: list[int], dtype: torch.dtype) -> torch.Tensor:
    """Every expert's matrix of one projection, dequantized into one ``(E, N, K)`` tensor of ``dtype``."""
    qws, ss, zs = lists
    n, k = _shapes(qws[0], ss[0], bits[0])[:2]
    out = torch.empty(len(bits), n, k, dtype=dtype, device=qws[0].device)
    for e, b in enumerate(bits):
        dequantize_into(out[e], qws[e], ss[e], zs[e], b)
    return out


def _dequant_grouped(x, top_k_index, top_k_weights, gu, dn, bits: tuple[list[int], list[int]],
                     activation: str, biases=(None, None)) -> torch.Tensor:  # fmt: skip
    """Prefill: dequantize each projection of all experts, then transformers' grouped matmul on the sorted rows.
    ``bits``: the gate/up and the down widths."""
    from transformers.integrations.moe import _grouped_linear

    experts, (tokens, top_k) = len(gu[0]), top_k_index.shape
    dtype = x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.float32
    flat = top_k_index.reshape(-1)
    sorted_e, perm = torch.sort(flat, stable=True)  # dropped slots (index E) sort last
    counts = torch.zeros(experts + 1, dtype=torch.int64, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
    offsets = torch.cumsum(counts[:experts], 0).to(torch.int32)
    dropped = (sorted_e >= experts).unsqueeze(-1)  # rows past the last offset: left unwritten by the kernel
    rows = x.to(dtype)[perm // top_k]
    inter = gu[0][0].shape[0] // 2
    h = _grouped_linear(rows, _dequantized(gu, bits[0], dtype), offsets).masked_fill(dropped, 0)
    h = _plus_bias(h, biases[0], sorted_e)
    a = GATED[activation](h[:, :inter].float(), h[:, inter:].float()).to(dtype)
    y = _plus_bias(_grouped_linear(a, _dequantized(dn, bits[1], dtype), offsets).float(), biases[1], sorted_e)
    y = y.masked_fill(dropped, 0) * top_k_weights.reshape(-1)[perm].float().unsqueeze(-1)
    out = torch.zeros(tokens, x.shape[1], dtype=torch.float32, device=x.device)
    out.index_add_(0, perm // top_k, y)
    return out.to(x.dtype)


def _tiled_launcher(x, top_k_index, experts: int, tiles):
    """``(project, to_pairs)`` of the tiled kernel: rows sorted by expert and padded (``sorted_layout``);
    ``to_pairs`` puts the down projection's rows back in (token, slot) order."""
    tokens, top_k = top_k_index.shape
    if tiles is None:
        tiles = DECODE_TILES if tokens * top_k <= DECODE_TILES[0] * experts else PREFILL_TILES
    block_m, block_n, block_k, num_warps = tiles
    rows, block_expert = sorted_layout(top_k_index, experts, block_m)
    sentinel = tokens * top_k

    def project(inp, tables, out_f, in_f, groups, gather):
        y = torch.empty(rows.numel(), out_f, dtype=torch.float32, device=x.device)
        grid = (block_expert.numel(), triton.cdiv(out_f, block_n))
        gs = in_f // groups
        _moe_proj_kernel[grid](inp, rows, block_expert, *tables, y, out_f, in_f, groups, gs, experts, top_k,
                               sentinel, GATHER=gather, HALF=half_mode(x.dtype), GROUP_TILE=gs % block_k == 0,
                               BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps)  # fmt: skip
        return y

    def to_pairs(y):
        per_pair = torch.zeros(sentinel + 1, y.shape[1], dtype=torch.float32, device=x.device)
        per_pair.index_add_(0, rows, torch.nan_to_num(y))  # padding rows (never stored) land in the scratch row
        return per_pair[:sentinel]

    # each sorted row's expert (E for padding rows, which point at the sentinel pair)
    row_expert = torch.where(rows < sentinel, block_expert.repeat_interleave(block_m)[: rows.numel()], experts)
    return project, to_pairs, row_expert


def _gemv_launcher(x, top_k_index, experts: int):
    """``(project, to_pairs, intermediate dtype)`` of the per-pair GEMV kernel: rows are already (token, slot)
    pairs; a dropped pair's rows stay 0."""
    tokens, top_k = top_k_index.shape
    pairs = tokens * top_k
    idx = top_k_index.reshape(-1).to(torch.int32).contiguous()

    def project(inp, tables, out_f, in_f, groups, gather):
        y = torch.zeros(pairs, out_f, dtype=torch.float32, device=x.device)
        gs = in_f // groups
        grid = (pairs, triton.cdiv(out_f, GEMV_TILES[0]))
        _moe_gemv_kernel[grid](inp, idx, *tables, y, out_f, in_f, groups, gs, experts, top_k, GATHER=gather,
                               GROUP_TILE=gs % GEMV_TILES[1] == 0, BLOCK_N=GEMV_TILES[0], BLOCK_K=GEMV_TILES[1],
                               num_warps=GEMV_TILES[2])  # fmt: skip
        return y

    return project, (lambda y: y), torch.float32
