"""Random packed matrices for the kernel tests: codes, fp16 scales and zeros of a given width and group size."""

from __future__ import annotations

import torch

from optimum_mc.packing import pack


def random_packed(out_f: int, in_f: int, bits: int, group: int, seed: int):
    """``(qweight, scales, zeros)`` of an ``(out_f, in_f)`` matrix at ``bits`` with groups of ``group`` inputs."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (out_f, in_f), dtype=torch.uint8, generator=g)
    scales = (torch.rand(out_f, in_f // group, generator=g) * 0.02 + 1e-3).half()
    zeros = (torch.rand(out_f, in_f // group, generator=g) * ((1 << bits) - 1)).half()
    return pack(codes, bits), scales, zeros
