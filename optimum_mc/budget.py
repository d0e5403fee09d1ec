"""The allocation's bit budget per MoE layer: ``MCConfig.bits`` as code bits, feasibility checked before any work.

Called by the quantizer before weights load (model on the meta device) and by the pipeline driver; resolves
``candidate_bits=None`` for the model at hand (:data:`~optimum_mc.config.KEEP_1_BIT_FROM`).
"""

from __future__ import annotations

from torch import nn

from .allocation import check_feasible
from .config import KEEP_1_BIT_FROM, MCConfig
from .errors import MCConfigError
from .expert_layout import experts_layout


def expert_code_bits(config: MCConfig, experts: nn.Module) -> float:
    """:meth:`MCConfig.code_bits` for one MoE layer's experts (float or packed; weights may be on meta)."""
    if hasattr(experts, "packed"):
        return config.code_bits(int(experts.hidden_dim), int(experts.intermediate_dim))
    layout = experts_layout(experts)
    return config.code_bits(layout.hidden, layout.inter)


def global_code_bits(num_experts: list[int], code_bits: list[float]) -> float:
    """The code-bit target of ``allocation="global"``: the layers' targets averaged over their experts (equal to each
    of them when every MoE layer's experts have the same shape)."""
    return sum(n * t for n, t in zip(num_experts, code_bits)) / sum(num_experts)


def check_budget(config: MCConfig, num_experts: list[int], code_bits: list[float]) -> None:
    """:func:`~optimum_mc.allocation.check_feasible` for every MoE layer's code-bit target; with
    ``bits_budget="stored"`` the error says how the stored-bits target was converted. ``candidate_bits=None`` is
    resolved here (:data:`~optimum_mc.config.KEEP_1_BIT_FROM`)."""
    if config.candidate_bits is None:
        # 1 bit left out only below KEEP_1_BIT_FROM code bits (where it was measured to lose) and where [2, 3] fit
        low = [] if code_bits and min(code_bits) >= KEEP_1_BIT_FROM else [(2, 3)]
        for cands in [*low, (1, 2, 3)]:
            config.candidate_bits = list(cands)
            try:
                _check_layers(config, num_experts, code_bits)
                return
            except MCConfigError:
                continue
    _check_layers(config, num_experts, code_bits)


def _check_layers(config: MCConfig, num_experts: list[int], code_bits: list[float]) -> None:
    for t in sorted(set(code_bits)):
        sizes = [n for n, c in zip(num_experts, code_bits) if c == t]
        try:
            check_feasible(sizes, config.candidate_bits, t, config.allocation_constraints)
        except MCConfigError as exc:
            if config.bits_budget != "stored":
                raise
            raise MCConfigError(
                f"bits={config.bits} stored bits per expert weight (bits_budget='stored') leaves {t:.4g} bits for "
                f"codes after {config.bits - t:.4g} bits of {config.metadata} scales and zeros "
                f"(group_size={config.group_size}): "
                f"{exc}"
            ) from exc
