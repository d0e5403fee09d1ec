"""Kernels for packed low-bit weights: torch.library ops with per-device implementations.

Importing this package registers the fast CPU kernels and, when Triton is importable, the Triton CUDA kernels.
"""

from . import cpu, triton
from .ops import check_packed, dequantize, qmatmul

cpu.register()
triton.register()

__all__ = ["check_packed", "dequantize", "qmatmul"]
