"""torch.library schemas for the packed-weight ops, their fake (meta) implementations, and device dispatch.

``optimum_mc::dequantize`` and ``optimum_mc::qmatmul`` default to the pure-torch reference on every device. Faster
implementations register themselves per device key (``kernels/cpu.py`` for "cpu", ``kernels/triton.py`` for
"cuda"); the choice is made by the dispatcher from the tensors' device, never by patching classes.
"""

from __future__ import annotations

import torch

from ..errors import DeviceMismatchError, DTypeError, ShapeError
from ..packing import WORD_BITS, check_bits
from .reference import dequantize_reference, qmatmul_reference


@torch.library.custom_op("optimum_mc::dequantize", mutates_args=())
def _dequantize_op(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, dtype: torch.dtype
) -> torch.Tensor:
    return dequantize_reference(qweight, scales, zeros, bits, dtype)


@_dequantize_op.register_fake
def _(qweight, scales, zeros, bits, dtype):
    return qweight.new_empty((qweight.shape[0], qweight.shape[1] * WORD_BITS // bits), dtype=dtype)


@torch.library.custom_op("optimum_mc::qmatmul", mutates_args=())
def _qmatmul_op(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    decode_activations: str = "float",
) -> torch.Tensor:
    return qmatmul_reference(x, qweight, scales, zeros, bits)


@_qmatmul_op.register_fake
def _(x, qweight, scales, zeros, bits, decode_activations="float"):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def check_packed(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int) -> int:
    """Validate a packed matrix; return its ``in_features``. Raises typed errors naming the fix."""
    check_bits(bits)
    if qweight.dtype != torch.int32:
        raise DTypeError(f"qweight must be int32 packed words, got {qweight.dtype}.")
    for name, t in (("scales", scales), ("zeros", zeros)):
        if t.dtype != torch.float16:
            raise DTypeError(f"{name} must be float16, got {t.dtype}.")
        if t.dim() != 2 or t.shape[0] != qweight.shape[0]:
            raise ShapeError(f"{name} must be (out_features={qweight.shape[0]}, groups), got {tuple(t.shape)}.")
    if qweight.dim() != 2 or scales.shape != zeros.shape:
        raise ShapeError(f"scales {tuple(scales.shape)} and zeros {tuple(zeros.shape)} must match.")
    if qweight.shape[1] * WORD_BITS % bits:
        raise ShapeError(f"qweight has {qweight.shape[1]} words per row, not a whole number of {bits}-bit rows.")
    in_features = qweight.shape[1] * WORD_BITS // bits
    if scales.shape[1] == 0 or in_features % scales.shape[1]:
        raise ShapeError(f"{scales.shape[1]} groups do not divide in_features={in_features}.")
    if not (qweight.device == scales.device == zeros.device):
        raise DeviceMismatchError(
            f"qweight ({qweight.device}), scales ({scales.device}) and zeros ({zeros.device}) must share a device."
        )
    return in_features


def dequantize(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Dequantize a packed matrix to ``(out, in)`` in ``dtype``."""
    check_packed(qweight, scales, zeros, bits)
    return torch.ops.optimum_mc.dequantize(qweight, scales, zeros, bits, dtype)


def qmatmul(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int
) -> torch.Tensor:
    """``x @ dequantize(...).T`` for ``x`` of shape ``(..., in)``; output ``(..., out)`` in ``x.dtype``."""
    in_features = check_packed(qweight, scales, zeros, bits)
    if not x.dtype.is_floating_point:
        raise DTypeError(f"x must be a floating-point tensor, got {x.dtype}.")
    if x.shape[-1] != in_features:
        raise ShapeError(f"x has {x.shape[-1]} features, the packed weight expects {in_features}.")
    if x.device != qweight.device:
        raise DeviceMismatchError(f"x is on {x.device} but the packed weight is on {qweight.device}; move one.")
    return torch.ops.optimum_mc.qmatmul(x, qweight, scales, zeros, bits)
