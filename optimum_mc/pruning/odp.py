"""Online dynamic pruning on a loaded model: switch it on/off, calibrate thresholds, rank layers, read statistics.

ODP lives at the router/experts boundary of every supported architecture: a forward hook on each MoE router
rewrites ``(router_logits, top_k_weights, top_k_index)`` with :mod:`.rule`, so a float experts module simply skips
dropped slots. :class:`~optimum_mc.nn.MCExperts` instead holds its layer's :class:`ODPLayerState` (``experts.odp``)
and passes the threshold and counters to ``optimum_mc::moe``, which applies the rule and counts (inside the C decode
kernel on CPU); the hook then leaves the routing alone. All state sits on the model's modules.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ..architectures import calls_attention_interface, decoder_layers, moe_blocks, require_moe, router_output_positions
from ..errors import MCConfigError
from ..expert_layout import experts_weight, gate_up_weight
from ..kernels.activations import projection_rows
from .importance import install_attention, uninstall_attention
from .routing import routing_is_normalized
from .rule import apply_drop, count_routing, drop_mask, protected_tokens, slot_ratios

logger = logging.getLogger(__name__)

DEFAULT_LAYER_SHARE = 0.625  # the paper prunes about 20 of 32 layers


@dataclass
class ODPStats:
    tokens: int = 0
    slots: int = 0
    evaluated: int = 0
    params: float = 0.0
    bytes: float = 0.0

    def as_dict(self) -> dict:
        t = max(self.tokens, 1)
        return {
            "tokens": self.tokens,
            "expert_evaluations": self.evaluated,
            "skipped_fraction": 1.0 - self.evaluated / self.slots if self.slots else 0.0,
            "active_expert_params_per_token": self.params / t,
            "active_expert_bytes_per_token": self.bytes / t,
        }


@dataclass
class ODPLayerState:
    """ODP settings and counters of one MoE layer (attached to its router and attention modules)."""

    layer_idx: int
    num_experts: int
    threshold: float
    protect_ratio: float
    enabled: bool
    expert_params: torch.Tensor
    expert_bytes: torch.Tensor
    stats: ODPStats = field(default_factory=ODPStats)
    received: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    handle: object | None = None
    # statistics not yet folded into ``stats``: int64 (E + 3) on the routing's device (rule.count_routing)
    counts: torch.Tensor | None = None
    # the layer's experts module when ODP runs inside its optimum_mc::moe call (MCExperts, whose ``odp`` is this
    # state: it asks experts_routing each call); the router hook then leaves the routing alone
    experts: nn.Module | None = None
    # whether the router renormalizes its selected weights (routing.py): kept weights rescaled to their sum or not
    renormalize: bool = True

    def router_hook(self, module: nn.Module, args: tuple, output: tuple):
        if self.experts is not None:
            return None  # the experts module asks experts_routing and ODP runs inside optimum_mc::moe
        pos = router_output_positions(output)
        logits, weights, index = (output[i] for i in pos)
        index2, weights2 = self._rule(args[0], int(logits.shape[-1]), index, weights)
        out = list(output)
        out[pos[1]], out[pos[2]] = weights2, index2
        return tuple(out)

    def experts_routing(
        self, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor | None]:
        """For an experts module that passes ODP to ``optimum_mc::moe`` (:class:`~optimum_mc.nn.MCExperts`, whose
        ``odp`` this state is): ``(index, weights, odp_threshold, odp_counts)`` for this call. Without padding or
        protected tokens the routing is returned as it came, with the layer's threshold (0 where ODP is off in this
        layer: counted only) and counters, and the op applies the rule and counts (inside the C decode kernel on
        CPU); otherwise the rule runs here in torch ops (as the router hook does for other experts modules) and the
        op gets neither."""
        t = index.reshape(-1, index.shape[-1]).shape[0]
        valid = self.valid is not None and self.valid.numel() == t
        protect = self.enabled and self.received is not None and self.received.numel() == t
        if not valid and not protect:
            self.received = self.valid = None
            return index, weights, (self.threshold if self.enabled else 0.0), self._counters(index.device)
        index, weights = self._rule(hidden, self.num_experts, index, weights)
        return index, weights, 0.0, None

    def _rule(
        self, hidden: torch.Tensor, width: int, index: torch.Tensor, weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """ODP's rule with token protection and padding as torch ops, counted; ``width``: the router's logits."""
        flat_i = index.reshape(-1, index.shape[-1])
        t = flat_i.shape[0]
        valid = self.valid.reshape(-1) if self.valid is not None and self.valid.numel() == t else None
        counts = self._counters(index.device)
        hidden = hidden.reshape(-1, hidden.shape[-1])
        flat_w = weights.reshape(-1, weights.shape[-1])
        # a router scoring experts beyond the experts module (zero-computation / identity experts, longcat_flash)
        # returns their indices in [E, R), R = its logits' width, and the block computes them itself: a dropped slot
        # is then marked R (neither kind), and those slots are not counted as expert slots
        extra = width if width > self.num_experts else None
        routed = flat_i
        drop = None
        if self.enabled:
            drop = drop_mask(flat_w, self.threshold)
            if self.received is not None and self.received.numel() == t:
                importance = self.received * hidden.float().abs().sum(-1).reshape(self.received.shape)
                vmask = self.valid if self.valid is not None else torch.ones_like(self.received, dtype=torch.bool)
                keep_all = protected_tokens(importance, vmask, self.protect_ratio).reshape(-1)
                drop &= ~keep_all.unsqueeze(-1)
            flat_i, flat_w = apply_drop(flat_i, flat_w, drop, extra or self.num_experts, self.renormalize)
        with torch.no_grad():
            counted = flat_i
            if extra is not None:  # slots of extra experts -> E + 1 (no expert slot, dropped or not); dropped -> E
                own = routed < self.num_experts
                counted = routed.masked_fill(~own, self.num_experts + 1)
                counted = counted.masked_fill(drop & own, self.num_experts) if drop is not None else counted
            count_routing(counts, counted, valid, self.num_experts)
        self.received = self.valid = None
        return flat_i.reshape(index.shape), flat_w.reshape(weights.shape)

    def _counters(self, device: torch.device) -> torch.Tensor:
        if self.counts is None or self.counts.device != device:
            self.flush()
            self.counts = torch.zeros(self.num_experts + 3, dtype=torch.int64, device=device)
        return self.counts

    def flush(self) -> None:
        """Fold the device counters into ``stats`` (one device-to-host copy; only when statistics are read)."""
        if self.counts is None:
            return
        c, e = self.counts.cpu(), self.num_experts
        hits = c[:e].double()
        self.stats.tokens += int(c[e + 2])
        self.stats.slots += int(c[: e + 1].sum())
        self.stats.evaluated += int(c[:e].sum())
        self.stats.params += float((hits * self.expert_params.double()).sum())
        self.stats.bytes += float((hits * self.expert_bytes.double()).sum())
        self.counts.zero_()


def attention_module(layer: nn.Module) -> nn.Module | None:
    """The softmax-attention module of a decoder layer (None for linear-attention / state-space layers)."""
    for name in ("self_attn", "attention", "self_attention", "attn"):
        m = getattr(layer, name, None)
        # (a container of several attention modules, longcat_flash's two per layer: none to read importance from)
        if isinstance(m, nn.Module) and not isinstance(m, (nn.ModuleList, nn.ModuleDict, nn.Sequential)):
            return m
    return None


def _attention_modules(layer: nn.Module) -> list[nn.Module]:
    """Every attention module of a decoder layer (the elements of a container holding several), which the ODP
    attention function must be able to run: the usual attributes, and any module whose forward calls transformers'
    attention interface (Nemotron-H's attention sits in a layer's ``mixer``)."""
    found: list[nn.Module] = []
    for name in ("self_attn", "attention", "self_attention", "attn"):
        m = getattr(layer, name, None)
        if isinstance(m, (nn.ModuleList, nn.Sequential)):
            found = list(m)
        elif isinstance(m, nn.ModuleDict):
            found = list(m.values())
        elif isinstance(m, nn.Module):
            found = [m]
        if found:
            break
    ids = {id(m) for m in found}
    return found + [m for m in layer.modules() if id(m) not in ids and calls_attention_interface(m)]


def _expert_sizes(experts: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(experts, "expert_nbytes"):
        e, h, i = experts.num_experts, experts.hidden_dim, experts.intermediate_dim
        params = torch.full((e,), float((projection_rows(experts.act_fn, i) + i) * h))
        return params, torch.tensor([float(experts.expert_nbytes(k)) for k in range(e)])
    gu = gate_up_weight(experts)
    if gu is None:  # stacked 2-D experts (expert_layout.stacked_weights): three (E * I, H) matrices
        e, w = int(experts.num_experts), experts_weight(experts)
        per = float(3 * w.numel() / e)
        return torch.full((e,), per), torch.full((e,), per * w.element_size())
    dn = experts.down_proj
    per = float(gu[0].numel() + dn[0].numel())
    e = gu.shape[0]
    return torch.full((e,), per), torch.full((e,), per * gu.element_size())


def _states(model: nn.Module) -> dict[int, ODPLayerState]:
    return {b.layer_idx: b.router._mc_odp for b in moe_blocks(model) if hasattr(b.router, "_mc_odp")}


def check_odp_supported(model: nn.Module) -> None:
    """Raise MCConfigError for models ODP cannot prune (top-1 routing); cheap, runs before any weight loads."""
    blocks = list(moe_blocks(model, require_moe(model)))
    if any(b.top_k < 2 for b in blocks):
        raise MCConfigError(
            "ODP drops the second and later experts of a token; this model routes to 1 expert (top-1). "
            "Leave odp=False (drop --odp) for this model."
        )


def _check(model, enabled, threshold, protect_ratio, layers) -> list[int]:
    if not isinstance(enabled, bool):
        raise MCConfigError(f"set_odp's enabled must be True or False, got {enabled!r}; strings are not read.")
    arch = require_moe(model)
    blocks = list(moe_blocks(model, arch))
    if enabled:
        check_odp_supported(model)
    vals = threshold if isinstance(threshold, (list, tuple)) else ([] if threshold is None else [threshold])
    for t in vals:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 1:
            raise MCConfigError(f"ODP thresholds must lie in (0, 1], got {t!r}.")
    if isinstance(threshold, (list, tuple)) and len(threshold) != len(blocks):
        raise MCConfigError(f"got {len(threshold)} ODP thresholds for {len(blocks)} MoE layers.")
    if isinstance(protect_ratio, bool) or not isinstance(protect_ratio, (int, float)) or not 0 <= protect_ratio <= 1:
        raise MCConfigError(f"ODP protect_ratio must lie in [0, 1], got {protect_ratio!r}.")
    moe = [b.layer_idx for b in blocks]
    if isinstance(layers, (list, tuple)):
        unknown = sorted(set(layers) - set(moe))
        if unknown:
            raise MCConfigError(f"ODP layers {unknown} are not MoE layers of this model (MoE layers: {moe}).")
    elif layers is not None and (
        isinstance(layers, bool) or not isinstance(layers, int) or not 0 <= layers <= len(moe)
    ):
        raise MCConfigError(f"ODP layers must be a count in [0, {len(moe)}] or a list of MoE layer indices.")
    return moe


def _calibration(model: nn.Module) -> tuple[list[float] | None, list[float] | None]:
    qc = getattr(model.config, "quantization_config", None)
    thr = getattr(qc, "odp_thresholds", None) or getattr(model, "_mc_odp_thresholds", None)
    scores = getattr(qc, "odp_layer_scores", None) or getattr(model, "_mc_odp_layer_scores", None)
    return thr, scores


def select_layers(moe_layers: list[int], scores: list[float] | None, layers) -> list[int]:
    """MoE layers where ODP is applied: explicit list, or the ``n`` layers with the lowest pruning error."""
    if isinstance(layers, (list, tuple)):
        return sorted(layers)
    n = round(DEFAULT_LAYER_SHARE * len(moe_layers)) if layers is None else layers
    if scores is None:
        return moe_layers[:n] if layers is not None else list(moe_layers)
    order = sorted(range(len(moe_layers)), key=lambda k: (scores[k], k))
    return sorted(moe_layers[k] for k in order[:n])


def set_odp(
    model: nn.Module,
    enabled: bool = True,
    *,
    threshold: float | list[float] | None = None,
    protect_ratio: float = 0.02,
    layers: int | list[int] | None = None,
) -> list[int]:
    """Switch online dynamic pruning on (or off) without reloading; return the layers it is active in.

    ``threshold``: None uses the per-layer medians measured at quantization (or by :func:`calibrate_odp`; a
    float model without them is calibrated on the builtin text), a float, or one per MoE layer.
    ``layers``: None (default share of MoE layers, least-hurt first), a count, or MoE layer indices.
    """
    moe = _check(model, enabled, threshold, protect_ratio, layers)
    if not enabled:
        for st in _states(model).values():
            st.enabled = False
        uninstall_attention(model)
        _restore_experts_implementation(model)
        return []
    thr, scores = _calibration(model)
    if threshold is None and thr is None:
        thr, scores = calibrate_odp(model)
    if isinstance(threshold, (list, tuple)):
        per_layer = [float(t) for t in threshold]
    elif threshold is not None:
        per_layer = [float(threshold)] * len(moe)
    else:
        per_layer = [float(t) for t in thr]
    active = set(select_layers(moe, scores, layers))
    attn = []
    layer_list = decoder_layers(model)
    for blk, t in zip(moe_blocks(model), per_layer):
        st = getattr(blk.router, "_mc_odp", None)
        if st is None:
            params, nbytes = _expert_sizes(blk.experts)
            st = ODPLayerState(blk.layer_idx, blk.num_experts, t, protect_ratio, False, params, nbytes)
            st.renormalize = routing_is_normalized(blk.router)  # before the hook is on the router
            st.handle = blk.router.register_forward_hook(st.router_hook)
            blk.router._mc_odp = st
        st.threshold, st.protect_ratio, st.enabled = t, float(protect_ratio), blk.layer_idx in active
        # the fused kernel's rule rescales kept weights: only for routers that renormalize
        # (not for a block scaling the experts' inputs, input_scaled.py: its experts see one slot per row)
        fused = hasattr(blk.experts, "odp") and not getattr(blk.block, "scales_expert_inputs", False)
        fused = fused and blk.router_classes == blk.num_experts  # (a router scoring extra experts: the hook's rule)
        st.experts = blk.experts if fused and st.renormalize else None
        if hasattr(blk.experts, "odp"):  # an experts module taking ODP into optimum_mc::moe (MCExperts)
            blk.experts.odp = st if st.experts is not None else None
        attn_mod = attention_module(layer_list[blk.layer_idx])
        if attn_mod is not None:  # a linear-attention (hybrid) layer: ODP without token protection
            attn_mod._mc_odp_state = st
            attn.append(attn_mod)
    mods = [m for layer in layer_list for m in _attention_modules(layer)]
    ids = {id(m) for m in mods}  # and those outside the layers (inkling2's final block-attention residual)
    install_attention(model, mods + [m for m in model.modules() if id(m) not in ids and calls_attention_interface(m)])
    _eager_experts(model)
    return sorted(active)


def _eager_experts(model: nn.Module) -> None:
    """Float experts under transformers' ``grouped_mm`` do not skip dropped slots (index == num_experts) outside
    expert parallelism; its eager implementation does, so ODP switches float experts to it while enabled (through
    the model's public setter, which validates the name and reaches sub-models)."""
    impl = getattr(model.config, "_experts_implementation", None)
    if impl not in (None, "eager") and not hasattr(model, "_mc_odp_original_experts"):
        model.set_experts_implementation("eager")
        model._mc_odp_original_experts = impl


def _restore_experts_implementation(model: nn.Module) -> None:
    original = getattr(model, "_mc_odp_original_experts", None)
    if original is not None:
        if model.config._experts_implementation == "eager":  # unless the user chose another one meanwhile
            model.set_experts_implementation(original)
        del model._mc_odp_original_experts


def get_odp_stats(model: nn.Module) -> dict:
    """Per-layer and total statistics since the last reset: skipped share, active expert params / bytes per token."""
    states = _states(model)
    for st in states.values():
        st.flush()
    layers = {i: st.stats.as_dict() | {"enabled": st.enabled, "threshold": st.threshold} for i, st in states.items()}
    total = ODPStats()
    for st in states.values():
        total.slots += st.stats.slots
        total.evaluated += st.stats.evaluated
        total.params += st.stats.params
        total.bytes += st.stats.bytes
        total.tokens = max(total.tokens, st.stats.tokens)
    out = total.as_dict()
    out["active_expert_params_per_token"] = sum(s["active_expert_params_per_token"] for s in layers.values())
    out["active_expert_bytes_per_token"] = sum(s["active_expert_bytes_per_token"] for s in layers.values())
    return {"layers": layers, "total": out}


def reset_odp_stats(model: nn.Module) -> None:
    """Zero the ODP statistics of every layer."""
    for st in _states(model).values():
        st.stats = ODPStats()
        if st.counts is not None:
            st.counts.zero_()


@torch.no_grad()
def calibrate_odp(
    model: nn.Module,
    input_ids: torch.Tensor | None = None,
    tokenizer=None,
    num_samples: int = 16,
    seq_len: int = 256,
    seed: int = 0,
    batch_size: int = 4,
) -> tuple[list[float], list[float]]:
    """Median top-k/top-1 weight ratio per MoE layer, and each layer's relative output error under ODP.

    Without ``input_ids``, windows of the builtin offline text are tokenized with ``tokenizer`` (default: the
    model's own). Results are stored on the model (and its MC quantization config, when present).
    """
    blocks = list(moe_blocks(model, require_moe(model)))
    if any(b.top_k < 2 for b in blocks):
        logger.info("optimum-mc: top-1 routing, nothing for ODP to prune; no ODP thresholds are stored")
        return [], []
    if input_ids is None:
        from ..calibration.data import calibration_batches, resolve_tokenizer

        qc = getattr(model.config, "quantization_config", None)
        tok = tokenizer if tokenizer is not None else resolve_tokenizer(model, getattr(qc, "tokenizer", None))
        input_ids = calibration_batches(None, tok, num_samples, seq_len, seed)
    from ..placement import input_device

    device = input_device(model)
    states = _states(model)
    was = {i: st.enabled for i, st in states.items()}
    for st in states.values():
        st.enabled = False

    body = getattr(model, "base_model", model)  # the decoder only: no (batch x seq x vocab) logits are needed

    def run(hooks: list[tuple[nn.Module, object]]) -> None:
        handles = [m.register_forward_hook(h) for m, h in hooks]
        try:
            for s in range(0, input_ids.shape[0], batch_size):
                body(input_ids=input_ids[s : s + batch_size].to(device), use_cache=False)
        finally:
            for h in handles:
                h.remove()

    # pass 1: the ratio of every non-top slot's weight to its token's top-1 weight
    ratios: dict[int, list[torch.Tensor]] = {b.layer_idx: [] for b in blocks}

    def ratio_hook(idx):
        def hook(mod, args, out):
            r, is_top = slot_ratios(out[1].reshape(-1, out[1].shape[-1]))
            ratios[idx].append(r[~is_top].cpu())

        return hook

    # pass 2: relative change of each MoE layer's routed output when ODP (median threshold) is applied
    errors = {b.layer_idx: [0.0, 0.0] for b in blocks}

    def error_hook(idx, ne, thr, renormalize):
        def hook(mod, args, out):
            if getattr(mod, "_mc_odp_inner_call", False):
                return
            hidden, index, weights = args[0], args[1], args[2]
            drop = drop_mask(weights.reshape(-1, weights.shape[-1]), thr).reshape(index.shape)
            i2, w2 = apply_drop(index, weights, drop, ne, renormalize)
            mod._mc_odp_inner_call = True
            try:
                pruned = mod(hidden, i2, w2)
            finally:
                mod._mc_odp_inner_call = False
            errors[idx][0] += (pruned - out).float().pow(2).sum().item()
            errors[idx][1] += out.float().pow(2).sum().item()

        return hook

    def scaled_error_hook(idx, ne, thr, renormalize):
        """The same for a block scaling its experts' inputs (input_scaled.py): the routing is recomputed (router
        forward, no hooks) and the block's routed part run with and without the dropped slots."""

        def hook(mod, args, out):
            x = args[0].reshape(-1, mod.hidden_dim)
            _, weights, index = getattr(mod, mod.router_attr).forward(x)
            drop = drop_mask(weights, thr)
            i2, w2 = apply_drop(index, weights, drop, ne, renormalize)
            full, pruned = mod.routed(x, index, weights), mod.routed(x, i2, w2)
            errors[idx][0] += (pruned - full).float().pow(2).sum().item()
            errors[idx][1] += full.float().pow(2).sum().item()

        return hook

    renorm = [
        states[b.layer_idx].renormalize if b.layer_idx in states else routing_is_normalized(b.router) for b in blocks
    ]
    try:
        run([(b.router, ratio_hook(b.layer_idx)) for b in blocks])
        thresholds = [_median_or(ratios[b.layer_idx], 0.5) for b in blocks]
        thresholds = [min(max(t, 1e-6), 1.0) for t in thresholds]
        hooks = [
            (b.block, scaled_error_hook(b.layer_idx, b.num_experts, t, r))
            if getattr(b.block, "scales_expert_inputs", False)
            else (b.experts, error_hook(b.layer_idx, b.num_experts, t, r))
            for b, t, r in zip(blocks, thresholds, renorm)
        ]
        run(hooks)
    finally:
        for i, st in states.items():
            st.enabled = was[i]
    scores = [errors[b.layer_idx][0] / max(errors[b.layer_idx][1], 1e-30) for b in blocks]
    model._mc_odp_thresholds, model._mc_odp_layer_scores = thresholds, scores
    qc = getattr(model.config, "quantization_config", None)
    if qc is not None and getattr(qc, "quant_method", None) == "mc":
        qc.odp_thresholds, qc.odp_layer_scores = thresholds, scores
    return thresholds, scores


def _median_or(parts: list[torch.Tensor], default: float) -> float:
    """Median of the concatenated ratios; ``default`` when there are none or the median is not finite."""
    if not parts:
        return default
    r = torch.cat(parts)
    r = r[torch.isfinite(r)]
    return float(r.median()) if r.numel() else default


def set_odp_from_config(model: nn.Module, cfg) -> list[int]:
    """Apply the ODP options of an MCConfig (used when loading / after quantizing with ``odp=True``)."""
    return set_odp(
        model, True, threshold=cfg.odp_threshold, protect_ratio=cfg.odp_protect_ratio, layers=cfg.odp_layers
    )
