"""The non-expert linears of a decoder layer (attention, dense MLPs, shared experts): which are quantized, the
hooks recording their input Hessians, and their GPTQ at ``attn_bits`` into ``QuantLinear`` (or ``NF4Linear``)."""

from __future__ import annotations

import functools
import inspect
import logging

from torch import nn

from ..architectures import MoEArchitecture, MoEBlock, set_submodule
from ..config import MCConfig
from ..gptq import gptq_quantize
from ..group_quant import check_finite
from ..nn import QuantLinear
from ..nn.nf4_linear import NF4Linear
from .capture import LinearInputs
from .factors import GPTQOptions

logger = logging.getLogger(__name__)


@functools.cache
def _class_source(cls: type) -> str:
    try:
        return inspect.getsource(cls)
    except (OSError, TypeError):
        return ""


def _weight_read_directly(layer: nn.Module) -> set[int]:
    """Linears whose ``.weight`` an ancestor's code reads itself (``self.weights_proj.weight.dtype``, a fused
    kernel taking ``self.out_proj.weight``, ergo's decoder layer reading ``self.self_attn.o_proj.weight.dtype``):
    a quantized linear has no ``weight``, so they stay in float."""
    out = set()
    for parent in layer.modules():
        src = _class_source(type(parent))
        if ".weight" not in src:
            continue
        for name, child in parent.named_modules():
            if name and type(child) is nn.Linear and f"self.{name}.weight" in src:
                out.add(id(child))
    return out


def linear_targets(
    layer: nn.Module,
    block: MoEBlock | None,
    arch: MoEArchitecture,
    config: MCConfig,
    prefix: str = "",
    converted=None,
) -> dict:
    """The ``nn.Linear`` modules of a decoder layer quantized at ``attn_bits`` (name relative to the layer).

    ``converted`` (:func:`checkpoint.save_converter`) names the transformers weight converter that would merge or
    split a linear's saved tensors (keys ``prefix.name.*``); such linears stay float (logged), at save and reload
    alike, since their packed buffers cannot be cut or concatenated like float weights."""
    if config.attn_bits is None:
        return {}
    skip_ids = set()
    if block is not None:
        skip_ids |= {id(m) for m in block.router.modules()} | {id(m) for m in block.experts.modules()}
    skip_names = tuple(config.modules_to_not_convert or ()) + ("shared_expert_gate",)
    skip_ids |= _weight_read_directly(layer)
    out = {}
    for name, m in layer.named_modules():
        if type(m) is not nn.Linear or id(m) in skip_ids:
            continue
        if any(name == s or name.endswith("." + s) or name.split(".")[-1] == s for s in skip_names):
            continue
        pattern = converted(f"{prefix}{name}.qweight") if converted is not None else None
        if pattern is not None:
            logger.warning(
                "keeping %s%s in float: transformers' conversion mapping merges, splits or renames its saved "
                "tensors in a way packed buffers cannot follow (%s)",
                prefix,
                name,
                pattern,
            )
            continue
        g = m.in_features if config.group_size == -1 else config.group_size
        if m.in_features % g or m.in_features % 32:
            logger.warning(
                "keeping %s in float: in_features=%d is not divisible by group_size=%d", name, m.in_features, g
            )
            continue
        out[name] = m
    return out


class LinearGPTQ:
    """GPTQ of a run's non-expert linears, layer by layer; ``bits`` maps each quantized linear's full name to its
    width (what config.json records as ``linear_bits``)."""

    def __init__(self, config: MCConfig, arch: MoEArchitecture, layer_names: list[str], converted) -> None:
        self.config, self.arch = config, arch
        self.layer_names, self.converted = layer_names, converted
        self.bits: dict[str, int] = {}
        self.opts = GPTQOptions.from_config(config)

    def targets(self, idx: int, layer: nn.Module, block: MoEBlock | None) -> dict[str, nn.Linear]:
        prefix = self.layer_names[idx] + "."
        lin = linear_targets(layer, block, self.arch, self.config, prefix, self.converted)
        for name, m in lin.items():
            check_finite(m.weight, f"layer {idx} {name}.weight")
        return lin

    def capture(self, lin: dict[str, nn.Linear], device) -> LinearInputs:
        """Hooks accumulating the targets' input Hessians (none for NF4, which needs no calibration)."""
        return LinearInputs(lin if self.config.nonexpert_method == "gptq" else {}, device=device)

    def compress(self, idx: int, layer: nn.Module, lin: dict[str, nn.Linear], capture: LinearInputs) -> None:
        """Replace each target in ``layer`` by its quantized module."""
        cfg = self.config
        bits = cfg.attn_bits
        for name, m in lin.items():
            full = f"{self.layer_names[idx]}.{name}"
            if cfg.nonexpert_method == "bnb_nf4":
                self.bits[full] = bits
                set_submodule(layer, name, NF4Linear.from_linear(m))
                continue
            h = capture.hessians[name]
            if h.num_tokens == 0:  # not in linear_bits: the reload skeleton keeps it float as well
                logger.warning("keeping %s in float: calibration never reached it (no input recorded)", full)
                continue
            self.bits[full] = bits
            w = m.weight.detach().float()
            codes, scales, zeros = gptq_quantize(w, h.hessian, bits, cfg.group_size, **self.opts.gptq_kwargs())
            bias = m.bias.detach() if m.bias is not None else None
            new = QuantLinear.from_codes(
                codes, scales, zeros, bits, bias=bias, dtype=m.weight.dtype, metadata=cfg.metadata
            )
            set_submodule(layer, name, new.to(m.weight.device))

    def record(self, idx: int) -> dict[str, int]:
        """The widths of layer ``idx``'s linears, by name relative to the layer (staged with the layer)."""
        prefix = self.layer_names[idx] + "."
        return {n[len(prefix) :]: b for n, b in self.bits.items() if n.startswith(prefix)}

    def adopt(self, idx: int, record: dict[str, int]) -> None:
        prefix = self.layer_names[idx] + "."
        self.bits.update({prefix + n: b for n, b in record.items()})
