"""Kernels for packed low-bit weights: torch.library ops with per-device implementations.

Importing this package registers the fast CPU kernels and, when Triton is importable, the Triton CUDA kernels.
"""

import os

# Our C kernels bring their own OpenMP runtime next to torch's; spinning idle threads of one starve the other
# (GPTQ's small torch ops ran 5-10x slower once the kernels had run). Passive waiting avoids it; it must be set
# before the kernel library is loaded (lazily, on first use). A user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from . import autograd, cpu, moe_cpu, moe_triton, triton  # noqa: E402
from .activations import ACTIVATIONS, GATED, activation_name  # noqa: E402
from .moe import check_experts, check_routing, moe, moe_op  # noqa: E402
from .ops import check_packed, dequantize, qmatmul  # noqa: E402

cpu.register()
autograd.register()
moe_cpu.register()
triton.register()
moe_triton.register()

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
