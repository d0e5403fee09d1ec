"""Kernels for packed low-bit weights: torch.library ops with per-device implementations."""

from .ops import check_packed, dequantize, qmatmul

__all__ = ["check_packed", "dequantize", "qmatmul"]
