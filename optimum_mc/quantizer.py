"""The transformers HfQuantizer for method "mc": transformers' hooks, delegating to the pipeline (no math here)."""

from __future__ import annotations

import inspect
import logging
import sys
from typing import Any

import torch
from torch import nn
from transformers.quantizers.base import HfQuantizer

from .architectures import (
    MoEArchitecture,
    decoder_layers,
    layer_list_name,
    layer_module_names,
    moe_blocks,
    require_moe,
    set_submodule,
)
from .bitwidths import split
from .checkpoint import check_all_tensors, check_checkpoint, key_renamer, nf4_shapes, packed_shapes
from .config import MCConfig
from .errors import CheckpointError, MCConfigError
from .expert_layout import CanonicalExperts, experts_layout, experts_weight
from .skeleton import install_packed_skeleton

logger = logging.getLogger(__name__)


def expected_tensors(model: nn.Module, cfg: MCConfig, arch: MoEArchitecture) -> dict:
    """``{(layer, suffix): (dtype, shape)}`` of every packed tensor a checkpoint of ``cfg`` must hold."""
    blocks = {b.layer_idx: b for b in moe_blocks(model, arch)}
    names = layer_module_names(model)
    out = {}
    for idx, bits in zip(cfg.moe_layers, cfg.expert_bits):
        layout = experts_layout(blocks[idx].experts)  # MC's layout or its transpose
        rows, h = layout.rows, layout.hidden  # (2I gate/up rows, or I up rows of non-gated experts)
        dtype = str(experts_weight(blocks[idx].experts).dtype).removeprefix("torch.")
        for e, b in enumerate(bits):
            for part, (o, n), pb in zip(("gate_up", "down"), ((rows, h), (h, layout.inter)), split(b)):
                specs = packed_shapes(o, n, pb, cfg.group_size, cfg.metadata)
                if (layout.gate_up_bias, layout.down_bias)[part == "down"]:
                    specs["bias"] = (dtype, (o,))
                for buf, spec in specs.items():
                    out[(idx, f"{arch.experts_attr}.packed.{e}.{part}.{buf}")] = spec
    for full, b in (cfg.linear_bits or {}).items():
        idx = next(i for i, n in names.items() if full.startswith(n + "."))
        m = model.get_submodule(full)
        if cfg.nonexpert_method == "bnb_nf4":
            specs = nf4_shapes(m.out_features, m.in_features)
        else:
            specs = packed_shapes(m.out_features, m.in_features, b, cfg.group_size, cfg.metadata)
        for buf, spec in specs.items():
            out[(idx, full[len(names[idx]) + 1 :] + "." + buf)] = spec
    return out


def check_results_match_model(model: nn.Module, cfg: MCConfig, arch: MoEArchitecture) -> None:
    """The stored allocation must describe this model's MoE layers and linear modules."""
    if cfg.expert_bits is None or cfg.moe_layers is None:
        raise CheckpointError(
            "quantization_config has no per-expert bits (expert_bits): the checkpoint is not an MC model."
        )
    blocks = {b.layer_idx: b for b in moe_blocks(model, arch)}
    if sorted(blocks) != list(cfg.moe_layers) or len(cfg.expert_bits) != len(cfg.moe_layers):
        raise CheckpointError(
            f"quantization_config lists MoE layers {cfg.moe_layers} with {len(cfg.expert_bits)} bit lists, "
            f"but the model has MoE layers {sorted(blocks)}."
        )
    for idx, bits in zip(cfg.moe_layers, cfg.expert_bits):
        n = int(blocks[idx].experts.num_experts)
        if len(bits) != n or any(w not in (1, 2, 3, 4) for b in bits for w in split(b)):
            raise CheckpointError(
                f"layer {idx}: expert_bits {bits} must list {n} bit-widths from (1, 2, 3, 4) (or [gate_up, down] "
                f"pairs of them)."
            )
    for name in cfg.linear_bits or {}:
        try:
            m = model.get_submodule(name)
        except AttributeError as exc:
            raise CheckpointError(
                f"quantization_config lists linear {name!r}, which the model does not have."
            ) from exc
        if not isinstance(m, nn.Linear):
            raise CheckpointError(
                f"quantization_config lists {name!r} as a linear layer but it is {type(m).__name__}."
            )


def expand_packed_metadata(model: nn.Module) -> int:
    """Compute the in-memory fp16 scales / zeros of every packed linear stored with compact (q8) metadata from its
    loaded compact tensors (:meth:`QuantLinear.expand_metadata`); returns how many were expanded."""
    from .nn import QuantLinear

    n = 0
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.metadata == "q8":
            m.expand_metadata()
            n += 1
    return n


def build_quantized_skeleton(model: nn.Module, cfg: MCConfig, arch: MoEArchitecture) -> None:
    """Replace float experts / linears by empty packed modules shaped from ``cfg`` (on the meta device)."""
    names = layer_module_names(model)
    bits = dict(zip(cfg.moe_layers, cfg.expert_bits))
    for idx, layer in enumerate(decoder_layers(model)):
        prefix = names[idx] + "."
        lin = {n[len(prefix) :]: b for n, b in (cfg.linear_bits or {}).items() if n.startswith(prefix)}
        install_packed_skeleton(
            layer, idx, arch, bits.get(idx), lin, cfg.group_size, cfg.nonexpert_method, metadata=cfg.metadata
        )


def _takes_routing(cls: type) -> bool:
    """``forward(hidden_states, <indices>, <weights>, ...)`` (gpt-oss: ``router_indices, routing_weights``)."""
    params = list(inspect.signature(cls.forward).parameters)[1:]
    return params[:1] == ["hidden_states"] and len(params) >= 3 and "ind" in params[1] and "weight" in params[2]


def _float_experts_class(block_module: nn.Module) -> type:
    """The float experts class of the block's modeling file: the ``*Experts`` module class following the experts
    interface (``forward(hidden_states, top_k_index, top_k_weights)``; shared-experts MLPs do not)."""
    mod = sys.modules[type(block_module).__module__]
    found = [
        v
        for k, v in vars(mod).items()
        if isinstance(v, type) and k.endswith("Experts") and issubclass(v, nn.Module) and _takes_routing(v)
    ]
    if len(found) != 1:
        raise MCConfigError(
            f"cannot find the float experts class of {type(block_module).__name__} to dequantize into."
        )
    return found[0]


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every packed module by its float equivalent (``model.dequantize()``)."""
    from .nn import MCExperts, QuantLinear
    from .nn.nf4_linear import NF4Linear

    arch = require_moe(model)
    if isinstance(dtype, str):  # transformers passes config.dtype, a string once the config was (re)loaded
        dtype = getattr(torch, dtype)
    for blk in moe_blocks(model, arch):
        ex = blk.experts
        if isinstance(ex, MCExperts):
            gate_up, down = ex.dequantize()
            dt = dtype or gate_up.dtype
            # MC's adapter blocks (input_scaled.py, topk_block.py): float experts in MC's layout behind them
            if getattr(blk.block, "scales_expert_inputs", False) or getattr(blk.block, "float_experts_canonical", 0):
                gb, db = ex.biases()
                tensors = dict(gate_up_proj=gate_up, down_proj=down, gate_up_proj_bias=gb, down_proj_bias=db)
                new = CanonicalExperts({k: v.to(dt) if v is not None else None for k, v in tensors.items()}, ex.act_fn)
                setattr(blk.block, arch.experts_attr, new)
                continue
            cls = _float_experts_class(blk.block)
            with torch.device("meta"):
                new = cls(model.config.get_text_config())
            layout = experts_layout(new)
            if not layout.gated and not any(ex.has_bias):  # non-gated experts (Nemotron-H): up_proj = the I rows
                new.up_proj = nn.Parameter(gate_up.to(dt), requires_grad=False)
                new.down_proj = nn.Parameter(down.to(dt), requires_grad=False)
            elif not layout.canonical or any(ex.has_bias):  # transposed / interleaved / biased class
                gb, db = ex.biases()
                tensors = dict(gate_up_proj=gate_up, down_proj=down, gate_up_proj_bias=gb, down_proj_bias=db)
                new = CanonicalExperts({k: v.to(dt) if v is not None else None for k, v in tensors.items()}, ex.act_fn)
            else:
                new.gate_up_proj = nn.Parameter(gate_up.to(dt), requires_grad=False)
                new.down_proj = nn.Parameter(down.to(dt), requires_grad=False)
                new.act_fn = ex.act_fn
            setattr(blk.block, arch.experts_attr, new)
    for name, m in list(model.named_modules()):
        if isinstance(m, (QuantLinear, NF4Linear)):
            lin = m.to_linear()
            if dtype is not None:
                lin = lin.to(dtype)
            set_submodule(model, name, lin)
    return model


def _offloads(device_map) -> bool:
    return isinstance(device_map, str) or (isinstance(device_map, dict) and "disk" in device_map.values())


class MCQuantizer(HfQuantizer):
    """Quantize MoE models with MC at load time, and load MC checkpoints.

    Quantizing at load time streams the float decoder layers from the checkpoint's safetensors shards (only one
    layer's float weights in memory, on ``MCConfig.device``); the packed model is then placed as the user's
    ``device_map`` / ``max_memory`` ask.
    """

    requires_calibration = False
    required_packages = ["ortools"]

    def __init__(self, quantization_config: MCConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self._source = None
        self._device_map = None
        self._max_memory: dict | None = None

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        try:
            import ortools  # noqa: F401
        except ImportError as exc:  # pragma: no cover - ortools is a hard dependency
            raise ImportError("optimum-mc needs OR-Tools for the bit allocation: pip install ortools") from exc
        requested = self.quantization_config.__dict__.pop("_requested_quantization", None)
        if self.pre_quantized and requested:  # MCConfig.get_loading_attributes: what the passed config asked for
            self.quantization_config.check_not_requantized(requested)
        if not self.pre_quantized:
            from .placement import check_device_map, check_writable_folder, resolve_device

            resolve_device(self.quantization_config.device)
            check_device_map(kwargs.get("device_map"))
            check_writable_folder(self.quantization_config.offload_folder, "offload_folder")

    def update_device_map(self, device_map):
        """Keep the user's map for the packed model; load the layer-less skeleton without any disk offload."""
        if self.pre_quantized:
            return device_map
        self._device_map = device_map
        if isinstance(device_map, dict):
            return {k: ("cpu" if v == "disk" else v) for k, v in device_map.items()}
        return device_map

    def adjust_max_memory(self, max_memory: dict) -> dict:
        """Remember ``max_memory`` for placing the packed model; the skeleton (embeddings, head) is not limited."""
        if self.pre_quantized:
            return max_memory
        self._max_memory = dict(max_memory) if max_memory else None
        return {k: 2**62 for k in max_memory} if max_memory else max_memory

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, dtype=None, **kwargs: Any):
        cfg: MCConfig = self.quantization_config
        arch = require_moe(model)
        if cfg.odp:  # issue 11: top-1 + ODP refused before any weight is loaded
            from .pruning import check_odp_supported

            check_odp_supported(model)
        if self.pre_quantized:
            check_results_match_model(model, cfg, arch)
            if checkpoint_files:
                check_checkpoint(
                    checkpoint_files,
                    expected_tensors(model, cfg, arch),
                    key_renamer(model, self),
                    layer_list_name(model),
                )
            build_quantized_skeleton(model, cfg, arch)
            if checkpoint_files:  # every tensor, not only packed ones
                check_all_tensors(model, checkpoint_files, self)
            return model
        from .budget import check_budget, expert_code_bits

        blocks = list(moe_blocks(model, arch))  # read twice below
        check_budget(
            cfg, [int(b.experts.num_experts) for b in blocks], [expert_code_bits(cfg, b.experts) for b in blocks]
        )
        if checkpoint_files and all(str(f).endswith(".safetensors") for f in checkpoint_files):
            from .calibration.layer_source import CheckpointLayers

            self._source = CheckpointLayers(model, checkpoint_files, dtype)
            self._source.check_finite()
            ignore = set(model._keys_to_ignore_on_load_unexpected or ()) | set(self._source.ignore_patterns())
            model._keys_to_ignore_on_load_unexpected = ignore
        elif _offloads(self._device_map):
            raise MCConfigError(
                "quantizing with parts of the model offloaded needs a safetensors checkpoint (MC streams each "
                "layer from it); convert the checkpoint to safetensors, or load without offloading."
            )
        return model

    def _process_model_after_weight_loading(self, model, **kwargs: Any):
        cfg: MCConfig = self.quantization_config
        from .saving import install_atomic_save
        from .verify import check_finite_loaded, check_finite_weights

        if self.pre_quantized:
            expand_packed_metadata(model)  # compact (q8) checkpoints: the fp16 grid the kernels read
        (check_finite_loaded if self.pre_quantized else check_finite_weights)(model)  # issue 11
        if not self.pre_quantized:
            from .pipeline import quantize_model
            from .placement import place_model

            def place(m):
                final = place_model(m, self._device_map, self._max_memory, cfg.offload_folder)
                if final is not None and len(set(final.values())) > 1:
                    m.hf_device_map = final

            quantize_model(model, cfg, source=self._source, place=place)
            self._source = None
        else:
            missing = [n for n, b in model.named_buffers() if b.device.type == "meta"]
            if missing:
                raise CheckpointError(
                    f"{len(missing)} packed tensors were not in the checkpoint (e.g. {missing[:3]}); "
                    f"re-save it from the quantized model."
                )
        self._apply_inference_options(model)
        install_atomic_save(model, None if self.pre_quantized else getattr(model.config, "_name_or_path", None))
        return model

    def _apply_inference_options(self, model) -> None:
        """The loading attributes: decode activations, then ODP."""
        cfg: MCConfig = self.quantization_config
        if cfg.decode_activations != "auto":
            from .nn.experts import set_decode_activations

            set_decode_activations(model, cfg.decode_activations)
        if not cfg.odp:
            return
        from .pruning import set_odp_from_config

        set_odp_from_config(model, cfg)

    def get_state_dict_and_metadata(self, model):
        """transformers' hook for saving: the default state dict, and safetensors metadata naming the MC format."""
        from .checkpoint import shard_metadata

        qc = getattr(model.config, "quantization_config", None)
        return None, shard_metadata(getattr(qc, "expert_bits", None), getattr(qc, "metadata", "fp16"))

    def _dequantize(self, model, dtype=None):
        return dequantize_model(model, dtype)

    @property
    def is_compileable(self) -> bool:
        return True  # zero graph breaks in the packed modules (tests/kernels/test_moe_op.py)

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        """Adapters (peft LoRA, ``optimum_mc.nn.lora``) train on a frozen MC model: the packed ops have input
        gradients (``kernels/autograd.py``)."""
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return False  # the packed weights themselves never train
