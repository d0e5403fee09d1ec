"""The bit budget of an allocation: the exact total a layer's experts can reach, and feasibility checked before
any calibration work."""

from __future__ import annotations

import math

from ..errors import MCConfigError
from .objective import MODES


def layer_budget(num_experts: int, target_bits: float) -> int:
    """Total expert bits allowed for ``num_experts`` experts at an average of ``target_bits``."""
    return int(math.floor(target_bits * num_experts + 1e-9))


def required_bits(candidate_bits: list[int], constraints: bool) -> list[int]:
    """Widths that must be used by at least one expert in every layer (top and second-highest candidate)."""
    cb = sorted(candidate_bits)
    if not constraints or len(cb) < 2:
        return []
    return [cb[-1], cb[-2]] if len(cb) >= 3 else [cb[-1]]


def _reachable(num_free: int, candidate_bits: list[int], cap: int) -> int:
    """Bitset (Python int) of the totals <= ``cap`` that ``num_free`` experts with free widths can reach."""
    reach = 1 if cap >= 0 else 0
    for _ in range(num_free):
        if not reach:
            break
        reach = _shift_or(reach, candidate_bits, cap)
    return reach


def _shift_or(reach: int, candidate_bits: list[int], cap: int) -> int:
    """One more free expert: the totals of ``reach`` plus any candidate width, kept <= ``cap``."""
    out = 0
    for b in candidate_bits:
        out |= reach << b
    return out & ((1 << (cap + 1)) - 1)


def max_total_bits(num_experts: list[int], candidate_bits: list[int], budget: int, constraints: bool) -> int | None:
    """The largest total <= ``budget`` reachable by layers of ``num_experts`` experts (``None``: none is)."""
    cb = sorted(candidate_bits)
    req = required_bits(cb, constraints)
    if any(n < len(req) for n in num_experts):
        return None
    fixed = sum(req) * len(num_experts)
    free = sum(num_experts) - len(req) * len(num_experts)
    reach = _reachable(free, cb, budget - fixed)
    return None if reach == 0 else fixed + reach.bit_length() - 1


def check_feasible(
    num_experts: list[int], candidate_bits: list[int], target_bits: float, constraints: bool, mode: str = "layer"
) -> None:
    """Raise :class:`MCConfigError` if no allocation meets the budget (cheap; called before any weight loads)."""
    if mode not in MODES:
        raise MCConfigError(f"allocation must be one of {MODES}, got {mode!r}.")
    cb = sorted(candidate_bits)
    if not cb or len(set(cb)) != len(cb) or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in cb):
        raise MCConfigError(f"candidate_bits must be distinct positive integers, got {candidate_bits!r}.")
    if not num_experts or any(n < 1 for n in num_experts):
        raise MCConfigError(f"every MoE layer needs at least one expert, got {num_experts!r}.")
    if not math.isfinite(target_bits):
        raise MCConfigError(f"bits must be finite, got {target_bits!r}.")
    req = required_bits(cb, constraints)
    for n in num_experts:
        if n < len(req):
            raise MCConfigError(
                f"a layer has {n} expert(s) but the allocation constraints need one expert at each of {req} bits; "
                f"pass allocation_constraints=False."
            )
    groups = [num_experts] if mode == "global" else [[n] for n in sorted(set(num_experts))]
    for sizes in groups:
        budget = layer_budget(sum(sizes), target_bits)
        if max_total_bits(sizes, cb, budget, constraints) is None:
            n = sum(sizes)
            least = (sum(req) + (sizes[0] - len(req)) * cb[0]) / sizes[0]
            where = "over all MoE layers" if mode == "global" else f"in a layer of {n} experts"
            need = f"one expert at each of {req} bits and the rest at {cb[0]}" if req else f"every expert at {cb[0]}"
            raise MCConfigError(
                f"bits={target_bits} is infeasible with candidate_bits={cb}: the budget {where} is {budget} bits, "
                f"but the smallest allocation ({need}) averages {least:.3f} bits per expert. "
                f"Raise bits{', or pass allocation_constraints=False' if req else ''}."
            )
