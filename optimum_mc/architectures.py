"""One small record per supported MoE family: where blocks, routers, experts and shared experts live.

Adding a family = adding a record to ``ARCHITECTURES``. Everything transformers-layout-specific about MoE blocks is
here, so the math in calibration/, allocation and gptq never looks at model classes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class MoEArchitecture:
    """Where the MoE parts of one model family live (attribute names relative to a decoder layer)."""

    model_type: str
    block_attr: str = "mlp"
    router_attr: str = "gate"
    experts_attr: str = "experts"
    shared_expert_attrs: tuple[str, ...] = ()
    score_fn: str = "softmax"  # how the router turns logits into per-expert probabilities ("softmax" | "sigmoid")
    unsupported_reason: str | None = None


ARCHITECTURES: dict[str, MoEArchitecture] = {
    rec.model_type: rec
    for rec in (
        MoEArchitecture("mixtral"),
        MoEArchitecture("qwen2_moe", shared_expert_attrs=("shared_expert",)),
        MoEArchitecture("qwen3_moe"),
        MoEArchitecture("olmoe"),
        MoEArchitecture("deepseek_v3", shared_expert_attrs=("shared_experts",), score_fn="sigmoid"),
        MoEArchitecture("phimoe", router_attr="router"),
        MoEArchitecture("granitemoe", block_attr="block_sparse_moe", router_attr="router"),
        MoEArchitecture(
            "gpt_oss",
            router_attr="router",
            unsupported_reason=(
                "gpt-oss stores experts transposed with interleaved gate/up and biases, which MCExperts does not "
                "implement yet"
            ),
        ),
    )
}

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(k for k, v in ARCHITECTURES.items() if v.unsupported_reason is None)


def get_architecture(config) -> MoEArchitecture:
    """The record for a transformers ``PretrainedConfig`` (or a ``model_type`` string); typed error otherwise."""
    model_type = config if isinstance(config, str) else getattr(config, "model_type", None)
    rec = ARCHITECTURES.get(model_type)
    if rec is None:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not a supported Mixture-of-Experts architecture; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}."
        )
    if rec.unsupported_reason:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not supported: {rec.unsupported_reason}. "
            f"Supported: {', '.join(SUPPORTED_MODEL_TYPES)}."
        )
    return rec


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of a causal LM (``model.model.layers`` in every supported family)."""
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedArchitectureError(f"{type(model).__name__} has no decoder layer list at `model.layers`.")
    return layers


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
        return int(self.router.top_k)


def moe_blocks(model: nn.Module, arch: MoEArchitecture | None = None) -> Iterator[MoEBlock]:
    """Yield the MoE block of every decoder layer that has one (dense layers are skipped)."""
    arch = arch or get_architecture(model.config)
    for i, layer in enumerate(decoder_layers(model)):
        blk = moe_block(layer, i, arch)
        if blk is not None:
            yield blk


def moe_block(layer: nn.Module, layer_idx: int, arch: MoEArchitecture) -> MoEBlock | None:
    """The MoE parts of one decoder layer, or ``None`` for a dense layer."""
    block = getattr(layer, arch.block_attr, None)
    if block is None or not hasattr(block, arch.experts_attr):
        return None
    shared = tuple(getattr(block, a) for a in arch.shared_expert_attrs if getattr(block, a, None) is not None)
    return MoEBlock(layer_idx, block, getattr(block, arch.router_attr), getattr(block, arch.experts_attr), shared)


def require_moe(model: nn.Module) -> MoEArchitecture:
    """Check that ``model`` is a supported MoE with at least one MoE layer; return its record."""
    arch = get_architecture(model.config)
    if next(moe_blocks(model, arch), None) is None:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no MoE layers; MC quantizes Mixture-of-Experts models "
            f"({', '.join(SUPPORTED_MODEL_TYPES)})."
        )
    return arch


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
