"""Modules holding packed low-bit weights."""

from .experts import MCExperts, float_experts_shape
from .linear import QuantLinear
from .nf4_linear import NF4Linear

__all__ = ["MCExperts", "NF4Linear", "QuantLinear", "float_experts_shape"]
