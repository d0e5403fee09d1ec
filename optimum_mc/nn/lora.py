"""LoRA adapters (peft) on the packed linears of an MC model (``QuantLinear``).

peft wraps ``nn.Linear`` and the quantized linears it knows; for other layer types it offers a mapping from the
base layer type to a LoRA layer class (``LoraConfig._register_custom_module``). :func:`prepare_lora_config` adds
the mapping for MC's packed linear, :class:`MCLoraLinear` is the LoRA layer: ``y = base(x) + B(A(dropout(x))) *
scaling``, the base frozen (its packed buffers are buffers, not parameters; gradients reach ``x`` through the
packed ops' backward, ``optimum_mc/kernels/autograd.py``). Merging an adapter into packed weights is not
supported (it would need re-quantization); keep adapters separate or ``model.dequantize()`` first.
``NF4Linear`` (``nonexpert_method="bnb_nf4"``) is mapped too: bitsandbytes' ``matmul_4bit`` has its own
backward; its packed codes are also exposed as ``qweight``, the attribute peft places adapters by.

Importing this module imports peft (``pip install peft``); nothing else in optimum-mc needs it.
"""

from __future__ import annotations

from typing import Any

import torch
from peft import LoraConfig
from peft.tuners.lora.layer import LoraLayer
from torch import nn

from .linear import QuantLinear
from .nf4_linear import NF4Linear


class MCLoraLinear(nn.Module, LoraLayer):
    """A LoRA adapter around a frozen :class:`QuantLinear` (peft's LoRA layer protocol)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: int = 1, **kwargs: Any) -> None:  # fmt: skip
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        if config.use_dora or getattr(config, "velora_config", None) is not None:
            raise ValueError(f"{type(self).__name__} supports plain LoRA only (no DoRA / VeLoRA) on packed weights.")
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs: Any) -> None:
        return None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged:
            return result
        dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]
            h = self._cast_input_dtype(x, lora_a.weight.dtype)
            result = result + lora_b(lora_a(self.lora_dropout[name](h))) * self.scaling[name]
        return result.to(dtype)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise NotImplementedError(
            "merging a LoRA adapter into packed low-bit weights would need re-quantization; keep the adapter "
            "separate, or call model.dequantize() before get_peft_model to train on float weights."
        )

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


PACKED_LINEARS: tuple[type[nn.Module], ...] = (QuantLinear, NF4Linear)


def prepare_lora_config(config: LoraConfig) -> LoraConfig:
    """Let ``config`` wrap MC's packed linears (``QuantLinear``, ``NF4Linear``) with :class:`MCLoraLinear`.

    Call it before ``peft.get_peft_model(model, config)`` / ``model.add_adapter(config)`` and before
    ``PeftModel.from_pretrained(model, path, config=...)`` (the mapping is not saved with the adapter).
    Returns ``config`` itself.
    """
    config._register_custom_module(dict.fromkeys(PACKED_LINEARS, MCLoraLinear))
    return config
