"""vLLM quantization config ``"mc"``: packed per-expert mixed-precision MoE layers and packed linears.

Imported only by :func:`optimum_mc.integrations.vllm.register` (this module imports vLLM). The math is optimum-mc's
own kernels (``optimum_mc::qmatmul`` for linears, ``optimum_mc::moe`` for a whole MoE layer); vLLM does everything
else (attention, KV cache, routing, scheduling, sampling).
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

import torch
from torch import nn
from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase

from ...config import DECODE_ACTIVATIONS
from ...errors import CheckpointError, MCConfigError, UnsupportedArchitectureError
from ...packing import WORD_BITS
from . import SUPPORTED_ARCHITECTURES
from .linear_method import MCLinearMethod
from .moe_method import MCFusedMoEMethod
from .odp import ODPSettings
from .odp import resolve as resolve_odp

UNVERIFIED_ENV = "OPTIMUM_MC_VLLM_UNVERIFIED"  # "1": serve an architecture not in SUPPORTED_ARCHITECTURES (warned)
logger = logging.getLogger("vllm.optimum_mc")

# A fused vLLM linear and the checkpoint's linears it stacks (used when the model did not say).
_DEFAULT_PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


class MCVllmConfig(QuantizationConfig):
    """``quantization_config`` of an MC checkpoint (``quant_method: "mc"``), as vLLM uses it."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        from . import cpu_rope

        cpu_rope.install()  # this process serves an MC checkpoint: vLLM's CPU rope kernel needs the fix (cpu_rope)
        self.raw = dict(config)
        self.group_size = int(config.get("group_size", 128))
        self.moe_layers = [int(i) for i in config.get("moe_layers") or []]
        self.expert_bits = config.get("expert_bits") or []
        self.linear_bits = {str(k): int(v) for k, v in (config.get("linear_bits") or {}).items()}
        if len(self.expert_bits) != len(self.moe_layers):
            raise MCConfigError(
                f"quantization_config has {len(self.expert_bits)} expert_bits rows for {len(self.moe_layers)} "
                "moe_layers; they must be aligned (one row per MoE layer)."
            )
        self.decode_activations = str(config.get("decode_activations", "auto"))
        if self.decode_activations not in DECODE_ACTIVATIONS:
            raise MCConfigError(f"decode_activations {self.decode_activations!r} is not one of {DECODE_ACTIVATIONS}.")
        self.odp: ODPSettings | None = None  # resolved in maybe_update_config (it sees hf_overrides)
        if self.group_size != -1 and (self.group_size <= 0 or self.group_size % WORD_BITS):
            raise MCConfigError(f"group_size {self.group_size} is not -1 or a positive multiple of 32.")
        # "q8": compact scales / zeros (format 3), expanded to fp16 as they load (weight loaders), as transformers does
        self.metadata = str(config.get("metadata", "fp16"))
        if self.metadata not in ("fp16", "q8"):
            raise MCConfigError(
                f"quantization_config's metadata {self.metadata!r} is not 'fp16' or 'q8'; the checkpoint was written "
                "by a newer optimum-mc (upgrade optimum-mc) or its config was edited."
            )
        if config.get("nonexpert_method", "gptq") == "bnb_nf4":
            raise MCConfigError(
                "this checkpoint stores its non-expert linears as bitsandbytes NF4 (nonexpert_method='bnb_nf4'), "
                "which the vLLM plugin does not serve yet; quantize with nonexpert_method='gptq' or 'rtn'."
            )

    # --- QuantizationConfig interface ---
    def get_name(self) -> str:
        return "mc"

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0  # pure torch.library ops: CPU C kernels, Triton on CUDA, the torch reference elsewhere

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # read from config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> MCVllmConfig:
        if config.get("quant_method", "mc") != "mc":
            raise MCConfigError(f"quant_method is {config.get('quant_method')!r}, not 'mc'.")
        return cls(config)

    def maybe_update_config(self, model_name: str, hf_config=None, revision: str | None = None) -> None:
        archs = list(getattr(hf_config, "architectures", None) or [])
        verified = not archs or any(a in SUPPORTED_ARCHITECTURES for a in archs)
        if not verified and os.environ.get(UNVERIFIED_ENV) == "1":
            logger.warning("optimum-mc: serving %s, not verified with this plugin (%s=1)", archs, UNVERIFIED_ENV)
        elif not verified:
            raise UnsupportedArchitectureError(
                f"{model_name}: architecture {', '.join(archs)} is not supported by optimum-mc's vLLM plugin yet; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}. Serve it with transformers "
                f"(AutoModelForCausalLM.from_pretrained) instead, or try it at your own risk with {UNVERIFIED_ENV}=1 "
                "(scripts/vllm_support.py checks a family)."
            )
        self.odp = resolve_odp(self.raw, self.moe_layers, hf_config)
        self.renamings = checkpoint_renamings(getattr(hf_config, "model_type", None))

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        # linear_bits is keyed by transformers' module names; follow the model's renames (not its stacking)
        self.linear_bits = {hf_to_vllm_mapper.map_name(k) or k: v for k, v in self.linear_bits.items()}

    def get_quant_method(self, layer: nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if isinstance(layer, LinearBase):
            bits = self.linear_bits_for(prefix)
            return UnquantizedLinearMethod() if bits is None else MCLinearMethod(self, bits, prefix)
        if isinstance(layer, RoutedExperts):
            if self.odp is None:
                self.odp = resolve_odp(self.raw, self.moe_layers, None)
            return MCFusedMoEMethod(self, layer.moe_config, self.expert_bits_for(prefix), prefix)
        return None  # embeddings, lm_head, attention (KV cache): unquantized

    # --- lookups ---
    def _bits(self, name: str) -> int | None:
        """``linear_bits`` of a linear vLLM names as the checkpoint does: linear_bits is keyed by transformers' module
        names, which differ where transformers renames the family's checkpoint tensors on load (Hy3's
        ``mlp.shared_mlp.`` is transformers' ``mlp.shared_experts.``)."""
        if name in self.linear_bits:
            return self.linear_bits[name]
        for source, target in getattr(self, "renamings", ()):
            name = re.sub(source, target, name)
        if name in self.linear_bits:
            return self.linear_bits[name]
        # a prefix vLLM gives under another name than the module's (Granite-MoE-Hybrid's mamba mixer, built as
        # ``<layer>.mamba`` with prefix ``<layer>.mixer``): a ``<layer>.<child>.<leaf>`` whose child the checkpoint
        # has nowhere in that layer is the layer's one ``<layer>.<other child>.<leaf>``, where there is exactly one
        m = re.fullmatch(r"(.*layers\.\d+)\.([^.]+)\.([^.]+)", name)
        if m is None:
            return None
        head, child, leaf = m.groups()
        in_layer = [k[len(head) + 1 :].split(".") for k in self.linear_bits if k.startswith(head + ".")]
        if any(parts[0] == child for parts in in_layer):
            return None
        others = [parts for parts in in_layer if len(parts) == 2 and parts[1] == leaf]
        return self.linear_bits[f"{head}.{others[0][0]}.{leaf}"] if len(others) == 1 else None

    def linear_bits_for(self, prefix: str) -> int | None:
        """Bits of the packed linear ``prefix`` (a fused vLLM linear: its parts'), None when unquantized."""
        bits = self._bits(prefix)
        if bits is not None:
            return bits
        parent, _, leaf = prefix.rpartition(".")
        parts = self.packed_modules_mapping.get(leaf) or _DEFAULT_PACKED.get(leaf)
        if not parts:
            return None
        names = [f"{parent}.{p}" if parent else p for p in parts]
        found = {n: self._bits(n) for n in names}
        widths = set(found.values())
        if widths == {None}:
            return None
        if len(widths) != 1:
            raise CheckpointError(
                f"{prefix}: vLLM fuses {', '.join(names)} into one layer, but the checkpoint stores them at "
                f"different widths {found}; the vLLM plugin needs one width per fused layer."
            )
        return widths.pop()

    def layer_index(self, prefix: str) -> int:
        """The decoder layer index of ``prefix`` (``model.layers.<i>.<...>``), checked against ``moe_layers``."""
        m = re.search(r"layers\.(\d+)\.", prefix + ".")
        if m is None or int(m.group(1)) not in self.moe_layers:
            raise CheckpointError(
                f"{prefix}: vLLM builds a MoE layer here, but quantization_config's moe_layers {self.moe_layers} "
                "has no entry for it; the checkpoint does not match the model."
            )
        return int(m.group(1))

    def odp_threshold_for(self, prefix: str) -> float | None:
        """ODP's threshold for the MoE layer at ``prefix``: None with ODP off, 0.0 where it is on but not active."""
        if self.odp is None or not self.odp.enabled:
            return None
        return self.odp.thresholds.get(self.layer_index(prefix), 0.0)

    def expert_bits_for(self, prefix: str) -> list[int | list[int]]:
        """The per-expert widths of the MoE layer at ``prefix`` (``model.layers.<i>.<...>.experts``)."""
        return self.expert_bits[self.moe_layers.index(self.layer_index(prefix))]


def checkpoint_renamings(model_type: str | None) -> list[tuple[str, str]]:
    """(pattern, replacement) of the plain tensor renamings transformers applies to ``model_type``'s checkpoints on
    load (checkpoint name -> module name; its weight fusions are not renamings and are left out)."""
    if not model_type:
        return []
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:  # a transformers without checkpoint conversions: names are module names
        return []
    out = []
    for op in get_checkpoint_conversion_mapping(model_type) or []:
        if type(op) is WeightRenaming and len(op.source_patterns) == 1 and len(op.target_patterns) == 1:
            out.append((op.source_patterns[0], op.target_patterns[0]))
    return out
