"""ODP's routing rule (paper Eq. 5) and token protection (Eq. 6) as pure tensor functions.

- A token drops its k-th selected expert (k >= 2) when that slot's routing weight divided by the token's top-1
  weight (the max over its slots; DeepSeek's top-k is unsorted) is below the layer threshold mu.
- A dropped slot gets index ``num_experts`` (experts modules skip it) and weight 0. For a normalized router the kept
  weights are rescaled so they keep the original sum (1 for softmax top-k, the routed scaling factor for DeepSeek);
  for an un-normalized one (sigmoid or softmax scores without renormalization) they stay as they are
  (``renormalize=False``; :mod:`.routing` tells which a router is).
- Protected tokens (the top ``ratio`` share of each sequence by importance) keep all their experts.
"""

from __future__ import annotations

import torch


def slot_ratios(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ratio of every slot's weight to the token's top-1 weight ``(T, k)``, and a mask of each token's top slot."""
    w = weights.float()
    top = w.argmax(-1, keepdim=True)
    is_top = torch.zeros_like(w, dtype=torch.bool).scatter_(-1, top, True)
    return w / w.gather(-1, top).clamp_min(1e-20), is_top


def drop_mask(weights: torch.Tensor, threshold: float) -> torch.Tensor:
    """Slots ``(T, k)`` to drop: non-top slots whose weight ratio to the top-1 weight is below ``threshold``."""
    ratio, is_top = slot_ratios(weights)
    return (ratio < threshold) & ~is_top


def apply_drop(
    index: torch.Tensor, weights: torch.Tensor, drop: torch.Tensor, num_experts: int, renormalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mark dropped slots with index ``num_experts`` and weight 0; with ``renormalize`` rescale the kept weights to
    the original sum (a normalized router), else leave them unchanged (an un-normalized one)."""
    total = weights.float().sum(-1, keepdim=True)
    kept = weights.float().masked_fill(drop, 0.0)
    if renormalize:
        kept = kept * (total / kept.sum(-1, keepdim=True).clamp_min(1e-20))
    return index.masked_fill(drop, num_experts), kept.to(weights.dtype)


def protected_tokens(importance: torch.Tensor, valid: torch.Tensor, ratio: float) -> torch.Tensor:
    """Boolean ``(B, L)``: per sequence, the ``round(ratio * valid tokens)`` most important valid tokens."""
    out = torch.zeros_like(valid, dtype=torch.bool)
    if ratio <= 0:
        return out
    score = importance.float().masked_fill(~valid, float("-inf"))
    counts = torch.floor(valid.sum(-1).float() * ratio + 0.5).long()
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return (rank < counts.unsqueeze(-1)) & valid


def count_routing(counts: torch.Tensor, index: torch.Tensor, valid: torch.Tensor | None, num_experts: int) -> None:
    """Add one routing's ODP statistics to ``counts`` (int64 ``E + 3`` on ``index``'s device) without a host sync:
    slots per expert ``[0, E)``, dropped slots ``[E]``, padding slots ``[E + 1]``, tokens ``[E + 2]``."""
    flat = index.reshape(index.shape[0], -1)
    if valid is None:
        tokens = flat.shape[0]
    else:
        v = valid.reshape(-1).to(index.device)
        flat = flat.masked_fill(~v.unsqueeze(-1), num_experts + 1)
        tokens = v.sum()
    flat = flat.reshape(-1).long()
    counts.index_add_(0, flat, torch.ones_like(flat))
    counts[num_experts + 2] += tokens
