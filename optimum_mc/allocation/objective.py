"""The allocation's objective: calibration factors per MoE layer and the cost of each expert at each width."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import CalibrationError, ShapeError

MODES = ("layer", "global", "random", "frequency", "hessian")
SOLVERS = ("cp-sat", "dp")
GRANULARITIES = ("expert", "projection")


@dataclass
class ExpertFactors:
    """Calibration factors of one MoE layer with ``E`` experts and ``C`` candidate bit-widths.

    frequency: ``(E,)`` activation frequency (any positive scale; normalized per layer).
    weight_mass: ``(E,)`` routing-weight mass (any positive scale; normalized per layer).
    loss: ``(E, C)`` quantization loss per candidate width (ascending candidate order).
    projection_loss: ``(E, 2, C)`` the loss with only the gate/up (``[:, 0]``) or only the down (``[:, 1]``)
        projection quantized; needed by ``granularity="projection"`` only.
    """

    frequency: torch.Tensor
    weight_mass: torch.Tensor
    loss: torch.Tensor
    projection_loss: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return int(self.frequency.numel())


def _check_factors(factors: list[ExpertFactors], num_candidates: int) -> None:
    for i, f in enumerate(factors):
        e = f.num_experts
        if e == 0 or f.frequency.dim() != 1 or f.weight_mass.shape != (e,) or f.loss.shape != (e, num_candidates):
            raise ShapeError(
                f"factors of MoE layer #{i}: frequency {tuple(f.frequency.shape)}, weight_mass "
                f"{tuple(f.weight_mass.shape)} and loss {tuple(f.loss.shape)} must be (E,), (E,) and "
                f"(E, {num_candidates}) with E >= 1."
            )
        for name in ("frequency", "weight_mass", "loss"):
            t = getattr(f, name)
            if not torch.isfinite(t).all() or (t < 0).any():
                raise CalibrationError(f"{name} of MoE layer #{i} must be finite and >= 0.")


def objective_costs(f: ExpertFactors, alpha: float, beta: float, gamma: float) -> np.ndarray:
    """``phi_e^alpha * w_e^beta * eps(e, b)^gamma`` as float64 ``(E, C)``, phi and w normalized per layer."""
    phi = f.frequency.detach().cpu().double().clamp_min(0)
    w = f.weight_mass.detach().cpu().double().clamp_min(0)
    phi = phi / phi.sum() if phi.sum() > 0 else torch.full_like(phi, 1 / phi.numel())
    w = w / w.sum() if w.sum() > 0 else torch.full_like(w, 1 / w.numel())
    eps = f.loss.detach().cpu().double().clamp_min(0)
    return (phi.pow(alpha) * w.pow(beta)).unsqueeze(1).mul(eps.pow(gamma)).numpy()


def allocation_cost(
    bits_per_layer: list[list[int]],
    factors: list[ExpertFactors],
    candidate_bits: list[int],
    alpha: float = 1.0,
    beta: float = 1.5,
    gamma: float = 1.0,
) -> float:
    """The objective value of an allocation."""
    cb = sorted(candidate_bits)
    total = 0.0
    for bits, f in zip(bits_per_layer, factors):
        c = objective_costs(f, alpha, beta, gamma)
        total += float(sum(c[e, cb.index(b)] for e, b in enumerate(bits)))
    return total


def _mode_costs(f: ExpertFactors, cb: list[int], mode: str, alpha: float, beta: float, gamma: float) -> np.ndarray:
    """The ``(E, C)`` cost matrix a mode minimizes (see the module docstring)."""
    if mode == "frequency":
        synthetic = torch.tensor([2.0**-b for b in cb], dtype=torch.float64).expand(f.num_experts, -1)
        return objective_costs(ExpertFactors(f.frequency, f.weight_mass, synthetic), 1.0, 0.0, 1.0)
    if mode == "hessian":
        return f.loss.detach().cpu().double().clamp_min(0).numpy()
    return objective_costs(f, alpha, beta, gamma)
