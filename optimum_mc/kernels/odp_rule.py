"""ODP's routing rule as pure tensor functions: part of the ``optimum_mc::moe`` contract (the op applies it when
given ``odp_threshold`` > 0 and counts into ``odp_counts``), re-exported by :mod:`optimum_mc.pruning.rule`.

- A token drops its k-th selected expert (k >= 2) when that slot's routing weight divided by the token's top-1
  weight (the max over its slots; DeepSeek's top-k is unsorted) is below the layer threshold mu (paper Eq. 5).
- A dropped slot gets index ``num_experts`` (the op skips it) and weight 0. For a normalized router the kept weights
  are rescaled so they keep the original sum; for an un-normalized one they stay as they are (``renormalize=False``).
- Counts: int64 ``E + 3``: slots per expert ``[0, E)``, dropped slots ``[E]``, padding slots ``[E + 1]``, tokens
  ``[E + 2]``.
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


def counters(counts: torch.Tensor | None) -> torch.Tensor | None:
    """``optimum_mc::moe``'s ``odp_counts`` as its implementations read it: None or an empty tensor both mean "do not
    count" (compiled callers pass an empty one: inductor cannot lower the op with the mutable argument left None)."""
    return None if counts is None or counts.numel() == 0 else counts


def apply_odp(
    index: torch.Tensor, weights: torch.Tensor, threshold: float, counts: torch.Tensor | None, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``optimum_mc::moe`` does with its ODP arguments, as torch ops: drop by the rule when ``threshold`` > 0
    (kept weights renormalized), then count the resulting routing into ``counts`` (when given)."""
    counts = counters(counts)
    if threshold > 0:
        index, weights = apply_drop(index, weights, drop_mask(weights, threshold), num_experts)
    if counts is not None:
        with torch.no_grad():
            count_routing(counts, index, None, num_experts)
    return index, weights
