"""Online dynamic pruning (ODP) in vLLM serving: the switch, per-layer settings, token protection, statistics.

The rule is transformers' (:mod:`optimum_mc.pruning.rule`): a token drops a top-k slot other than its top one when
that slot's routing weight / the top weight is below the layer's threshold (the checkpoint's calibrated
``odp_thresholds``, or its ``odp_threshold`` override), in the MoE layers ``odp_layers`` selects; dropped slots get
index E and ``optimum_mc::moe`` skips them (on CPU decode steps the fused C kernel applies the rule itself).

Switch (per engine / server), first that is set wins:

- ``hf_overrides={"mc_odp": True}`` (offline ``LLM``) / ``--hf-overrides '{"mc_odp": true}'`` (server);
- environment ``OPTIMUM_MC_ODP=1`` / ``0``;
- the checkpoint's ``quantization_config.odp`` (what transformers does when loading it).

Token protection: transformers keeps all experts for the ``odp_protect_ratio`` share of each sequence's tokens that
receive the most attention; vLLM does not expose attention scores, so the substitute protects each sequence's first
``N`` positions (where attention sinks sit), ``N`` from ``hf_overrides={"mc_odp_protect_first": N}`` or
``OPTIMUM_MC_ODP_PROTECT_FIRST`` (default :data:`DEFAULT_PROTECT_FIRST`; 0: no protection).

Statistics: every MoE layer counts routed slots while ODP is on; :func:`odp_stats` reads them in the process that runs
the model (offline with ``VLLM_ENABLE_V1_MULTIPROCESSING=0``), and the first MoE layer logs the share of skipped
expert evaluations every ``OPTIMUM_MC_ODP_LOG_EVERY`` forward passes (default 0: never) on logger ``vllm.optimum_mc``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ...errors import MCConfigError

DEFAULT_PROTECT_FIRST = 0

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


@dataclass
class ODPSettings:
    """What one engine's MC config resolved: on/off, the first positions protected, thresholds per MoE layer
    (0 where ODP is not active)."""

    enabled: bool = False
    protect_first: int = DEFAULT_PROTECT_FIRST
    thresholds: dict[int, float] | None = None  # decoder layer index -> threshold (0: inactive)
    log_every: int = 0


def _flag(value, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise MCConfigError(f"{where} must be true or false, got {value!r}.")


def _count(value, where: str) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = -1
    if isinstance(value, bool) or n < 0:
        raise MCConfigError(f"{where} must be a count >= 0, got {value!r}.")
    return n


def resolve(raw: dict, moe_layers: list[int], hf_config=None) -> ODPSettings:
    """ODP settings of an engine from the checkpoint's ``quantization_config`` (``raw``), ``hf_config``'s overrides
    and the environment (see the module docstring for the order)."""
    from ...pruning.odp import select_layers

    over = getattr(hf_config, "mc_odp", None)
    if over is not None:
        enabled = _flag(over, "hf_overrides mc_odp")
    elif os.environ.get("OPTIMUM_MC_ODP") is not None:
        enabled = _flag(os.environ["OPTIMUM_MC_ODP"], "OPTIMUM_MC_ODP")
    else:
        enabled = bool(raw.get("odp", False))
    first = getattr(hf_config, "mc_odp_protect_first", None)
    if first is not None:
        protect = _count(first, "hf_overrides mc_odp_protect_first")
    else:
        protect = _count(os.environ.get("OPTIMUM_MC_ODP_PROTECT_FIRST", DEFAULT_PROTECT_FIRST),
                         "OPTIMUM_MC_ODP_PROTECT_FIRST")  # fmt: skip
    log_every = _count(os.environ.get("OPTIMUM_MC_ODP_LOG_EVERY", 0), "OPTIMUM_MC_ODP_LOG_EVERY")
    if not enabled:
        return ODPSettings(False, protect, None, log_every)
    fixed, calibrated = raw.get("odp_threshold"), raw.get("odp_thresholds")
    if isinstance(fixed, (list, tuple)):
        per_layer = [float(t) for t in fixed]
    elif fixed is not None:
        per_layer = [float(fixed)] * len(moe_layers)
    elif calibrated:
        per_layer = [float(t) for t in calibrated]
    else:
        raise MCConfigError(
            "ODP is switched on, but the checkpoint's quantization_config has no odp_thresholds (nor "
            "odp_threshold): calibrate it with optimum-mc (optimum_mc.calibrate_odp, then save_pretrained) or "
            "switch ODP off."
        )
    if len(per_layer) != len(moe_layers) or not all(0 < t <= 1 for t in per_layer):
        raise MCConfigError(
            f"ODP thresholds {per_layer} must be one value in (0, 1] per MoE layer ({len(moe_layers)} layers)."
        )
    active = set(select_layers(moe_layers, raw.get("odp_layer_scores"), raw.get("odp_layers")))
    thresholds = {i: (t if i in active else 0.0) for i, t in zip(moe_layers, per_layer)}
    return ODPSettings(True, protect, thresholds, log_every)


# --- statistics (per process) ---

_COUNTERS: dict[str, tuple[int, torch.Tensor]] = {}  # layer prefix -> (number of experts E, int64 E + 3 counts)


def counters(prefix: str, num_experts: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The counts of layer ``prefix`` (``pruning.rule.count_routing``'s layout) on ``device`` (the routing's: the
    counting adds to them without a host sync), created on first use; counts so far move along."""
    entry = _COUNTERS.get(prefix)
    if entry is None or entry[0] != num_experts:
        entry = (num_experts, torch.zeros(num_experts + 3, dtype=torch.int64, device=device))
        _COUNTERS[prefix] = entry
    elif entry[1].device != torch.device(device):
        entry = (num_experts, entry[1].to(device))
        _COUNTERS[prefix] = entry
    return entry[1]


def odp_stats() -> dict:
    """ODP's counts in this process: per MoE layer ``{"evaluated", "dropped", "tokens"}`` (top-k slots run / skipped)
    and ``"skipped_share"``: dropped / (evaluated + dropped) over all layers (0.0 before any routing)."""
    layers, ev, dr = {}, 0, 0
    for prefix, (e, c) in sorted(_COUNTERS.items()):
        evaluated, dropped, tokens = int(c[:e].sum()), int(c[e]), int(c[e + 2])
        layers[prefix] = {"evaluated": evaluated, "dropped": dropped, "tokens": tokens}
        ev, dr = ev + evaluated, dr + dropped
    return {"layers": layers, "evaluated": ev, "dropped": dr, "skipped_share": dr / (ev + dr) if ev + dr else 0.0}


def reset_odp_stats() -> None:
    """Zero this process's ODP counts."""
    for _, c in _COUNTERS.values():
        c.zero_()


# --- token protection: the first N positions of every sequence ---

_POSITIONS: dict = {"meta": None, "key": None, "first": None}  # the metadata object is kept: ids are not reused


def protected_tokens(num_tokens: int, protect_first: int) -> torch.Tensor | None:
    """Boolean ``(num_tokens,)``: tokens at positions < ``protect_first`` in their sequence, from vLLM's attention
    metadata of this forward pass; None when none is protected (or no metadata: profiling / dummy runs)."""
    if protect_first <= 0:
        return None
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return None
    meta = get_forward_context().attn_metadata
    if isinstance(meta, list):
        meta = meta[0] if meta else None
    md = next(iter(meta.values()), None) if isinstance(meta, dict) else meta
    qsl, seq_lens = getattr(md, "query_start_loc", None), getattr(md, "seq_lens", None)
    if qsl is None or seq_lens is None:
        return None
    key = (num_tokens, protect_first)
    if _POSITIONS["meta"] is md and _POSITIONS["key"] == key:
        return _POSITIONS["first"]
    n = seq_lens.shape[0]
    qsl = qsl[: n + 1].long().cpu()
    qlen = qsl[1:] - qsl[:-1]
    start = seq_lens.long().cpu() - qlen  # position of each request's first token in this step
    first = None
    if bool((start < protect_first).any()):
        tok = torch.arange(num_tokens)
        req = torch.searchsorted(qsl[1:], tok, right=True).clamp_max(n - 1)
        pos = tok - qsl[req] + start[req]
        first = (pos < protect_first) & (tok < qsl[-1])
        first = first.to(seq_lens.device) if bool(first.any()) else None
    _POSITIONS["meta"], _POSITIONS["key"], _POSITIONS["first"] = md, key, first
    return first
