"""Input Hessians of an expert's two projections, accumulated over token chunks (bounded memory, same order
everywhere, so batched and one-by-one GPTQ see bit-identical Hessians)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..gptq import HessianAccumulator


def _weighted(x: torch.Tensor, token_weights: torch.Tensor | None) -> torch.Tensor:
    if token_weights is None:
        return x
    return x * token_weights.float().clamp_min(0).sqrt().unsqueeze(-1)


TOKEN_CHUNK = 4096  # tokens per Hessian update: bounds the (tokens x intermediate) activations held at once


def _hessian(x: torch.Tensor, transform: Callable | None = None) -> torch.Tensor:
    acc = None
    for start in range(0, max(x.shape[0], 1), TOKEN_CHUNK):
        part = x[start : start + TOKEN_CHUNK]
        part = transform(part) if transform is not None else part
        if acc is None:
            acc = HessianAccumulator(part.shape[-1], device=x.device)
        acc.add(part)
    return acc.hessian


def input_hessian(x: torch.Tensor, token_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The gate/up projection's input Hessian from an expert's tokens ``x`` (optionally weighted)."""
    return _hessian(_weighted(x, token_weights))


def mid_hessian(
    w_gate_up: torch.Tensor, x: torch.Tensor, act_fn: Callable, token_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """The down projection's input Hessian: of ``act(gate(x)) * up(x)`` (optionally weighted), in token chunks."""

    def mid(part: torch.Tensor) -> torch.Tensor:
        gate, up = (part @ w_gate_up.t()).chunk(2, dim=-1)
        return act_fn(gate) * up

    return _hessian(_weighted(x, token_weights), mid)
