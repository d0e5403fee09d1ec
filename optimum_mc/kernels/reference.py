"""Pure-torch implementations of the packed-weight ops; they run on any device and define the expected results."""

from __future__ import annotations

import torch

from ..group_quant import dequantize_matrix
from ..packing import unpack


def dequantize_reference(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, dtype: torch.dtype
) -> torch.Tensor:
    """Packed ``(out, in*bits/32)`` int32 codes + fp16 ``(out, groups)`` scales/zeros -> ``(out, in)`` weights."""
    codes = unpack(qweight, bits)
    group_size = codes.shape[1] // scales.shape[1]
    return dequantize_matrix(codes, scales, zeros, group_size).to(dtype)


def qmatmul_reference(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int
) -> torch.Tensor:
    """``x @ W.T`` with ``W`` dequantized in fp32; the result has ``x``'s dtype."""
    w = dequantize_reference(qweight, scales, zeros, bits, torch.float32)
    return (x.float() @ w.t()).to(x.dtype)
