"""Perplexity over non-overlapping token windows (the measure used by the benchmarks and ``optimum-mc eval``)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from transformers.utils.logging import tqdm  # silenced by disable_progress_bar() / HF_HUB_DISABLE_PROGRESS_BARS

from ..errors import CalibrationError


def token_windows(tokenizer, text: str, window: int, max_windows: int | None = None) -> torch.Tensor:
    """Tokenize ``text`` and cut it into ``(n, window)`` non-overlapping windows (the tail is dropped)."""
    # verbose=False: the text is cut into windows below, so the tokenizer's "longer than the specified maximum
    # sequence length ... will result in indexing errors" warning does not apply (issue 20)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt", verbose=False).input_ids[0]
    n = ids.numel() // window
    if n == 0:
        raise CalibrationError(f"text has {ids.numel()} tokens, fewer than one window of {window}.")
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * window].reshape(n, window)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int = 8,
    show_progress: bool = False,
) -> float:
    """exp(mean next-token negative log-likelihood) over all windows (each scored independently)."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    starts: Iterable[int] = range(0, windows.shape[0], batch_size)
    for s in tqdm(starts, desc="perplexity", disable=not show_progress, leave=False):
        ids = windows[s : s + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        loss = nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        nll += loss.item()
        count += ids[:, 1:].numel()
    return math.exp(nll / count)
