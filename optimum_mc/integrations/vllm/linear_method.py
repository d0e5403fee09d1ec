"""vLLM linear method of the ``"mc"`` quantization: a packed matrix per parallel linear, ``optimum_mc::qmatmul``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from vllm.model_executor.layers.linear import LinearMethodBase
from vllm.model_executor.utils import set_weight_attrs

from ...errors import CheckpointError, MCConfigError
from ...kernels import check_packed, qmatmul_op
from ...packing import WORD_BITS
from .weights import (
    COMPACT,
    CompactMetadata,
    allow_amx,
    check_compact,
    check_tensor,
    compact_placeholders,
    packed_shape,
    working_tp_sizes,
)

if TYPE_CHECKING:
    from .config import MCVllmConfig


class MCLinearMethod(LinearMethodBase):
    """One packed matrix per (column / row / QKV / merged) parallel linear, sharded like vLLM's weights:
    column-parallel layers split output rows (any split), row-parallel layers split input columns at quantization
    group boundaries only (a group's scale and zero stay on one rank)."""

    def __init__(self, config: MCVllmConfig, bits: int, prefix: str) -> None:
        self.config, self.bits, self.prefix = config, bits, prefix

    def create_weights(self, layer: nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype,
                       **extra_weight_attrs) -> None:  # fmt: skip
        group = self.config.group_size
        if input_size_per_partition != input_size:  # input columns split across ranks (row parallel)
            tp = input_size // input_size_per_partition
            if group <= 0 or input_size_per_partition % group:
                raise MCConfigError(
                    f"{self.prefix}: tensor parallel size {tp} splits its {input_size} input columns into "
                    f"{input_size_per_partition}-column shards, which cuts through quantization groups of "
                    f"{'a whole row' if group <= 0 else group}; tensor parallel sizes that work for this layer: "
                    f"{working_tp_sizes(input_size, group)}."
                )
        if input_size_per_partition % WORD_BITS:
            raise MCConfigError(f"{self.prefix}: {input_size_per_partition} input columns are not a multiple of 32.")
        g = input_size if group <= 0 else group
        rows = sum(output_partition_sizes)
        qshape, gshape = packed_shape(rows, input_size_per_partition, self.bits, g)
        loader = extra_weight_attrs.pop("weight_loader")
        full_q, full_g = packed_shape(0, input_size, self.bits, g)
        checked = {}
        for name, shape, dtype, full_cols in (("qweight", qshape, torch.int32, full_q[1]),
                                              ("scales", gshape, torch.float16, full_g[1]),
                                              ("zeros", gshape, torch.float16, full_g[1])):  # fmt: skip
            param = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
            checked[name] = self._checked_loader(loader, layer, name, full_cols)
            set_weight_attrs(param, {"input_dim": 1, "output_dim": 0, **extra_weight_attrs,
                                     "weight_loader": checked[name]})  # fmt: skip
            layer.register_parameter(name, param)
        if self.config.metadata == "q8":  # compact scales / zeros in the checkpoint: expanded to fp16 as they load
            compact_placeholders(layer)
            for name in COMPACT:
                getattr(layer, name).weight_loader = self._compact_loader(layer, name, full_g[1], checked)
        layer.mc_bits = self.bits

    @staticmethod
    def _shard_rows(layer: nn.Module, shard, loaded_weight: torch.Tensor) -> int:
        """The output rows of the checkpoint tensor for ``shard`` (None: the whole layer; a fused layer's part)."""
        sizes = getattr(layer, "output_sizes", None)
        rows = loaded_weight.shape[0] if loaded_weight.dim() == 2 else -1
        if shard is None:
            rows = layer.output_size
        elif sizes is not None:
            idx = {"q": 0, "k": 1, "v": 2}.get(shard, shard)
            if isinstance(idx, int) and idx < len(sizes):
                rows = sizes[idx]
        return rows

    def _compact_loader(self, layer: nn.Module, name: str, groups: int, checked: dict):
        """The ``weight_loader`` of a compact-metadata tensor: checked, held until the part's three are in, then
        expanded to fp16 scales / zeros and handed to their loaders (vLLM's sharding, as for fp16 checkpoints)."""
        prefix, bits = self.prefix, self.bits
        pending = layer.__dict__.setdefault("_mc_compact", CompactMetadata())

        def load(param: nn.Parameter, loaded_weight: torch.Tensor, *args, **kwargs):
            shard = args[0] if args else kwargs.get("loaded_shard_id")
            rows = self._shard_rows(layer, shard, loaded_weight)
            where = prefix if shard is None else f"{prefix} (shard {shard})"
            check_compact(where, name, loaded_weight, rows, groups, bits)
            out = pending.add(shard, name, loaded_weight, bits)
            if out is not None:
                for part, t in zip(("scales", "zeros"), out):
                    checked[part](getattr(layer, part), t, *args, **kwargs)

        return load

    def _checked_loader(self, loader, layer: nn.Module, name: str, full_cols: int):
        """vLLM's weight loader for the layer, after a check naming the tensor (its own is a bare assert)."""
        prefix, bits = self.prefix, self.bits

        def load(param: nn.Parameter, loaded_weight: torch.Tensor, *args, **kwargs):
            shard = args[0] if args else kwargs.get("loaded_shard_id")
            rows = self._shard_rows(layer, shard, loaded_weight)
            where = prefix if shard is None else f"{prefix} (shard {shard})"
            check_tensor(where, name, loaded_weight, (rows, full_cols), bits)
            layer.__dict__.setdefault("_mc_loaded", set()).add((name, shard))
            return loader(param, loaded_weight, *args, **kwargs)

        return load

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        allow_amx()
        # vLLM checks that every parameter was loaded only when asked to track loading; check here, always
        loaded = layer.__dict__.pop("_mc_loaded", set())
        incomplete = layer.__dict__.pop("_mc_compact", CompactMetadata()).incomplete()
        if incomplete:
            raise CheckpointError(
                f"{self.prefix}: compact metadata incomplete (shard {'; '.join(incomplete)} missing); the checkpoint "
                "is incomplete or does not match its config."
            )
        sizes = getattr(layer, "output_sizes", None) or []
        shards = {"q", "k", "v"} if hasattr(layer, "num_kv_heads") else set(range(len(sizes)))
        for name in ("qweight", "scales", "zeros"):
            got = {s for n, s in loaded if n == name}
            if None not in got and (not shards or not shards <= got):
                missing = sorted(map(str, shards - got)) if shards and got else []
                raise CheckpointError(
                    f"{self.prefix}.{name}: not in the checkpoint"
                    + (f" (parts {missing} missing)" if missing else "")
                    + "; the checkpoint is incomplete or does not match its config."
                )
        check_packed(layer.qweight, layer.scales, layer.zeros, self.bits)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        mode = self.config.decode_activations
        y = qmatmul_op(x, layer.qweight, layer.scales, layer.zeros, self.bits, mode)
        return y if bias is None else y + bias.to(y.dtype)
