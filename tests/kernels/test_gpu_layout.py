"""The GPU layout of packed experts (kernels/gpu_layout.py): an exact, lossless rearrangement of the canonical
packed buffers."""

from __future__ import annotations

import pytest
import torch
from helpers.moe import random_experts

from optimum_mc.errors import UnsupportedBitsError
from optimum_mc.kernels.gpu_layout import build_layout, codes_of, dequantize_layout, layout_for
from optimum_mc.kernels.reference import dequantize_reference
from optimum_mc.packing import unpack


@pytest.mark.parametrize("per_projection", [False, True])
def test_layout_dequantizes_to_the_reference_bit_for_bit(per_projection):
    gu_bits = [1, 2, 3, 4, 3, 8, 2]
    dn_bits = [3, 1, 4, 2, 2, 3, 3] if per_projection else gu_bits
    gate_up, _ = random_experts(gu_bits, hidden=128, inter=64, group=32, seed=3)
    _, down = random_experts(dn_bits, hidden=128, inter=64, group=64, seed=4)
    bits = gu_bits + dn_bits if per_projection else gu_bits
    layout = build_layout(gate_up, down, bits)
    for proj, packed, widths in ((layout.gate_up, gate_up, gu_bits), (layout.down, down, dn_bits)):
        assert sorted(g.bits for g in proj.widths) == sorted(set(widths))  # one stacked group per width
        assert int(proj.group_of[len(widths)]) == -1  # the dropped-slot id belongs to no group
        for e, b in enumerate(widths):
            group = proj.widths[int(proj.group_of[e])]
            assert group.bits == b and group.experts[int(proj.local[e])] == e
            assert torch.equal(codes_of(group, int(proj.local[e])), unpack(packed[e][0], b).to(torch.int32))
            ref = dequantize_reference(*packed[e], b, torch.float32)
            assert torch.equal(dequantize_layout(proj, e), ref)
        for group in proj.widths:  # same bytes as the canonical codes: 3 bits as a 2-bit and a 1-bit plane
            n, k = proj.out_features, proj.in_features
            assert group.qweight.dtype == torch.int32
            if group.bits == 3:
                assert group.qweight.shape[1:] == (k // 16, n) and group.qweight_hi.shape[1:] == (k // 32, n)
            else:
                assert group.qweight.shape[1:] == (k * group.bits // 32, n) and group.qweight_hi is None
            assert group.scales.shape[1:] == (proj.groups, n) == group.zeros.shape[1:]


def test_layout_cache_follows_the_buffers():
    gate_up, down = random_experts([2, 3], hidden=64, inter=32, group=32, seed=5)
    lists = tuple([m[j] for m in ms] for ms in (gate_up, down) for j in range(3))
    first = layout_for(lists, [2, 3])
    assert layout_for(lists, [2, 3]) is first  # built once
    aliases = tuple([t.detach() for t in ts] for ts in lists)  # what torch.compile may pass: the same memory
    assert layout_for(aliases, [2, 3]) is first
    lists[0][1].add_(1)  # an in-place change of a buffer: rebuilt from the new codes
    again = layout_for(lists, [2, 3])
    assert layout_for(aliases, [2, 3]) is again
    assert again is not first
    assert torch.equal(dequantize_layout(again.gate_up, 1), dequantize_reference(*gate_up[1], 3, torch.float32))


def test_layout_refuses_an_unknown_width():
    gate_up, down = random_experts([2, 2], hidden=64, inter=32, group=32)
    with pytest.raises(UnsupportedBitsError, match="reference"):
        build_layout(gate_up, down, [2, 5])
