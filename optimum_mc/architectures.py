"""Where the MoE parts of a model live, found from the modules themselves (not from a table of family names).

transformers' MoE text families share one experts interface: a module with 3-D ``gate_up_proj`` ``(E, 2I, H)`` and
``down_proj`` ``(E, H, I)`` parameters, ``num_experts``, an ``act_fn``, and ``forward(hidden_states, top_k_index,
top_k_weights)``. Its parent is the MoE block; the block's child with an ``(E, H)`` weight is the router, which
returns ``(router_logits, top_k_weights, top_k_index)``; the block's other children holding linear layers are its
shared experts; decoder layers without an experts module are dense. :func:`discover` finds these in the first MoE
layer, checks every other layer against it, and reads the routing (softmax / sigmoid scores, top-k) from the router.
A family added to transformers later works without a code change when it follows the interface; how its experts are
stored (transposed, interleaved gate / up, biases, gpt-oss's clamped SwiGLU, DBRX's stacked 2-D matrices) is read by
:mod:`.expert_layout`; blocks that route otherwise are adapted to the contract first (:mod:`.input_scaled`: Llama 4's
experts on router-scaled inputs; :mod:`.topk_block`: a logits-only router, the top-k done in the block, DBRX's);
``EXCEPTIONS`` names the families that deviate otherwise. Everything transformers-layout-specific about MoE blocks
is here (and in :mod:`.expert_layout`), so the math in calibration/, allocation and gptq never looks at model classes.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .errors import UnsupportedArchitectureError
from .expert_layout import experts_layout, gate_up_weight
from .input_scaled import adapt_input_scaled_blocks
from .stacked_experts import stacked_weights
from .topk_block import adapt_topk_blocks

EXAMPLES = "mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3, glm4_moe, qwen3_next, minimax_m2, ..."


@dataclass(frozen=True)
class MoEArchitecture:
    """Where the MoE parts of one model live (attribute paths relative to a decoder layer) and how it routes."""

    model_type: str
    block_attr: str = "mlp"
    router_attr: str = "gate"
    experts_attr: str = "experts"
    shared_expert_attrs: tuple[str, ...] = ()
    score_fn: str = "softmax"  # how the router turns logits into per-expert probabilities ("softmax" | "sigmoid")
    unsupported_reason: str | None = None


# families that deviate from the shared interface (everything else is discovered; transposed storage, expert biases
# and gpt-oss's interleaved clamped SwiGLU are read from the modules by expert_layout)
EXCEPTIONS: dict[str, str] = {}


def _model_type(config) -> str | None:
    return config if isinstance(config, str) else getattr(config, "model_type", None)


def _check_exception(config) -> None:
    model_type = _model_type(config)
    reason = EXCEPTIONS.get(model_type)
    if reason:
        raise UnsupportedArchitectureError(f"model_type {model_type!r} is not supported: {reason}.")


def get_architecture(config) -> MoEArchitecture:
    """The MoE layout of a model: discovered from ``config`` (a ``PretrainedConfig``, whose model is built on the
    meta device) or from a model (``nn.Module``) directly; typed error naming the failed check otherwise."""
    if isinstance(config, nn.Module):
        return architecture_of(config)
    _check_exception(config)
    if isinstance(config, str):
        raise UnsupportedArchitectureError(f"the MoE layout of {config!r} is read from its modules: pass a config.")
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except ValueError as exc:
        raise UnsupportedArchitectureError(
            f"model_type {config.model_type!r} has no causal-LM class to quantize ({exc})."
        ) from exc
    return discover(model)


def architecture_of(model: nn.Module) -> MoEArchitecture:
    """:func:`discover` for ``model``, remembered on the model."""
    arch = model.__dict__.get("_mc_architecture")
    if arch is None:
        arch = discover(model)
        model.__dict__["_mc_architecture"] = arch
    return arch


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of a causal LM: ``model.model.layers``, or the ``layers`` of the text decoder the
    model names with ``get_decoder()`` (a multimodal wrapper's ``model.language_model``: its vision / audio
    towers are no decoder layers, so MC leaves them in float)."""
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList) and callable(getattr(model, "get_decoder", None)):
        try:
            decoder = model.get_decoder()
        except Exception:  # (a model whose get_decoder has nothing to return)
            decoder = None
        layers = getattr(decoder, "layers", None)
        if not isinstance(layers, nn.ModuleList) and isinstance(decoder, nn.Module):
            layers = _layer_list(decoder, getattr(model, "config", None))
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no decoder layer list at `model.layers` nor in its `get_decoder()` (check: "
            f"decoder layers)."
        )
    return layers


def _layer_list(decoder: nn.Module, config) -> nn.ModuleList | None:
    """The decoder's one child list of ``num_hidden_layers`` modules under another name (DBRX's ``blocks``)."""
    n = getattr(config.get_text_config(), "num_hidden_layers", None) if config is not None else None
    lists = [c for c in decoder.children() if isinstance(c, nn.ModuleList) and len(c) == n]
    return lists[0] if len(lists) == 1 else None


def layer_list_name(model: nn.Module) -> str:
    """The attribute name of the decoder layer list (``layers``; DBRX's ``blocks``): what checkpoint keys of
    decoder layer ``i`` hold as ``<name>.<i>.``."""
    layers = decoder_layers(model)
    return next((n.rpartition(".")[2] for n, m in model.named_modules() if m is layers), "layers")


def is_experts(module: nn.Module) -> bool:
    """A fused experts module: transformers' float one (3-D ``gate_up_proj``) or an MC-packed one."""
    if hasattr(module, "packed") and hasattr(module, "num_experts") and hasattr(module, "bits"):
        return True
    # gate_up_proj, or up_proj of non-gated experts (Nemotron-H's), next to a 3-D down_proj
    dn = getattr(module, "down_proj", None)
    if gate_up_weight(module) is not None and isinstance(dn, torch.Tensor) and dn.dim() == 3:
        return True
    return stacked_weights(module) is not None  # three 2-D (E * I, H) matrices (DBRX's w1 / v1 / w2)


def _find_experts(layer: nn.Module) -> list[tuple[str, nn.Module]]:
    found: list[tuple[str, nn.Module]] = []
    for name, m in layer.named_modules():
        if name and is_experts(m) and not any(name.startswith(f + ".") for f, _ in found):
            found.append((name, m))
    return found


def _check_experts(name: str, experts: nn.Module, hidden: int | None) -> int:
    """Structural checks of one experts module; its number of experts."""
    cls = type(experts).__name__
    if hasattr(experts, "packed"):
        return int(experts.num_experts)
    layout = experts_layout(experts, name, hidden)  # shapes (or their transpose), biases, the gate
    params = list(inspect.signature(experts.forward).parameters)
    # gpt-oss names them (hidden_states, router_indices, routing_weights)
    if params[:1] != ["hidden_states"] or len(params) < 3 or "ind" not in params[1] or "weight" not in params[2]:
        raise UnsupportedArchitectureError(
            f"experts module `{name}` ({cls}) takes forward({', '.join(params)}); expected forward(hidden_states, "
            f"top_k_index, top_k_weights) (check: experts interface)."
        )
    return layout.num_experts


def _router(
    block_name: str, block: nn.Module, experts: nn.Module, num_experts: int, hidden: int
) -> tuple[str, nn.Module]:
    """The block's child holding an ``(E, H)`` weight (the router; preferred: one with ``top_k``). Without one, a
    child holding an ``(R, H)`` weight with ``R > E``: a router that also scores ``R - E`` experts the experts module
    does not hold (zero-computation / identity experts as longcat_flash's, shared experts scored with the routed ones
    as inkling's; see :func:`router_classes`)."""
    cands = _router_candidates(block, experts, lambda rows: rows == num_experts, hidden)
    if not cands:
        cands = _router_candidates(block, experts, lambda rows: rows > num_experts, hidden)
    if not cands:  # a router MLP (zaya's: hidden -> router width -> ... -> E + 1): a child with top_k scoring >= E
        cands = [
            c
            for c in _router_candidates(block, experts, lambda rows: rows >= num_experts, None)
            if getattr(c[1], "top_k", None) is not None
        ]
    if len(cands) > 1:
        cands = [c for c in cands if getattr(c[1], "top_k", None) is not None] or cands
    if len(cands) != 1:
        what = "no child" if not cands else f"{len(cands)} children ({', '.join(n for n, _ in cands)})"
        raise UnsupportedArchitectureError(
            f"MoE block `{block_name}` ({type(block).__name__}) has {what} with a ({num_experts}, {hidden}) weight "
            f"(or ({num_experts} + extra experts, {hidden})); expected exactly one router (check: router)."
        )
    return cands[0]


def _router_candidates(
    block: nn.Module, experts: nn.Module, rows_ok, hidden: int | None
) -> list[tuple[str, nn.Module]]:
    out = []
    for name, child in block.named_children():
        if child is experts:
            continue
        if any(p.dim() == 2 and rows_ok(p.shape[0]) and hidden in (None, p.shape[1]) for p in child.parameters()):
            out.append((name, child))
    return out


def router_classes(router: nn.Module, num_experts: int) -> int:
    """How many experts ``router`` scores: ``num_experts``, or more for a router that also scores experts outside
    the experts module (rows of its ``(R, H)`` weight). Indices in ``[num_experts, R)`` that such a router returns
    are not the experts module's: the block handles them itself (longcat_flash's identity experts); MC leaves them
    alone, and ODP marks a dropped slot with index ``R`` (no expert of either kind)."""
    rows = [int(p.shape[0]) for p in router.parameters() if p.dim() == 2 and p.shape[0] >= num_experts]
    return min(rows) if rows and num_experts not in rows else num_experts  # (a router MLP's hidden layers: wider)


def router_top_k(router: nn.Module) -> int | None:
    """How many experts ``router`` selects per token: its ``top_k``, else read from its output on a probe token
    (the width of the index it returns; runs on the meta device too: only shapes are needed), remembered on the
    router. None for a router that returns no index (logits only)."""
    k = getattr(router, "top_k", None)
    if isinstance(k, int):
        return k
    k = router.__dict__.get("_mc_top_k")
    if k is not None:
        return k
    w = next((p for p in router.parameters() if p.dim() == 2), None)
    if w is None:
        return None
    try:
        with torch.no_grad():
            # (the class's forward: no hooks, so a calibration capture attached to the router never sees the probe)
            out = type(router).forward(router, torch.zeros(2, w.shape[1], dtype=w.dtype, device=w.device))
    except Exception:
        return None
    if not isinstance(out, tuple) or len(out) < 3:
        return None
    idx = out[router_output_positions(out)[2]]
    if not isinstance(idx, torch.Tensor) or idx.is_floating_point():
        return None
    router.__dict__["_mc_top_k"] = k = int(idx.shape[-1])
    return k


def _check_router(name: str, router: nn.Module) -> None:
    if type(router) is nn.Linear or router_top_k(router) is None:
        raise UnsupportedArchitectureError(
            f"router `{name}` ({type(router).__name__}) returns only logits (no `top_k`); expected a router module "
            f"returning (router_logits, top_k_weights, top_k_index) (check: router)."
        )


def _score_fn(router: nn.Module) -> str:
    """``"sigmoid"`` when the router's forward scores experts with a sigmoid, else ``"softmax"`` (a router that
    states its ``score_fn``, MC's :class:`~optimum_mc.input_scaled.TopKRouter`, is taken at its word)."""
    if getattr(router, "score_fn", None) in ("sigmoid", "softmax"):
        return router.score_fn
    try:
        src = inspect.getsource(type(router).forward)
    except (OSError, TypeError):
        return "softmax"
    return "sigmoid" if "sigmoid" in src and "softmax" not in src else "softmax"


def calls_attention_interface(module: nn.Module) -> bool:
    """Whether ``module``'s forward dispatches through transformers' attention interface (read from its source)."""
    return _calls_attention_interface(type(module))


@functools.cache
def _calls_attention_interface(cls: type) -> bool:
    try:
        src = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return "ALL_ATTENTION_FUNCTIONS" in src or "attention_interface" in src


def _shared(block: nn.Module, router: nn.Module, experts: nn.Module) -> tuple[str, ...]:
    """The block's other children that are MLPs (hold two or more linear layers, and are no attention: a decoder
    layer that is its own MoE block holds its attention too): its shared experts."""
    out = []
    for name, child in block.named_children():
        if child is router or child is experts or isinstance(child, nn.Linear) or calls_attention_interface(child):
            continue
        if sum(isinstance(m, nn.Linear) for m in child.modules()) >= 2:
            out.append(name)
    return tuple(out)


def discover(model: nn.Module) -> MoEArchitecture:
    """Find the MoE layout of ``model`` from its modules; typed error naming the failed check and module."""
    config = getattr(model, "config", None)
    _check_exception(config)
    model_type = _model_type(config) or type(model).__name__
    layers = decoder_layers(model)
    # blocks whose experts take inputs scaled by a dense router's scores (Llama 4) -> the router/experts contract
    adapt_input_scaled_blocks(layers)
    # blocks whose router returns logits only and that select the top-k themselves (DBRX) -> the same contract
    adapt_topk_blocks(layers)
    hidden = getattr(config.get_text_config(), "hidden_size", None) if config is not None else None
    arch, counts = None, set()
    for i, layer in enumerate(layers):
        found = _find_experts(layer)
        if not found:
            continue
        if len(found) > 1:
            raise UnsupportedArchitectureError(
                f"decoder layer {i} has {len(found)} experts modules ({', '.join(n for n, _ in found)}); expected one "
                f"(check: experts)."
            )
        path, experts = found[0]
        block_attr, _, experts_attr = path.rpartition(".")
        prefix = f"layers.{i}."
        e = _check_experts(prefix + path, experts, hidden)
        counts.add(e)
        # experts directly in the decoder layer (gemma4's, next to its dense MLP): the layer is the MoE block
        block = layer.get_submodule(block_attr) if block_attr else layer
        router_attr, router = _router(
            prefix + block_attr if block_attr else f"layers.{i}",
            block,
            experts,
            e,
            int(experts.hidden_dim) if hasattr(experts, "packed") else experts_layout(experts, path).hidden,
        )
        if arch is None:
            _check_router(f"{prefix}{block_attr}.{router_attr}", router)
            arch = MoEArchitecture(
                model_type,
                block_attr=block_attr,
                router_attr=router_attr,
                experts_attr=experts_attr,
                shared_expert_attrs=_shared(block, router, experts),
                score_fn=_score_fn(router),
            )
        elif (block_attr, router_attr, experts_attr) != (arch.block_attr, arch.router_attr, arch.experts_attr):
            raise UnsupportedArchitectureError(
                f"decoder layer {i} keeps its MoE parts at {block_attr}.{{{router_attr}, {experts_attr}}}, layer "
                f"before at {arch.block_attr}.{{{arch.router_attr}, {arch.experts_attr}}} (check: one layout)."
            )
    if arch is None:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} (model_type {model_type!r}) has no MoE layers: no decoder layer holds an experts "
            f"module with 3-D gate_up_proj (or up_proj) / down_proj (check: MoE block). MC quantizes "
            f"Mixture-of-Experts models ({EXAMPLES})."
        )
    if len(counts) > 1:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__}: MoE layers have different expert counts {sorted(counts)} (check: experts)."
        )
    return arch


@dataclass
class MoEBlock:
    """The MoE parts of one decoder layer."""

    layer_idx: int
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    shared: tuple[nn.Module, ...]

    @property
    def num_experts(self) -> int:
        return int(self.experts.num_experts)

    @property
    def top_k(self) -> int:
        return int(router_top_k(self.router))

    @property
    def router_classes(self) -> int:
        """Experts the router scores (:func:`router_classes`): ``num_experts`` unless it scores extra ones."""
        return router_classes(self.router, self.num_experts)


def moe_blocks(model: nn.Module, arch: MoEArchitecture | None = None) -> Iterator[MoEBlock]:
    """Yield the MoE block of every decoder layer that has one (dense layers are skipped)."""
    arch = arch or architecture_of(model)
    for i, layer in enumerate(decoder_layers(model)):
        blk = moe_block(layer, i, arch)
        if blk is not None:
            yield blk


def _get(module: nn.Module, path: str):
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def moe_block(layer: nn.Module, layer_idx: int, arch: MoEArchitecture) -> MoEBlock | None:
    """The MoE parts of one decoder layer, or ``None`` for a dense layer."""
    block = _get(layer, arch.block_attr) if arch.block_attr else layer  # ("": the layer is the block)
    experts = getattr(block, arch.experts_attr, None) if block is not None else None
    if experts is None or not is_experts(experts):
        return None
    shared = tuple(getattr(block, a) for a in arch.shared_expert_attrs if getattr(block, a, None) is not None)
    return MoEBlock(layer_idx, block, getattr(block, arch.router_attr), experts, shared)


def require_moe(model: nn.Module) -> MoEArchitecture:
    """Check that ``model`` is a supported MoE with at least one MoE layer; return its layout."""
    return architecture_of(model)


def router_output_positions(output: tuple) -> tuple[int, int, int]:
    """Positions of ``(logits, weights, index)`` in a router's output tuple: the index is the integer tensor, the
    logits the float one with a wider last dimension than the index (all experts, not the top-k), the weights the
    other. transformers orders them (logits, weights, index), except some releases' routers that return
    (index, weights, logits) (GraniteMoe before 5.20); where widths cannot tell, the usual order is assumed."""
    ints = [i for i, t in enumerate(output[:3]) if isinstance(t, torch.Tensor) and not t.is_floating_point()]
    if len(output) < 3 or len(ints) != 1 or ints[0] == 2:
        return 0, 1, 2
    idx = ints[0]
    a, b = (i for i in range(3) if i != idx)
    k = output[idx].shape[-1]
    wide = [i for i in (a, b) if output[i].shape[-1] != k]
    logits = wide[0] if len(wide) == 1 else a
    return logits, (b if logits == a else a), idx


def router_probabilities(arch: MoEArchitecture, router_logits: torch.Tensor) -> torch.Tensor:
    """Per-expert probabilities from router logits, before top-k selection or renormalization."""
    if arch.score_fn == "sigmoid":
        return router_logits.float().sigmoid()
    return router_logits.float().softmax(-1)


def layer_module_names(model: nn.Module) -> dict[int, str]:
    """Module name of every decoder layer, by index (e.g. ``{0: "model.layers.0"}``)."""
    ids = {id(layer): i for i, layer in enumerate(decoder_layers(model))}
    return {ids[id(m)]: n for n, m in model.named_modules() if id(m) in ids}


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule called ``name`` (dotted path) of ``root`` by ``new``."""
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)
