"""Fused MoE Triton kernels over the GPU layout (``kernels/gpu_layout.py``): CUDA; ``TRITON_INTERPRET=1`` on CPU.

The shape of vLLM's ``fused_moe_kernel_gptq_awq``: the (token, slot) pairs are aligned by expert (sorted, each
expert's run padded to ``BLOCK_M`` rows: :func:`~optimum_mc.kernels.moe_triton.sorted_layout`, no device sync), a
program takes one ``BLOCK_M`` block (one expert) and ``BLOCK_N`` output features, and per k-step loads one int32 tile
of the expert's words, unpacks it with shifts known at compile time (the width ``BITS`` is a ``tl.constexpr``: one
launch per width group of the layout; programs whose block belongs to another group return at once), dequantizes
``(q - zero) * scale`` in fp32 and accumulates a ``tl.dot`` in fp32.

- gate/up: the tile's intermediate columns ``j`` of the gate and ``I + j`` of the up projection share the ``x`` tile;
  the activation ``glu(gate, up)`` is applied in the epilogue, so only the ``(rows, I)`` intermediate is written.
- down: the routing weight of each row's pair is applied in the epilogue and the row is stored at its pair's index
  of a ``(T * K, H)`` fp32 buffer; the sum over slots is one torch reduction (deterministic: no atomics).
- decode (at most ``DECODE_MAX_PAIRS`` pairs): one program per (pair, ``BLOCK_N`` features), fp32 products summed
  over k (no padded ``BLOCK_M`` rows): same unpacking, same epilogues; down split over K (``DOWN_SPLIT_K``).

Dropped slots (index ``E``) are never aligned (tiled) or return at once (decode); their rows of the per-pair buffer
stay 0. A slot of weight 0 is computed and contributes 0, as in the reference.
"""

from __future__ import annotations

import torch

from .activations import SWIGLU_ALPHA, SWIGLU_LIMIT
from .gpu_layout import MoELayout, ProjectionLayout
from .triton import TRITON_AVAILABLE, half_mode

# activations the epilogue computes (ids passed as a constexpr); others take the tiled kernels (moe_triton.py)
FUSED_ACTIVATIONS = {"silu": 0, "gelu_tanh": 1, "relu": 2, "gelu": 3, "clamped_swiglu": 4}
DECODE_MAX_PAIRS = 16
# (BLOCK_M, BLOCK_N, BLOCK_K, warps): not timed yet (scripts/bench_gpu_layer.py --sweep); chosen to compile for sm_90
# without spills (scripts/triton_resources.py: 4 warps at 64 x 64 spill in gate/up)
SMALL_TILES = (16, 64, 64, 4)  # experts average at most 16 rows
PREFILL_TILES = (64, 64, 64, 8)
DECODE_TILES = (32, 128, 4)  # BLOCK_N, BLOCK_K, warps of the per-pair kernels
EXPAND = True  # how a k-step's codes are read from the words: see _plane
# the per-pair down kernel's K (= I) in up to this many slices: H / BLOCK_N programs per pair alone (128 for Mixtral)
# leave most of a GPU's SMs idle at one token
DOWN_SPLIT_K = 4

if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    from .triton import _dot_acc

    @triton.jit
    def _plane(ptr, k0, rn, n_mask, N, K, B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
               EXPAND: tl.constexpr):  # fmt: skip
        """Codes ``(BLOCK_K, BLOCK_N)`` of rows ``k0..`` of a ``B``-bit plane (``32 / B`` codes per word, word row
        ``k // (32 / B)``, shift ``(k % (32 / B)) * B``: constants, as ``k0`` is a multiple of 32). ``EXPAND``: load
        the ``(BLOCK_K * B / 32, BLOCK_N)`` words once and expand each into its codes in registers; else load the
        word of every code (a gather hitting each word ``32 / B`` times, served by the cache)."""
        if EXPAND:
            rw = k0 // (32 // B) + tl.arange(0, BLOCK_K // (32 // B))
            w = tl.load(ptr + rw[:, None] * N + rn[None, :], mask=(rw * (32 // B) < K)[:, None] & n_mask[None, :],
                        other=0)  # fmt: skip
            sh = tl.arange(0, 32 // B) * B
            q = (w[:, None, :] >> sh[None, :, None]) & ((1 << B) - 1)
            return tl.reshape(q, (BLOCK_K, BLOCK_N))
        else:
            offs = tl.arange(0, BLOCK_K)
            m = ((k0 + offs) < K)[:, None] & n_mask[None, :]
            w = tl.load(ptr + (k0 // (32 // B) + offs // (32 // B))[:, None] * N + rn[None, :], mask=m, other=0)
            return (w >> ((offs % (32 // B)) * B)[:, None]) & ((1 << B) - 1)

    @triton.jit
    def _weights(qw, qhi, sp, zp, k0, rn, n_mask, N, K, group_size, BITS: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_N: tl.constexpr, GROUP_TILE: tl.constexpr, EXPAND: tl.constexpr):  # fmt: skip
        """The ``(BLOCK_K, BLOCK_N)`` fp32 weight tile ``W[n, k0:k0+BLOCK_K]ᵀ`` of one expert (pointers already at
        the expert), 0 past ``K``."""
        offs = tl.arange(0, BLOCK_K)
        kin = (k0 + offs) < K
        m = kin[:, None] & n_mask[None, :]
        if BITS == 3:  # a 2-bit plane (16 codes per word) and a 1-bit plane (32 per word)
            q = _plane(qw, k0, rn, n_mask, N, K, 2, BLOCK_K, BLOCK_N, EXPAND)
            q = q | (_plane(qhi, k0, rn, n_mask, N, K, 1, BLOCK_K, BLOCK_N, EXPAND) << 2)
        else:
            q = _plane(qw, k0, rn, n_mask, N, K, BITS, BLOCK_K, BLOCK_N, EXPAND)
        if GROUP_TILE:  # the k-step lies in one quantization group: one scale and zero per column
            g = k0 // group_size
            s = tl.load(sp + g * N + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            z = tl.load(zp + g * N + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        else:
            g = (tl.where(kin, k0 + offs, 0) // group_size)[:, None]
            s = tl.load(sp + g * N + rn[None, :], mask=m, other=0.0).to(tl.float32)
            z = tl.load(zp + g * N + rn[None, :], mask=m, other=0.0).to(tl.float32)
        return tl.where(m, (q.to(tl.float32) - z) * s, 0.0)

    @triton.jit
    def _glu(g, u, ACT: tl.constexpr, alpha, limit):
        if ACT == 0:
            return g * tl.sigmoid(g) * u
        elif ACT == 1:  # tanh(y) = 2 sigmoid(2y) - 1
            y = 0.7978845608028654 * (g + 0.044715 * g * g * g)
            return 0.5 * g * (2.0 * tl.sigmoid(2.0 * y)) * u
        elif ACT == 2:
            return tl.maximum(g, 0.0) * u
        elif ACT == 3:
            return 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476)) * u
        else:  # gpt-oss's clamped SwiGLU
            g = tl.minimum(g, limit)
            u = tl.minimum(tl.maximum(u, -limit), limit)
            return (u + 1.0) * (g * tl.sigmoid(g * alpha))

    @triton.jit
    def _expert(e, group_of, local, GROUP):
        """(in this launch's width group, index in the group) of expert ``e`` (``E``: dropped, in no group)."""
        return tl.load(group_of + e) == GROUP, tl.load(local + e).to(tl.int64)

    @triton.jit
    def _gate_up_tiled(x_ptr, rows_ptr, block_expert, group_of, local, qw_ptr, qhi_ptr, s_ptr, z_ptr, a_ptr,
                       inter, K, group_size, top_k, sentinel, sq, sh, ss, alpha, limit, GROUP, ACT: tl.constexpr,
                       BITS: tl.constexpr, HALF: tl.constexpr, GROUP_TILE: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EXPAND: tl.constexpr):  # fmt: skip
        mine, li = _expert(tl.load(block_expert + tl.program_id(0)), group_of, local, GROUP)
        if mine:
            qw, qhi, sp, zp = qw_ptr + li * sq, qhi_ptr + li * sh, s_ptr + li * ss, z_ptr + li * ss
            rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
            pair = tl.load(rows_ptr + rm)
            valid = pair < sentinel
            token = tl.where(valid, pair // top_k, 0)
            rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = rn < inter
            rn = tl.where(n_ok, rn, 0)
            acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                x = tl.load(x_ptr + token[:, None] * K + rk[None, :], mask=valid[:, None] & (rk < K)[None, :],
                            other=0.0)  # fmt: skip
                wg = _weights(
                    qw, qhi, sp, zp, k0, rn, n_ok, 2 * inter, K, group_size, BITS, BLOCK_K, BLOCK_N, GROUP_TILE, EXPAND
                )
                acc_g = _dot_acc(acc_g, x, wg, HALF)
                wu = _weights(
                    qw,
                    qhi,
                    sp,
                    zp,
                    k0,
                    rn + inter,
                    n_ok,
                    2 * inter,
                    K,
                    group_size,
                    BITS,
                    BLOCK_K,
                    BLOCK_N,
                    GROUP_TILE,
                    EXPAND,
                )
                acc_u = _dot_acc(acc_u, x, wu, HALF)
            a = _glu(acc_g, acc_u, ACT, alpha, limit)
            tl.store(a_ptr + rm.to(tl.int64)[:, None] * inter + rn[None, :], a.to(a_ptr.dtype.element_ty),
                     mask=valid[:, None] & n_ok[None, :])  # fmt: skip

    @triton.jit
    def _down_tiled(a_ptr, rows_ptr, block_expert, group_of, local, qw_ptr, qhi_ptr, s_ptr, z_ptr, w_ptr, y_ptr,
                    H, K, group_size, sentinel, sq, sh, ss, GROUP, BITS: tl.constexpr, HALF: tl.constexpr,
                    GROUP_TILE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, EXPAND: tl.constexpr):  # fmt: skip
        mine, li = _expert(tl.load(block_expert + tl.program_id(0)), group_of, local, GROUP)
        if mine:
            qw, qhi, sp, zp = qw_ptr + li * sq, qhi_ptr + li * sh, s_ptr + li * ss, z_ptr + li * ss
            rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
            pair = tl.load(rows_ptr + rm)
            valid = pair < sentinel
            rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = rn < H
            rn = tl.where(n_ok, rn, 0)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                a = tl.load(a_ptr + rm.to(tl.int64)[:, None] * K + rk[None, :],
                            mask=valid[:, None] & (rk < K)[None, :], other=0.0)  # fmt: skip
                w = _weights(
                    qw, qhi, sp, zp, k0, rn, n_ok, H, K, group_size, BITS, BLOCK_K, BLOCK_N, GROUP_TILE, EXPAND
                )
                acc = _dot_acc(acc, a, w, HALF)
            route = tl.load(w_ptr + tl.where(valid, pair, 0), mask=valid, other=0.0)
            tl.store(y_ptr + tl.where(valid, pair, 0).to(tl.int64)[:, None] * H + rn[None, :],
                     acc * route[:, None], mask=valid[:, None] & n_ok[None, :])  # fmt: skip

    @triton.jit
    def _gate_up_decode(x_ptr, idx_ptr, group_of, local, qw_ptr, qhi_ptr, s_ptr, z_ptr, a_ptr, inter, K, group_size,
                        top_k, sq, sh, ss, alpha, limit, GROUP, ACT: tl.constexpr, BITS: tl.constexpr,
                        GROUP_TILE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        EXPAND: tl.constexpr):  # fmt: skip
        p = tl.program_id(0)
        mine, li = _expert(tl.load(idx_ptr + p), group_of, local, GROUP)
        if mine:
            qw, qhi, sp, zp = qw_ptr + li * sq, qhi_ptr + li * sh, s_ptr + li * ss, z_ptr + li * ss
            rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = rn < inter
            rn = tl.where(n_ok, rn, 0)
            acc_g = tl.zeros((BLOCK_N,), dtype=tl.float32)
            acc_u = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                x = tl.load(x_ptr + (p // top_k) * K + rk, mask=rk < K, other=0.0).to(tl.float32)[:, None]
                wg = _weights(
                    qw, qhi, sp, zp, k0, rn, n_ok, 2 * inter, K, group_size, BITS, BLOCK_K, BLOCK_N, GROUP_TILE, EXPAND
                )
                acc_g += tl.sum(x * wg, axis=0)
                wu = _weights(
                    qw,
                    qhi,
                    sp,
                    zp,
                    k0,
                    rn + inter,
                    n_ok,
                    2 * inter,
                    K,
                    group_size,
                    BITS,
                    BLOCK_K,
                    BLOCK_N,
                    GROUP_TILE,
                    EXPAND,
                )
                acc_u += tl.sum(x * wu, axis=0)
            tl.store(a_ptr + p * inter + rn, _glu(acc_g, acc_u, ACT, alpha, limit), mask=n_ok)

    @triton.jit
    def _down_decode(a_ptr, idx_ptr, group_of, local, qw_ptr, qhi_ptr, s_ptr, z_ptr, w_ptr, y_ptr, H, K, group_size,
                     sq, sh, ss, k_split, GROUP, BITS: tl.constexpr, GROUP_TILE: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, EXPAND: tl.constexpr):  # fmt: skip
        """Split-K: program ``(p, n, s)`` sums ``k`` in ``[s * k_split, (s + 1) * k_split)`` (a multiple of
        ``BLOCK_K``) into slice ``s`` of ``y (splits, pairs, H)``; the slices are summed in torch (deterministic)."""
        p = tl.program_id(0)
        y_ptr += tl.program_id(2).to(tl.int64) * tl.num_programs(0) * H
        mine, li = _expert(tl.load(idx_ptr + p), group_of, local, GROUP)
        if mine:
            qw, qhi, sp, zp = qw_ptr + li * sq, qhi_ptr + li * sh, s_ptr + li * ss, z_ptr + li * ss
            rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = rn < H
            rn = tl.where(n_ok, rn, 0)
            acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
            k_lo = tl.program_id(2) * k_split
            for k0 in range(k_lo, tl.minimum(k_lo + k_split, K), BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                a = tl.load(a_ptr + p * K + rk, mask=rk < K, other=0.0).to(tl.float32)[:, None]
                w = _weights(
                    qw, qhi, sp, zp, k0, rn, n_ok, H, K, group_size, BITS, BLOCK_K, BLOCK_N, GROUP_TILE, EXPAND
                )
                acc += tl.sum(a * w, axis=0)
            tl.store(y_ptr + p * H + rn, acc * tl.load(w_ptr + p), mask=n_ok)


def _group_args(group, proj: ProjectionLayout):
    """Pointers and per-expert strides of one width group (the 1-bit plane's pointer repeats the codes' when
    the width has none; the kernel never reads it then)."""
    hi = group.qweight_hi if group.qweight_hi is not None else group.qweight
    return (proj.group_of, proj.local, group.qweight, hi, group.scales, group.zeros)


def _strides(group):
    hi = group.qweight_hi if group.qweight_hi is not None else group.qweight
    return group.qweight.stride(0), hi.stride(0), group.scales.stride(0)


def fused_moe(x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, layout: MoELayout,
              activation: str, decode: bool | None = None, tiles: tuple[int, ...] | None = None,
              alpha: float = SWIGLU_ALPHA, limit: float = SWIGLU_LIMIT,
              compiled: list | None = None) -> torch.Tensor:  # fmt: skip
    """``optimum_mc::moe`` over a GPU layout: ``2 x`` (width groups) launches plus the alignment and one sum.
    ``decode`` forces the per-pair kernels (default: at most ``DECODE_MAX_PAIRS`` pairs); ``tiles`` the tiled
    kernels' ``(BLOCK_M, BLOCK_N, BLOCK_K, warps)`` or the per-pair kernels' ``(BLOCK_N, BLOCK_K, warps)``.
    ``compiled``, where given, receives ``(kernel name, bits, tiles, what the launch returned)`` per launch
    (Triton's compiled kernel on a GPU: ``n_regs``, ``n_spills``)."""
    seen = compiled if compiled is not None else []
    from .moe_triton import sorted_layout

    act = FUSED_ACTIVATIONS[activation]
    gu, dn = layout.gate_up, layout.down
    (tokens, hidden), top_k = x.shape, top_k_index.shape[1]
    inter, experts, pairs = dn.in_features, gu.group_of.numel() - 1, tokens * top_k
    x = x.contiguous()
    route = top_k_weights.reshape(-1).float().contiguous()
    if decode is None:
        decode = len(tiles) == 3 if tiles is not None else pairs <= DECODE_MAX_PAIRS
    if decode:
        block_n, block_k, warps = tiles = tiles if tiles is not None and len(tiles) == 3 else DECODE_TILES
        idx = top_k_index.reshape(-1).to(torch.int32).contiguous()
        a = torch.empty(pairs, inter, dtype=torch.float32, device=x.device)
        steps = triton.cdiv(inter, block_k)
        splits = max(1, min(DOWN_SPLIT_K, steps))
        k_split = triton.cdiv(steps, splits) * block_k
        splits = triton.cdiv(inter, k_split)
        y = torch.zeros(splits, pairs, hidden, dtype=torch.float32, device=x.device)
        grid_gu, grid_dn = (pairs, triton.cdiv(inter, block_n)), (pairs, triton.cdiv(hidden, block_n), splits)
        for gi, grp in enumerate(gu.widths):
            k = _gate_up_decode[grid_gu](
                x, idx, *_group_args(grp, gu), a, inter, hidden, gu.group_size, top_k, *_strides(grp), alpha, limit,
                gi, ACT=act, BITS=grp.bits, GROUP_TILE=gu.group_size % block_k == 0, BLOCK_N=block_n,
                BLOCK_K=block_k, num_warps=warps, EXPAND=EXPAND)  # fmt: skip
            seen.append(("gate_up_decode", grp.bits, tiles, k))
        for gi, grp in enumerate(dn.widths):
            k = _down_decode[grid_dn](
                a, idx, *_group_args(grp, dn), route, y, hidden, inter, dn.group_size, *_strides(grp), k_split, gi,
                BITS=grp.bits, GROUP_TILE=dn.group_size % block_k == 0, BLOCK_N=block_n, BLOCK_K=block_k,
                num_warps=warps, EXPAND=EXPAND)  # fmt: skip
            seen.append(("down_decode", grp.bits, tiles, k))
    else:
        if tiles is None:
            tiles = SMALL_TILES if pairs <= SMALL_TILES[0] * experts else PREFILL_TILES
        block_m, block_n, block_k, warps = tiles
        rows, block_expert = sorted_layout(top_k_index, experts, block_m)
        half = half_mode(x.dtype)
        a = torch.empty(rows.numel(), inter, dtype=x.dtype if half else torch.float32, device=x.device)
        y = torch.zeros(1, pairs, hidden, dtype=torch.float32, device=x.device)
        blocks = block_expert.numel()
        grid_gu, grid_dn = (blocks, triton.cdiv(inter, block_n)), (blocks, triton.cdiv(hidden, block_n))
        for gi, grp in enumerate(gu.widths):
            k = _gate_up_tiled[grid_gu](
                x, rows, block_expert, *_group_args(grp, gu), a, inter, hidden, gu.group_size, top_k, pairs,
                *_strides(grp), alpha, limit, gi, ACT=act, BITS=grp.bits, HALF=half,
                GROUP_TILE=gu.group_size % block_k == 0, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                num_warps=warps, EXPAND=EXPAND)  # fmt: skip
            seen.append(("gate_up_tiled", grp.bits, tiles, k))
        for gi, grp in enumerate(dn.widths):
            k = _down_tiled[grid_dn](
                a, rows, block_expert, *_group_args(grp, dn), route, y, hidden, inter, dn.group_size, pairs,
                *_strides(grp), gi, BITS=grp.bits, HALF=half, GROUP_TILE=dn.group_size % block_k == 0,
                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, EXPAND=EXPAND)  # fmt: skip
            seen.append(("down_tiled", grp.bits, tiles, k))
    return y.view(-1, tokens, top_k, hidden).sum((0, 2)).to(x.dtype)  # split-K slices and slots in one reduction


KERNELS = ("fused", "tiled", "reference")


def selected_kernel() -> str:
    """The CUDA MoE implementation: ``OPTIMUM_MC_CUDA_MOE`` = "fused" (default: these kernels), "tiled" (the
    run-time-width kernels of ``moe_triton.py``) or "reference" (pure torch)."""
    import os

    from ..errors import MCConfigError

    kernel = os.environ.get("OPTIMUM_MC_CUDA_MOE", "fused")
    if kernel not in KERNELS:
        raise MCConfigError(f"OPTIMUM_MC_CUDA_MOE={kernel!r}; choose one of {KERNELS}.")
    return kernel


def _check_device(device: torch.device) -> None:
    """The fused kernels' bf16/fp16 dots need compute capability 8.0 (Ampere) or newer."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        from ..errors import UnsupportedArchitectureError

        cap = torch.cuda.get_device_capability(device)
        raise UnsupportedArchitectureError(
            f"the fused MoE kernels need a GPU of compute capability 8.0 or newer, {device} has {cap}; set "
            "OPTIMUM_MC_CUDA_MOE=reference (pure torch) or OPTIMUM_MC_CUDA_MOE=tiled."
        )


def cuda_moe(x, top_k_index, top_k_weights, gate_up_qweight, gate_up_scales, gate_up_zeros, down_qweight,
             down_scales, down_zeros, bits: list[int], activation: str, decode_activations: str = "float",
             gate_up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None,
             odp_threshold: float = 0.0, odp_counts: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """``optimum_mc::moe`` on CUDA: ODP's rule and counts in torch ops (no host sync; capturable in a CUDA graph),
    then the fused kernels over the GPU layout where they apply (no expert biases, an activation of
    ``FUSED_ACTIVATIONS``, widths of the layout), else the tiled kernels; see :func:`selected_kernel`."""
    from .gpu_layout import LAYOUT_BITS, layout_for
    from .moe import check_index_values
    from .moe_triton import triton_moe
    from .odp_rule import apply_odp
    from .reference import moe_reference

    top_k_index, top_k_weights = apply_odp(top_k_index, top_k_weights, odp_threshold, odp_counts,
                                           len(gate_up_qweight))  # fmt: skip
    kernel = selected_kernel()
    lists = (gate_up_qweight, gate_up_scales, gate_up_zeros, down_qweight, down_scales, down_zeros)
    if kernel == "reference":
        check_index_values(top_k_index, len(gate_up_qweight))
        gu, dn = list(zip(*lists[:3])), list(zip(*lists[3:]))
        return moe_reference(x, top_k_index, top_k_weights, gu, dn, bits, activation, gate_up_bias, down_bias)
    fused = (kernel == "fused" and gate_up_bias is None and down_bias is None and activation in FUSED_ACTIVATIONS
             and all(b in LAYOUT_BITS for b in bits))  # fmt: skip
    if not fused:
        return triton_moe(x, top_k_index, top_k_weights, *lists, bits, activation, decode_activations, gate_up_bias,
                          down_bias)  # fmt: skip
    _check_device(x.device)
    check_index_values(top_k_index, len(gate_up_qweight))
    return fused_moe(x, top_k_index, top_k_weights, layout_for(lists, bits), activation)


_LIB = None


def register() -> bool:
    """Register :func:`cuda_moe` for the "CUDA" key (when Triton imports; idempotent); return whether it was."""
    global _LIB
    if not TRITON_AVAILABLE:
        return False
    if _LIB is None:
        _LIB = torch.library.Library("optimum_mc", "IMPL")
        _LIB.impl("moe", cuda_moe, "CUDA")
    return True
