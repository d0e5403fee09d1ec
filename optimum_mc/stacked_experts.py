"""Experts stored as three stacked 2-D matrices (DBRX's ``w1`` / ``v1`` / ``w2``), read by structure.

A module with ``num_experts`` = E whose parameters are exactly three 2-D ``(E * I, H)`` matrices holds, for each
expert, ``I`` rows of each one after the other; the down matrix is stored ``(I, H)`` per expert, so that
``y = (act(x @ G_e.T) * (x @ U_e.T)) @ D_e``. Which matrix is the gate, the up and the down one is not read from
their names: :func:`stacked_roles` runs the module's forward on its real weights (tokens all routed to expert 0)
and keeps the assignment that reproduces it; the gate is the module's only parameter-free leaf submodule (its
activation). :func:`stacked_tensors` gives them in MC's layout (``gate_up_proj (E, 2I, H)``, ``down_proj
(E, H, I)``); :mod:`.expert_layout` reads the sizes (``ExpertsLayout.stacked``) and converts.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn

from .errors import UnsupportedArchitectureError
from .kernels.activations import gated


def stacked_weights(module: nn.Module) -> list[tuple[str, torch.Tensor]] | None:
    """The three 2-D ``(E * I, H)`` matrices of stacked experts (``num_experts`` = E, see the module docstring),
    by name in the module; None for any other module (no ``num_experts``, other parameters, other shapes)."""
    e = getattr(module, "num_experts", None)
    if not isinstance(e, int) or e < 1 or isinstance(getattr(module, "gate_up_proj", None), torch.Tensor):
        return None
    params = list(module.named_parameters())
    if len(params) != 3 or any(p.dim() != 2 or p.shape != params[0][1].shape for _, p in params):
        return None
    rows = int(params[0][1].shape[0])
    return params if rows % e == 0 and rows // e > 1 else None


def stacked_act(name: str, module: nn.Module) -> Any:
    """The stacked experts' gate activation: the module's only parameter-free leaf submodule; typed error
    otherwise."""
    acts = [m for m in module.modules() if m is not module and not list(m.parameters()) and not list(m.children())]
    if len(acts) != 1:
        raise UnsupportedArchitectureError(
            f"experts module `{name}` ({type(module).__name__}) holds stacked 2-D experts with {len(acts)} "
            f"parameter-free submodules; expected one activation (check: experts activation)."
        )
    return acts[0]


def stacked_roles(module: nn.Module, inter: int, act_fn: Any) -> tuple[str, str, str]:
    """``(gate, up, down)`` names of stacked experts' matrices: the assignment whose expert 0 reproduces the
    module's forward on tokens all routed to expert 0 (real weights); typed error when none does."""
    params = dict(stacked_weights(module))
    w = next(iter(params.values()))
    e, i, h = int(module.num_experts), inter, int(w.shape[1])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, h, generator=g).to(device=w.device, dtype=w.dtype)
    idx = torch.zeros(8, 1, dtype=torch.long, device=w.device)
    with torch.no_grad():
        want = module(x, idx, torch.ones(8, 1, dtype=w.dtype, device=w.device)).reshape(8, h).float()
        tol = (1e-4 if w.dtype == torch.float32 else 2e-2) * (float(want.abs().max()) + 1e-6)
        for gate, up, down in itertools.permutations(params):
            gw, uw, dw = (params[n].view(e, i, h)[0] for n in (gate, up, down))
            got = (gated(act_fn, x @ gw.t(), x @ uw.t()) @ dw).float()
            if float((got - want).abs().max()) <= tol:
                return gate, up, down
    raise UnsupportedArchitectureError(
        f"experts module `{type(module).__name__}` holds stacked 2-D experts ({', '.join(params)}) whose forward "
        f"no assignment of gate / up / down matrices reproduces (check: experts layout)."
    )


def stacked_tensors(module: nn.Module, num_experts: int, inter: int, act_fn: Any) -> dict[str, torch.Tensor | None]:
    """The stacked experts' weights in MC's layout (exact copies: reshapes and a transpose), no biases."""
    hidden = int(stacked_weights(module)[0][1].shape[1])
    shape = (num_experts, inter, hidden)
    gate, up, down = (module.get_parameter(n).detach().view(shape) for n in stacked_roles(module, inter, act_fn))
    out = {"gate_up_proj": torch.cat([gate, up], dim=1), "down_proj": down.transpose(1, 2)}
    return {**{k: v.contiguous() for k, v in out.items()}, "gate_up_proj_bias": None, "down_proj_bias": None}
