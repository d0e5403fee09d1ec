"""Input Hessians of an expert's two projections, accumulated over token chunks (bounded memory, same order
everywhere, so batched and one-by-one GPTQ see bit-identical Hessians).

Each chunk's ``X^T X`` is added in fp32 straight into the result (``addmm_``; a fp64 running sum of an
intermediate-sized Hessian would double its memory), optionally into a caller's buffer (a slot of a batched GPTQ
workspace), so one expert's down-projection Hessian costs its own size plus one chunk of activations.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..kernels.activations import intermediate

TOKEN_CHUNK = 1024  # tokens per update: bounds the (tokens x 2*intermediate) activations held at once


def _weighted(x: torch.Tensor, token_weights: torch.Tensor | None) -> torch.Tensor:
    if token_weights is None:
        return x
    return x * token_weights.float().clamp_min(0).sqrt().unsqueeze(-1)


def _hessian(
    x: torch.Tensor,
    transform: Callable | None = None,
    token_weights: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``2/n sum_t y_t y_t^T`` with ``y = transform(sqrt(w_t) x_t)`` (fp32), in ``out`` when given."""
    n = x.shape[0]
    for start in range(0, max(n, 1), TOKEN_CHUNK):
        part = x[start : start + TOKEN_CHUNK].float()
        if token_weights is not None:
            part = _weighted(part, token_weights[start : start + TOKEN_CHUNK])
        part = transform(part) if transform is not None else part
        if start == 0:
            d = part.shape[-1]
            out = torch.empty(d, d, device=x.device) if out is None else out
            out.zero_()
        out.addmm_(part.t(), part)
    return out.mul_(2.0 / max(n, 1))


def input_hessian(
    x: torch.Tensor, token_weights: torch.Tensor | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The gate/up projection's input Hessian from an expert's tokens ``x`` (optionally weighted)."""
    return _hessian(x, None, token_weights, out)


def mid_hessian(
    w_gate_up: torch.Tensor,
    x: torch.Tensor,
    act_fn: Callable,
    token_weights: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The down projection's input Hessian: of ``act(gate(x)) * up(x)`` (optionally weighted), in token chunks."""

    def mid(part: torch.Tensor) -> torch.Tensor:
        return intermediate(act_fn, part @ w_gate_up.t())

    return _hessian(x, mid, token_weights, out)
