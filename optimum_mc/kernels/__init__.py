"""Kernels for packed low-bit weights: torch.library ops with per-device implementations.

Importing this package registers the fast CPU kernels and, when Triton is importable, the Triton CUDA kernels.
"""

from . import autograd, cpu, moe_cpu, moe_fused, moe_triton, triton  # noqa: F401 (moe_triton: the tiled kernels)
from .activations import ACTIVATIONS, GATED, activation_name
from .moe import check_experts, check_routing, moe, moe_op
from .ops import check_packed, dequantize, qmatmul

cpu.register()
autograd.register()
moe_cpu.register()
triton.register()
moe_fused.register()  # the CUDA op: fused kernels, moe_triton's as fallback / selectable

__all__ = [
    "ACTIVATIONS",
    "GATED",
    "activation_name",
    "check_experts",
    "check_packed",
    "check_routing",
    "dequantize",
    "moe",
    "moe_op",
    "qmatmul",
]
