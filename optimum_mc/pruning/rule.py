"""ODP's routing rule (paper Eq. 5) and token protection (Eq. 6) as pure tensor functions.

- A token drops its k-th selected expert (k >= 2) when that slot's routing weight divided by the token's top-1
  weight (the max over its slots; DeepSeek's top-k is unsorted) is below the layer threshold mu.
- A dropped slot gets index ``num_experts`` (experts modules skip it) and weight 0. For a normalized router the kept
  weights are rescaled so they keep the original sum (1 for softmax top-k, the routed scaling factor for DeepSeek);
  for an un-normalized one (sigmoid or softmax scores without renormalization) they stay as they are
  (``renormalize=False``; :mod:`.routing` tells which a router is).
- Protected tokens (the top ``ratio`` share of each sequence by importance) keep all their experts.

The rule's tensor functions (``slot_ratios``, ``drop_mask``, ``apply_drop``, ``count_routing``) live in
:mod:`optimum_mc.kernels.odp_rule` (``optimum_mc::moe`` applies them) and are re-exported here.
"""

from __future__ import annotations

import torch

from ..kernels.odp_rule import apply_drop, count_routing, drop_mask, slot_ratios

__all__ = ["apply_drop", "count_routing", "drop_mask", "protected_tokens", "slot_ratios"]


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
