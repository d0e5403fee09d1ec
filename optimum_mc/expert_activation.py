"""What an experts module computes between its two projections, read from the module itself.

Most transformers experts modules hold an ``act_fn`` and compute ``act_fn(gate) * up``. Some compute a gated
activation of their own instead (hy_v4: ``silu(gate.clamp(max=L)) * up.clamp(-L, L)``; minimax_m3_vl: a clamped
SwiGLU with ``alpha`` and ``up + 1``), in a method with no common name. :func:`experts_act_fn` finds the
activation without reading names: it runs the module's own ``forward`` on a probe copy with identity weights
(``gate_up = I``, ``down = [I; 0]``, one expert, weight 1), which returns exactly ``glu(gate, up)`` for any
``(gate, up)``; then

* when that equals ``act(gate) * up`` for an activation of ``kernels.activations.ACTIVATIONS`` (on values up to
  +-1000, so a clamp is seen), the plain activation is returned: the fused op runs it;
* otherwise a :class:`GatedActivation` is returned: it evaluates ``glu(gate, up)`` with the module's own code
  (the per-expert loop and calibration call it through :func:`gated`), after checking the computation is
  elementwise per ``(gate_j, up_j)`` pair, which MCExperts' layout needs.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import torch
from torch import nn

from .kernels.activations import ACTIVATIONS
from .kernels.activations import gated as _gated

_CACHE_KEY = "_mc_act_fn"
PROBE_LIMIT = 1000.0  # probe values span +-PROBE_LIMIT: a clamp of the gate or up inside that range is seen


class GatedActivation:
    """``glu(gate, up)`` of an experts module, evaluated by the module's own forward on identity weights."""

    def __init__(self, experts: nn.Module) -> None:
        self.experts_class = type(experts).__name__
        # a shallow copy sharing the module's scalars (limits, alphas) and submodules, with its own parameters
        probe = copy.copy(experts)
        probe._parameters = {}
        probe._buffers = dict(experts._buffers)
        probe._modules = dict(experts._modules)
        probe.num_experts = 1
        self._probe = probe
        self._weights: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, gate: torch.Tensor) -> torch.Tensor:
        raise TypeError(
            f"the experts of {self.experts_class} compute a gated activation of (gate, up), not act(gate) * up; "
            f"call it through optimum_mc.expert_activation.gated(act_fn)(gate, up)"
        )

    def glu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        i = gate.shape[-1]
        key = (i, gate.dtype, gate.device)
        if key not in self._weights:
            eye = torch.eye(2 * i, dtype=gate.dtype, device=gate.device)
            self._weights = {key: (eye.unsqueeze(0), eye[:, :i].unsqueeze(0).contiguous())}
        gu, dn = self._weights[key]
        probe = self._probe
        probe._parameters["gate_up_proj"] = nn.Parameter(gu, requires_grad=False)
        probe._parameters["down_proj"] = nn.Parameter(dn, requires_grad=False)
        for attr, value in (("hidden_dim", 2 * i), ("hidden_size", 2 * i), ("intermediate_dim", i)):
            if isinstance(probe.__dict__.get(attr), int):  # a forward reading its sizes sees the probe's
                probe.__dict__[attr] = value
        h = torch.cat([gate, up], dim=-1).reshape(-1, 2 * i)
        index = torch.zeros(h.shape[0], 1, dtype=torch.long, device=h.device)
        weight = torch.ones(h.shape[0], 1, dtype=h.dtype, device=h.device)
        out = probe.forward(h, index, weight)  # differentiable in gate / up (LoRA trains through it)
        return out[:, :i].reshape(gate.shape)

    def __repr__(self) -> str:
        return f"GatedActivation({self.experts_class})"


def gated(act_fn: Callable) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``glu(gate, up)`` of an experts activation as a function: ``act_fn(gate) * up`` of an element-wise one, the
    ``glu`` of a gated object (a :class:`GatedActivation`, a ``ClampedSwiGLU``, ...). The curried form of
    :func:`optimum_mc.kernels.activations.gated`."""
    return functools.partial(_gated, act_fn)


def _probe_values(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    grid = torch.linspace(-PROBE_LIMIT, PROBE_LIMIT, 41)
    gate = torch.cat([torch.randn(8, i, generator=g) * 4, grid[torch.randint(0, 41, (4, i), generator=g)]])
    up = torch.cat([torch.randn(8, i, generator=g) * 4, grid[torch.randint(0, 41, (4, i), generator=g)]])
    return gate, up


def _probe(experts: nn.Module) -> Callable | None:
    """The activation read from ``experts.forward`` (see the module docstring), or None when it is not an
    elementwise function of ``(gate, up)`` pairs that the probe could evaluate."""
    i = 8
    act = GatedActivation(experts)
    try:
        with torch.device("cpu"), torch.no_grad():  # the model may be built under a meta-device context
            return _read(act, i)
    except Exception:  # a forward the identity probe cannot run: not discoverable this way
        return None


def _read(act: GatedActivation, i: int) -> Callable | None:
    gate, up = _probe_values(i)
    got = act.glu(gate, up)
    perm = torch.randperm(i, generator=torch.Generator().manual_seed(1))
    swapped = act.glu(gate[:, perm], up[:, perm])
    alone = torch.cat([act.glu(gate[k : k + 1], up[k : k + 1]) for k in range(gate.shape[0])])
    moved = act.glu(gate + torch.eye(1, i) * 3, up - torch.eye(1, i) * 3)  # pair 0 changed: the others must not
    if got.shape != gate.shape or not torch.isfinite(got).all():
        return None
    # (vectorized and scalar tails of an activation may differ in the last bit: compared to 1e-6)
    same = torch.allclose(swapped, got[:, perm], rtol=1e-6, atol=1e-6) and torch.allclose(alone, got, 1e-6, 1e-6)
    if not same or not torch.allclose(moved[:, 1:], got[:, 1:], rtol=1e-6, atol=1e-6):
        return None  # mixes pairs or tokens: not the gate/up layout MCExperts computes
    for fn in ACTIVATIONS.values():
        if torch.allclose(got, fn(gate) * up, rtol=1e-6, atol=1e-6):
            return fn
    return act


def probed_act_fn(experts: nn.Module) -> Callable | None:
    """The activation read from the module's forward (a plain activation of ``ACTIVATIONS`` or a
    :class:`GatedActivation`), whatever its ``act_fn``; None when the probe cannot read one. Cached on the module.

    :func:`optimum_mc.expert_layout.experts_layout` falls back to it when the module's gate is none it can name."""
    if _CACHE_KEY not in experts.__dict__:
        experts.__dict__[_CACHE_KEY] = _probe(experts)
    return experts.__dict__[_CACHE_KEY]


def experts_act_fn(experts: nn.Module) -> Callable | None:
    """The activation of a transformers experts module: its ``act_fn``, else one read from its forward
    (:func:`probed_act_fn`); None when neither is found."""
    act = getattr(experts, "act_fn", None)
    if callable(act):
        return act
    return probed_act_fn(experts)
