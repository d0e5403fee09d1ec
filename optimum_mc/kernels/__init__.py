"""Kernels for packed low-bit weights: ``torch.library`` ops (schemas in :mod:`.ops`) with per-device
implementations.

Importing this package defines the ops and registers the pure-torch defaults (:mod:`.reference`), the CPU C
kernels (:mod:`.cpu`, :mod:`.moe_cpu`) and, when Triton is importable, the Triton CUDA kernels (:mod:`.triton`,
:mod:`.moe_triton`). Code outside this package uses only what is exported here (``tests/kernels/test_contract.py``
checks it).
"""

from . import ops  # noqa: F401, I001  (defines the ops before any implementation registers)
from . import autograd, cpu, moe_cpu, moe_fused, moe_triton, reference, triton  # noqa: F401 (moe_triton: the tiled kernels)
from .activations import ACTIVATIONS, GATED, activation_name, gated, intermediate, projection_rows
from .cpu import int8_decode, moe_decode_tokens
from .moe import check_experts, check_odp_counts, check_routing, moe, moe_op
from .odp_rule import apply_odp
from .ops import check_packed, dequantize, qmatmul, qmatmul_op

reference.register()
autograd.register()
cpu.register()
moe_cpu.register()
triton.register()
moe_fused.register()  # the CUDA op: fused kernels, moe_triton's as fallback / selectable


def int8_kernels_available() -> bool:
    """Whether this CPU (and build) has the AVX512-VNNI/VBMI integer-dot decode kernels."""
    lib = cpu.library()
    return lib is not None and bool(lib.mc_i8dot_available())


__all__ = [
    "ACTIVATIONS",
    "GATED",
    "activation_name",
    "apply_odp",
    "check_experts",
    "check_odp_counts",
    "check_packed",
    "check_routing",
    "dequantize",
    "gated",
    "int8_decode",
    "int8_kernels_available",
    "intermediate",
    "moe",
    "moe_decode_tokens",
    "moe_op",
    "projection_rows",
    "qmatmul",
    "qmatmul_op",
]
