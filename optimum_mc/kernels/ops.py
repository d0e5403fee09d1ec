"""The kernel contract: every ``optimum_mc::`` op schema, in one place, with its fake (meta) implementation.

Three ops (docs/kernels.md, "The kernel contract"):

- ``dequantize(qweight, scales, zeros, bits, dtype) -> (out, in)``: packed codes to float weights.
- ``qmatmul(x, qweight, scales, zeros, bits, decode_activations) -> (..., out)``: ``x @ dequantize(...).T``.
- ``moe(x, top_k_index, top_k_weights, <six lists of E packed tensors>, bits, activation, decode_activations,
  gate_up_bias, down_bias, odp_threshold, odp_counts) -> (T, H)``: a whole mixed-precision MoE layer, with online
  dynamic pruning's rule (``odp_threshold`` > 0) and its statistics (``odp_counts``, mutated in place) inside the
  op (:mod:`.moe`).
- ``moe_backward(grad, x, top_k_index, top_k_weights, <lists>, bits, activation, biases, want_x, want_weights)
  -> (dL/dx, dL/dtop_k_weights)``: ``moe``'s gradient formula (:mod:`.autograd`).

Implementations register per dispatch key, never by patching classes or by calling a kernel around the
dispatcher: :mod:`.reference` is the pure-torch default of every op on every device ("CompositeExplicitAutograd"),
:mod:`.cpu` / :mod:`.moe_cpu` the C kernels for "CPU", :mod:`.triton` / :mod:`.moe_triton` the Triton kernels for
"CUDA". The ops carry no autograd kernel: gradients (for the activations and routing weights only) come from the
Python entry points below and in :mod:`.moe`, which wrap the ops in :mod:`.autograd`'s functions when an input needs
a gradient, and call the op directly otherwise (one dispatch, no Python autograd layer on the decode path).
"""

from __future__ import annotations

import torch

from ..errors import DeviceMismatchError, DTypeError, ShapeError
from ..packing import WORD_BITS, check_bits

NAMESPACE = "optimum_mc"

SCHEMAS = {
    "dequantize": "(Tensor qweight, Tensor scales, Tensor zeros, int bits, ScalarType dtype) -> Tensor",
    "qmatmul": (
        "(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int bits, str decode_activations='float') -> Tensor"
    ),
    "moe": (
        "(Tensor x, Tensor top_k_index, Tensor top_k_weights, Tensor[] gate_up_qweight, Tensor[] gate_up_scales, "
        "Tensor[] gate_up_zeros, Tensor[] down_qweight, Tensor[] down_scales, Tensor[] down_zeros, int[] bits, "
        "str activation, str decode_activations='float', Tensor? gate_up_bias=None, Tensor? down_bias=None, "
        "float odp_threshold=0.0, Tensor(a!)? odp_counts=None) -> Tensor"
    ),
    # moe's backward formula (:mod:`.autograd`) as an op of its own, so a compiled graph holds it as one node
    "moe_backward": (
        "(Tensor grad, Tensor x, Tensor top_k_index, Tensor top_k_weights, Tensor[] gate_up_qweight, "
        "Tensor[] gate_up_scales, Tensor[] gate_up_zeros, Tensor[] down_qweight, Tensor[] down_scales, "
        "Tensor[] down_zeros, int[] bits, str activation, Tensor? gate_up_bias, Tensor? down_bias, bool want_x, "
        "bool want_weights) -> (Tensor, Tensor)"
    ),
}

_LIB = torch.library.Library(NAMESPACE, "DEF")  # kept alive: the definitions live as long as this object
for _name, _schema in SCHEMAS.items():
    _LIB.define(_name + _schema)


@torch.library.register_fake(f"{NAMESPACE}::moe_backward")
def _(grad, x, top_k_index, top_k_weights, gate_up_qweight, gate_up_scales, gate_up_zeros, down_qweight, down_scales,
      down_zeros, bits, activation, gate_up_bias, down_bias, want_x, want_weights):  # fmt: skip
    return torch.empty_like(x), torch.empty_like(top_k_weights)


@torch.library.register_fake(f"{NAMESPACE}::dequantize")
def _(qweight, scales, zeros, bits, dtype):
    return qweight.new_empty((qweight.shape[0], qweight.shape[1] * WORD_BITS // bits), dtype=dtype)


@torch.library.register_fake(f"{NAMESPACE}::qmatmul")
def _(x, qweight, scales, zeros, bits, decode_activations="float"):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@torch.library.register_fake(f"{NAMESPACE}::moe")
def _(x, top_k_index, top_k_weights, gate_up_qweight, gate_up_scales, gate_up_zeros, down_qweight, down_scales,
      down_zeros, bits, activation, decode_activations="float", gate_up_bias=None, down_bias=None,
      odp_threshold=0.0, odp_counts=None):  # fmt: skip
    return torch.empty_like(x)


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
    return torch.ops.optimum_mc.dequantize.default(qweight, scales, zeros, bits, dtype)


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
    return qmatmul_op(x, qweight, scales, zeros, bits)


def qmatmul_op(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    decode_activations: str = "float",
) -> torch.Tensor:
    """``optimum_mc::qmatmul`` on an already-validated packed matrix (what :class:`~optimum_mc.nn.QuantLinear`
    calls): through :class:`~.autograd.QMatmulFunction` when ``x`` needs a gradient, else the op itself."""
    if x.requires_grad and torch.is_grad_enabled():
        from .autograd import QMatmulFunction

        return QMatmulFunction.apply(x, qweight, scales, zeros, bits, decode_activations)
    return torch.ops.optimum_mc.qmatmul.default(x, qweight, scales, zeros, bits, decode_activations)
