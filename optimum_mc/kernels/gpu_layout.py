"""The GPU layout of a layer's packed experts: built from the canonical packed buffers at load (never stored).

:func:`build_layout` is a pure function of the canonical per-expert ``(qweight, scales, zeros)`` (docs/format.md):
per projection (gate/up, down) the experts are grouped by width, and each width group is stacked and transposed so
that the output features are the fastest dimension (neighbouring GPU lanes read neighbouring words):

- ``qweight`` ``(n_experts, K * b / 32, N)`` int32 for ``b`` in {1, 2, 4, 8}: word ``(w, j)`` holds codes
  ``k = w * (32 / b) + i`` of column ``j`` at shift ``i * b`` (the canonical word of row ``j``, so every code comes
  out of one int32 word with a shift known at compile time).
- ``b = 3`` (whose canonical codes straddle words) as two planes: ``qweight`` ``(n, K / 16, N)`` the low 2 bits of
  every code (a 2-bit plane), ``qweight_hi`` ``(n, K / 32, N)`` the high bit (a 1-bit plane); the code is
  ``lo | hi << 2``. Same bytes as the canonical form (3 bits per weight), no straddling.
- ``scales`` / ``zeros`` ``(n, G, N)`` fp16, the canonical values transposed (``w = (q - zero) * scale`` in fp32).

``group_of (E + 1,)`` / ``local (E + 1,)`` map an expert id to its width group and its index in that group (the
dropped-slot id ``E`` maps to group -1). :func:`dequantize_layout` is the pure-torch inverse used by the tests:
it reproduces :func:`~optimum_mc.kernels.reference.dequantize_reference` bit for bit.

:func:`layout_for` is what the CUDA op calls: the layout of a set of buffers, built once and cached while those
buffers live (weak references; an in-place change of a buffer, seen through its version counter, rebuilds it). The
layout is held next to the canonical buffers, i.e. the experts take twice their packed size in GPU memory.
(Follow-up: MCExperts holding the layout in place of the canonical buffers on CUDA.)
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from ..errors import DeviceMismatchError, GraphCaptureError, UnsupportedBitsError
from ..packing import unpack

LAYOUT_BITS = (1, 2, 3, 4, 8)


@dataclass
class WidthGroup:
    bits: int
    experts: list[int]  # expert ids, in stacking order
    qweight: torch.Tensor  # (n, K*b/32, N) int32; b = 3: the low 2-bit plane (n, K/16, N)
    qweight_hi: torch.Tensor | None  # b = 3: the high-bit plane (n, K/32, N); else None
    scales: torch.Tensor  # (n, G, N) fp16
    zeros: torch.Tensor  # (n, G, N) fp16


@dataclass
class ProjectionLayout:
    out_features: int  # N
    in_features: int  # K
    groups: int  # G
    widths: list[WidthGroup]
    group_of: torch.Tensor  # (E + 1,) int32: width group of each expert id, -1 for the dropped id E
    local: torch.Tensor  # (E + 1,) int32: index of each expert in its width group

    @property
    def group_size(self) -> int:
        return self.in_features // self.groups


@dataclass
class MoELayout:
    gate_up: ProjectionLayout
    down: ProjectionLayout


def _planes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``(N, K)`` codes (< 2**bits, ``32 / bits`` of them per word) -> ``(K * bits / 32, N)`` words."""
    n, k = codes.shape
    per = 32 // bits
    c = codes.to(torch.int64).view(n, k // per, per)
    shifts = torch.arange(per, device=codes.device, dtype=torch.int64) * bits
    words = (c << shifts).sum(-1)  # disjoint bit fields: the sum is the OR
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)  # as signed int32
    return words.to(torch.int32).t().contiguous()


def _unplanes(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`_planes`: ``(K * bits / 32, N)`` words -> ``(N, K)`` int32 codes."""
    per = 32 // bits
    w = words.t().to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per, device=words.device, dtype=torch.int64) * bits
    return ((w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(w.shape[0], -1).to(torch.int32)


def build_projection(packed: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], bits: list[int]
                     ) -> ProjectionLayout:  # fmt: skip
    """The layout of one projection of every expert (``packed[e]`` canonical, at ``bits[e]`` bits)."""
    experts = len(packed)
    device = packed[0][0].device
    for e, (qw, s, z) in enumerate(packed):
        if bits[e] not in LAYOUT_BITS:
            raise UnsupportedBitsError(f"expert {e} is packed at {bits[e]} bits; the GPU layout takes {LAYOUT_BITS} "
                                       "(the reference path, OPTIMUM_MC_CUDA_MOE=reference, takes any).")  # fmt: skip
        if not (qw.device == s.device == z.device == device):
            raise DeviceMismatchError(f"expert {e}'s packed buffers are not all on {device}; move the module "
                                      "to one device (or use the reference path on CPU).")  # fmt: skip
    n, words = packed[0][0].shape
    k = words * 32 // bits[0]
    groups = packed[0][1].shape[1]
    group_of = torch.full((experts + 1,), -1, dtype=torch.int32)
    local = torch.zeros(experts + 1, dtype=torch.int32)
    widths = []
    for b in sorted(set(bits)):
        ids = [e for e in range(experts) if bits[e] == b]
        lo, hi = [], []
        for i, e in enumerate(ids):
            group_of[e], local[e] = len(widths), i
            codes = unpack(packed[e][0], b)  # (N, K)
            if b == 3:
                lo.append(_planes(codes & 3, 2))
                hi.append(_planes(codes >> 2, 1))
            else:
                lo.append(_planes(codes, b))
        widths.append(WidthGroup(
            bits=b, experts=ids, qweight=torch.stack(lo), qweight_hi=torch.stack(hi) if hi else None,
            scales=torch.stack([packed[e][1].t() for e in ids]).contiguous(),
            zeros=torch.stack([packed[e][2].t() for e in ids]).contiguous(),
        ))  # fmt: skip
    return ProjectionLayout(n, k, groups, widths, group_of.to(device), local.to(device))


Packed = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def build_layout(gate_up: list[Packed], down: list[Packed], bits: list[int]) -> MoELayout:
    """The GPU layout of a layer's experts; ``bits``: ``E`` widths or ``2E`` (gate/up then down)."""
    from ..bitwidths import from_op_bits

    gu_bits, dn_bits = from_op_bits(bits, len(gate_up))
    return MoELayout(build_projection(list(gate_up), gu_bits), build_projection(list(down), dn_bits))


def codes_of(group: WidthGroup, i: int) -> torch.Tensor:
    """The ``(N, K)`` int32 codes of the ``i``-th expert of a width group, read back from the layout."""
    if group.bits == 3:
        return _unplanes(group.qweight[i], 2) | (_unplanes(group.qweight_hi[i], 1) << 2)
    return _unplanes(group.qweight[i], group.bits)


def dequantize_layout(proj: ProjectionLayout, expert: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Expert ``expert``'s ``(N, K)`` weights from the layout alone: ``(q - zero) * scale`` in fp32, cast."""
    group = proj.widths[int(proj.group_of[expert])]
    i = int(proj.local[expert])
    q = codes_of(group, i).float()
    s = group.scales[i].t().float().repeat_interleave(proj.group_size, dim=1)
    z = group.zeros[i].t().float().repeat_interleave(proj.group_size, dim=1)
    return ((q - z) * s).to(dtype)


class _Entry:
    def __init__(self, tensors: list[torch.Tensor], bits: tuple[int, ...], layout: MoELayout) -> None:
        self.refs = [weakref.ref(t) for t in tensors]
        self.versions = [t._version for t in tensors]
        self.bits, self.layout = bits, layout

    def valid(self, tensors: list[torch.Tensor], bits: tuple[int, ...]) -> bool:
        """The buffers the layout was built from are alive (so their memory is theirs), ``tensors`` are them or
        aliases of them (same address and shape: ``torch.compile`` may pass a detached alias), and none has been
        changed in place since (version counters, shared by aliases)."""
        if bits != self.bits:
            return False
        for r, t, v in zip(self.refs, tensors, self.versions):
            orig = r()
            if orig is None or orig.data_ptr() != t.data_ptr() or orig.shape != t.shape or orig._version != v:
                return False
        return True


_CACHE: dict[tuple[int, ...], _Entry] = {}


def layout_for(lists: tuple[list[torch.Tensor], ...], bits: list[int]) -> MoELayout:
    """The cached layout of the op's six buffer lists (gate_up qweight/scales/zeros, down qweight/scales/zeros),
    built on first use. Building inside CUDA-graph capture would record a layout that is never computed: refused,
    naming the fix (one eager call first, as ``torch.compile(mode="reduce-overhead")``'s warm-up does)."""
    tensors = [t for ts in lists for t in ts]
    key = tuple(t.data_ptr() for t in tensors)
    entry = _CACHE.get(key)
    if entry is not None and entry.valid(tensors, tuple(bits)):
        return entry.layout
    if tensors[0].is_cuda and torch.cuda.is_current_stream_capturing():
        raise GraphCaptureError("the GPU layout of these experts is built on their first call, which cannot happen "
                                "inside CUDA-graph capture: run the model once before capturing.")  # fmt: skip
    gate_up = list(zip(lists[0], lists[1], lists[2]))
    down = list(zip(lists[3], lists[4], lists[5]))
    layout = build_layout(gate_up, down, list(bits))
    _CACHE[key] = _Entry(tensors, tuple(bits), layout)
    weakref.finalize(tensors[0], _CACHE.pop, key, None)  # freed with the experts' buffers
    return layout
