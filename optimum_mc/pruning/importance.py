"""Token importance for ODP's protection: attention received x L1 norm of the hidden state (paper Eq. 6).

Attention received by key token j = the column mean of the attention probabilities over the queries that can
attend to it (causal: queries i >= j, and never padding), averaged over heads. The reference implementation sums
rows instead, which is 1 for every token and collapses the score to the norm; we implement the column version.

With ``sdpa`` (the default) probabilities are never materialized, so ODP installs an attention function
(registered as ``"mc_odp_<original>"``, e.g. ``"mc_odp_sdpa"``: one name per original implementation, whose mask
function it shares, so a model enabling ODP never changes another model's masks) that calls the model's original
attention and, for layers where ODP is active, recomputes the probabilities from the same query / key tensors in
chunks of ``CHUNK`` queries (memory O(chunk x keys) per head): exact, at the cost of one more QK^T pass. Decode
steps (one new token with a KV cache) give each new token only its own attention; with ``round(ratio * 1) = 0`` no
token is protected then, so decode uses the plain rule.
"""

from __future__ import annotations

import logging
import re
import sys

import torch
from torch import nn

ATTN_PREFIX = "mc_odp_"
CHUNK = 256

logger = logging.getLogger(__name__)


def received_attention(
    query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scaling: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """For the current tokens (the last ``Lq`` keys): mean attention received ``(B, Lq)`` and validity ``(B, Lq)``.

    ``query (B, Hq, Lq, D)``, ``key (B, Hkv, Lk, D)``; ``mask`` is None (causal), boolean (True = attend) or
    additive float, broadcastable to ``(B, 1|H, Lq, Lk)``.
    """
    b, hq, lq, d = query.shape
    lk = key.shape[2]
    if key.shape[1] != hq:
        key = key.repeat_interleave(hq // key.shape[1], dim=1)
    scale = scaling if scaling is not None else d**-0.5
    col_sum = torch.zeros(b, hq, lk, dtype=torch.float32, device=query.device)
    col_cnt = torch.zeros(b, 1, lk, dtype=torch.float32, device=query.device)
    offset = lk - lq
    kpos = torch.arange(lk, device=query.device)
    for s in range(0, lq, CHUNK):
        q = query[:, :, s : s + CHUNK].float()
        scores = q @ key.float().transpose(-1, -2) * scale  # (B, H, c, Lk)
        if mask is None:
            qpos = torch.arange(s, s + q.shape[2], device=query.device) + offset
            allowed = (kpos.view(1, -1) <= qpos.view(-1, 1)).view(1, 1, q.shape[2], lk)
        elif mask.dtype == torch.bool:
            allowed = mask[..., s : s + q.shape[2], :lk]
        else:
            allowed = mask[..., s : s + q.shape[2], :lk] > torch.finfo(mask.dtype).min / 2
            scores = scores + mask[..., s : s + q.shape[2], :lk].float()
        allowed = allowed.expand(b, -1, -1, -1)
        probs = torch.softmax(scores.masked_fill_(~allowed, float("-inf")), dim=-1)
        if mask is not None:  # a query row with no allowed key (padding) gives NaN: it receives nothing
            probs.nan_to_num_(0.0)  # (causal without a mask: every query attends at least to itself)
        col_sum += probs.sum(2)
        col_cnt += allowed[:, :1].float().sum(2)
    received = (col_sum.mean(1) / col_cnt[:, 0].clamp_min(1.0))[:, offset:]
    valid = (col_cnt[:, 0] > 0)[:, offset:]
    return received, valid


def _eager_for(module: nn.Module):
    return sys.modules[type(module).__module__].eager_attention_forward


def odp_attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """ODP's attention function: the model's original attention, plus importance for ODP layers."""
    out = module._mc_odp_inner(module, query, key, value, attention_mask, **kwargs)
    state = getattr(module, "_mc_odp_state", None)
    if state is not None and state.enabled:
        if state.protect_ratio > 0 and query.shape[2] > 1:
            state.received, state.valid = received_attention(query, key, attention_mask, kwargs.get("scaling"))
        else:
            state.received = None
            state.valid = _valid_only(query, key, attention_mask)
    return out


def _valid_only(query, key, mask) -> torch.Tensor | None:
    """Non-padding current tokens ``(B, Lq)`` from the mask (None: all valid). A decode step's single token is
    always valid (generation pads only prompts), so it needs no mask work, and the router hook can then leave the
    rule to the experts' fused kernel."""
    if mask is None or query.shape[2] == 1:
        return None
    lq, lk = query.shape[2], key.shape[2]
    m = mask[:, :1, :, :lk]
    allowed = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
    return allowed.any(2)[:, 0, lk - lq :].expand(query.shape[0], -1)


def attention_name(original: str) -> str:
    """The name ODP's attention function is registered under for a model whose attention was ``original``."""
    return ATTN_PREFIX + re.sub(r"[^0-9A-Za-z_]", "_", original)


def install_attention(model: nn.Module, attention_modules: list[nn.Module]) -> None:
    """Route every attention module through :func:`odp_attention` (idempotent; restorable).

    The function is registered with transformers' ``AttentionInterface`` under :func:`attention_name` of the
    original implementation (and the original's mask function under the same name: the same name always maps to
    the same pair, whichever model registered it) and selected with the model's public ``set_attn_implementation``,
    which validates it.
    """
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    target = _attention_owner(model)
    current = target.config._attn_implementation
    if current and current.startswith(ATTN_PREFIX):
        return
    original = current or "sdpa"
    name = attention_name(original)
    ALL_ATTENTION_FUNCTIONS.register(name, odp_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    for m in attention_modules:
        m._mc_odp_inner = ALL_ATTENTION_FUNCTIONS.get_interface(original, _eager_for(m))
    target.set_attn_implementation(name)
    if target.config._attn_implementation != name:  # the model cannot switch (transformers warned why)
        logger.warning(
            "optimum-mc: %s cannot switch its attention implementation, so ODP runs without token protection",
            type(model).__name__,
        )
        return
    model._mc_odp_original_attn = original


def _attention_owner(model: nn.Module) -> nn.Module:
    """The model whose attention implementation ODP switches: ``model``, or the text decoder of a multimodal
    wrapper (``get_decoder()`` with a config of its own): its towers need not take ODP's implementation (gemma4's
    audio model refuses any but eager) and ODP reads no importance from them."""
    get = getattr(model, "get_decoder", None)
    try:
        dec = get() if callable(get) else None
    except Exception:
        dec = None
    own = getattr(dec, "config", None)
    if isinstance(dec, nn.Module) and own is not None and own is not getattr(model, "config", None):
        if callable(getattr(dec, "set_attn_implementation", None)):
            return dec
    return model


def uninstall_attention(model: nn.Module) -> None:
    """Give the model back the attention implementation it had before ODP (unless the user changed it since)."""
    original = getattr(model, "_mc_odp_original_attn", None)
    if original is None:
        return
    target = _attention_owner(model)
    if target.config._attn_implementation == attention_name(original):
        target.set_attn_implementation(original)
    del model._mc_odp_original_attn
