"""vLLM fused-MoE method of the ``"mc"`` quantization: per-expert packed matrices, ``optimum_mc::moe``."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.modules.module import register_module_module_registration_hook
from vllm.model_executor.layers.fused_moe import FusedMoEMethodBase

from ... import bitwidths
from ...errors import CheckpointError, MCConfigError, UnsupportedArchitectureError
from ...kernels import check_experts, check_packed
from . import odp
from .moe_apply import apply_packed_moe, apply_ungated_moe
from .weights import (
    COMPACT,
    EXPERT_NAME,
    CompactMetadata,
    PackedExpert,
    allow_amx,
    check_compact,
    check_tensor,
    packed_shape,
    working_tp_sizes,
)

if TYPE_CHECKING:
    from .config import MCVllmConfig

logger = logging.getLogger("vllm.optimum_mc")  # under vLLM's logger: its handler prints it


class MCFusedMoEMethod(FusedMoEMethodBase):
    """A MoE layer of per-expert packed matrices, each at its expert's own width (never padded to the widest).

    Parameters are ``packed.<e>.gate_up.{qweight,scales,zeros}`` and ``packed.<e>.down.{...}``, the checkpoint's own
    names; other ranks' experts (expert parallelism) as empty placeholders, so that a model's own loading loop finds
    every checkpoint name (their tensors are checked, not kept). They are registered on the MoE
    layer's ``MoERunner`` (the module at ``<...>.experts``, the RoutedExperts layer's parent), so that their full names
    in ``model.named_parameters()`` are the checkpoint's (``<...>.mlp.experts.packed.<e>.<proj>.<tensor>``, not
    ``<...>.experts.routed_experts.packed...``); the RoutedExperts layer holds them as a plain attribute.
    Tensor parallelism splits each expert's intermediate dimension (gate and up rows, down's input
    columns) at quantization-group boundaries; vLLM all-reduces the partial outputs as for its own MoE methods.

    Loading, two routes. Models loaded by ``AutoWeightsLoader`` (Mixtral, Qwen-MoE, GLM, ...): vLLM's
    ``RoutedExperts.load_weights`` maps checkpoint names through ``expert_params_mapping``
    (``experts.<e>.w1/w2/w3`` or ``gate_up_proj``) onto one stacked ``w13_*`` / ``w2_*`` parameter of shape
    ``(E, ...)``, which presumes every expert has the same shape. MC experts differ in size, so that route would
    need a fake stacked parameter and every packed name rewritten into it. Instead this method gives the layer its
    own ``load_weights`` (an instance attribute set in :meth:`create_weights`): ``MoERunner.load_weights`` hands the
    layer every tensor under ``...experts.`` with the names exactly as saved, and ours checks and copies them
    (this rank's experts, this rank's slice). Models with their own loading loop over ``dict(named_parameters())``
    (DeepSeek-V2/V3): a checkpoint name no stacking or expert mapping matches is looked up as it is and loaded with
    the parameter's ``weight_loader``, which is ours (the same check and slice). Nothing else in vLLM is changed.

    Routing is vLLM's (the layer's router: softmax / sigmoid, grouped top-k, renormalization, bias correction all as
    vLLM computes them for the model); ``apply`` then runs ``optimum_mc::moe`` over the packed lists. With online
    dynamic pruning on (:mod:`.odp`), the op gets the layer's threshold and counters (the contract transformers'
    ``MCExperts`` uses; CPU decode steps run the whole layer, rule included, in one call of the fused C kernel), or,
    with expert parallelism or protected tokens, the routing pruned in torch ops (:func:`.moe_apply.apply_packed_moe`).
    """

    def __init__(self, config: MCVllmConfig, moe, expert_bits: list, prefix: str) -> None:
        super().__init__(moe)
        self.config, self.prefix = config, prefix
        self.expert_bits = [bitwidths.split(b) for b in expert_bits]
        self.local_ids: list[int] = []  # global ids of this rank's experts, in local order
        self.local_set: set[int] = set()
        self.loaded: set[str] = set()  # names load_packed copied in
        self.odp_threshold = config.odp_threshold_for(prefix)  # None: ODP off; 0.0: on, not active in this layer
        self.protect_first = config.odp.protect_first if config.odp is not None else 0
        self.log_every = config.odp.log_every if config.odp is not None else 0
        self.calls = 0
        self.mode = config.decode_activations  # "auto" / "float" / "int8": what the CPU decode GEMVs take
        self.compact = CompactMetadata() if config.metadata == "q8" else None  # q8 metadata: expanded at load

    def get_fused_moe_quant_config(self, layer: nn.Module):
        return None

    def create_weights(self, layer: nn.Module, num_experts: int, hidden_size: int,
                       intermediate_size_per_partition: int, params_dtype: torch.dtype,
                       **extra_weight_attrs) -> None:  # fmt: skip
        moe = layer.moe_config
        total = int(extra_weight_attrs.get("global_num_experts", moe.num_experts))
        if len(self.expert_bits) != total:
            raise CheckpointError(
                f"{self.prefix}: the model has {total} experts here, quantization_config's expert_bits has "
                f"{len(self.expert_bits)}; the checkpoint does not match the model."
            )
        self.gated = bool(moe.is_act_and_mul)
        if (moe.activation.value, self.gated) not in (("silu", True), ("relu2_no_mul", False)):
            raise UnsupportedArchitectureError(
                f"{self.prefix}: MoE activation {moe.activation.value!r}; the vLLM plugin serves gated SiLU experts "
                "and non-gated ReLU² ones."
            )
        if not self.gated and self.odp_threshold is not None:
            raise MCConfigError(f"{self.prefix}: online dynamic pruning is not served for non-gated experts yet.")
        if layer.apply_router_weight_on_input:
            raise UnsupportedArchitectureError(f"{self.prefix}: router weights applied on the input not supported.")
        group = self.config.group_size
        inter_full, inter = moe.intermediate_size, intermediate_size_per_partition
        if inter != inter_full and (group <= 0 or inter % group):
            tp = inter_full // inter
            raise MCConfigError(
                f"{self.prefix}: tensor parallel size {tp} splits each expert's {inter_full} intermediate columns "
                f"into {inter}-column shards, which cuts through quantization groups of "
                f"{'a whole row' if group <= 0 else group}; tensor parallel sizes that work: "
                f"{working_tp_sizes(inter_full, group)} (or enable expert parallelism, which keeps experts whole)."
            )
        self.hidden, self.inter, self.inter_full = hidden_size, inter, inter_full
        self.rows = 2 if self.gated else 1  # gate_up rows per intermediate column
        self.tp_rank, self.tp_size = moe.moe_parallel_config.tp_rank, moe.moe_parallel_config.tp_size
        self.group = hidden_size if group <= 0 else group
        self.inter_group = inter_full if group <= 0 else group
        local = {}
        for e in range(total):
            slot = int(layer._map_global_expert_id_to_local_expert_id(e))
            if slot >= 0:
                local[slot] = e
        self.local_ids = [local[s] for s in sorted(local)]
        if len(self.local_ids) != num_experts:
            raise MCConfigError(f"{self.prefix}: {num_experts} local experts expected, found {len(self.local_ids)}.")
        # every expert's names, other ranks' as empty placeholders (checked at load, not kept; PackedMatrix)
        self.local_set = mine = set(self.local_ids)
        packed = nn.ModuleDict({
            str(e): PackedExpert(hidden_size, inter, *self.expert_bits[e], self.group, self.inter_group, e not in mine,
                                 compact=self.compact is not None, gated=self.gated)
            for e in range(total)
        })  # fmt: skip
        for name, param in packed.named_parameters():
            e, proj, kind = name.split(".")
            param.weight_loader = self._param_loader(layer, int(e), proj, kind)
        object.__setattr__(layer, "packed", packed)  # a plain attribute; registered by _attach (class docstring)
        self._hook = register_module_module_registration_hook(self._attach(layer, packed))
        method = self

        def load_weights(weights):
            return method.load_packed(layer, weights)

        layer.load_weights = load_weights  # see the class docstring

    def _attach(self, layer: nn.Module, packed: nn.ModuleDict):
        """A module-registration hook: when the MoERunner takes ``layer`` as its child (right after vLLM built the
        layer), register ``packed`` on the runner, so that the parameters' names are the checkpoint's; with any other
        parent, on ``layer`` itself."""

        def hook(parent: nn.Module, name: str, child):
            if child is not layer or "packed" in layer._modules or self._attached is not None:
                return None
            owner = parent if type(parent).__name__ == "MoERunner" and not hasattr(parent, "packed") else layer
            if owner is layer:
                del layer.__dict__["packed"]
            owner.register_module("packed", packed)
            self._attached = owner
            return None

        self._attached: nn.Module | None = None
        return hook

    def _param_loader(self, layer: nn.Module, e: int, proj: str, kind: str):
        """The ``weight_loader`` of ``packed.<e>.<proj>.<kind>`` (vLLM's loading loops call it with the tensor)."""

        def load(param: nn.Parameter, loaded_weight: torch.Tensor, *args, **kwargs):
            self._copy(layer, e, proj, kind, loaded_weight)
            return True if kwargs.get("return_success") else None

        return load

    def load_packed(self, layer: nn.Module, weights):
        """Copy the checkpoint's ``packed.<e>.<proj>.<tensor>`` tensors (names relative to the layer) in; yield the
        names loaded."""
        total = len(self.expert_bits)
        for name, w in weights:
            m = EXPERT_NAME.fullmatch(name)
            if m is None:
                raise CheckpointError(
                    f"{self.prefix}.{name}: not an MC expert tensor (expected packed.<e>.gate_up|down."
                    "qweight|scales|zeros); the checkpoint's MoE layers are not in MC's packed format."
                )
            e, proj, kind = int(m.group(1)), m.group(2), m.group(3)
            if e >= total:
                raise CheckpointError(f"{self.prefix}.{name}: expert {e}, but the layer has {total} experts.")
            self._copy(layer, e, proj, kind, w)
            yield name

    def _copy(self, layer: nn.Module, e: int, proj: str, kind: str, w: torch.Tensor) -> None:
        """Check the checkpoint's ``packed.<e>.<proj>.<kind>`` and copy this rank's slice of it in (compact metadata:
        held until the matrix's three tensors are in, then expanded to the fp16 scales / zeros and copied as those)."""
        gu_bits, dn_bits = self.expert_bits[e]
        if kind in COMPACT:
            if self.compact is None:
                raise CheckpointError(
                    f"{self.prefix}.packed.{e}.{proj}.{kind}: compact (q8) metadata, but quantization_config's "
                    "metadata is 'fp16'; the checkpoint does not match its config."
                )
            if proj == "gate_up":
                bits, rows, groups = gu_bits, self.rows * self.inter_full, self.hidden // self.group
            else:
                bits, rows, groups = dn_bits, self.hidden, self.inter_full // self.inter_group
            check_compact(f"{self.prefix}.packed.{e}.{proj}", kind, w, rows, groups, bits)
            self.loaded.add(f"packed.{e}.{proj}.{kind}")
            out = self.compact.add((e, proj), kind, w, bits)
            for part, t in zip(("scales", "zeros"), out or ()):
                self._copy(layer, e, proj, part, t)
            return
        if proj == "gate_up":
            bits, full = gu_bits, packed_shape(self.rows * self.inter_full, self.hidden, gu_bits, self.group)
        else:
            bits, full = dn_bits, packed_shape(self.hidden, self.inter_full, dn_bits, self.inter_group)
        check_tensor(f"{self.prefix}.packed.{e}.{proj}", kind, w, full[0 if kind == "qweight" else 1], bits)
        self.loaded.add(f"packed.{e}.{proj}.{kind}")
        if e not in self.local_set:  # another rank's expert (expert parallelism): checked, not kept
            return
        if self.tp_size > 1:
            r, n = self.tp_rank, self.inter
            if proj == "gate_up" and not self.gated:  # up rows only
                w = w[r * n : (r + 1) * n]
            elif proj == "gate_up":  # gate rows then up rows: this rank's slice of each
                w = torch.cat([w[r * n : (r + 1) * n], w[self.inter_full + r * n : self.inter_full + (r + 1) * n]])
            else:  # input columns: words and groups of this rank's slice (whole groups, so whole words)
                cols = w.shape[1] // self.tp_size
                w = w[:, r * cols : (r + 1) * cols]
        param = getattr(getattr(layer.packed[str(e)], proj), kind)
        param.data.copy_(w)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        allow_amx()
        self._hook.remove()
        if self.compact is not None and self.compact.incomplete():
            raise CheckpointError(
                f"{self.prefix}: compact metadata incomplete ({'; '.join(self.compact.incomplete())} missing); the "
                "checkpoint is incomplete or does not match its config."
            )
        # vLLM checks that every parameter was loaded only when asked to track loading; check here, always
        missing = sorted(n for n, _ in layer.packed.named_parameters(prefix="packed") if n not in self.loaded)
        if missing:
            more = f" and {len(missing) - 6} more" if len(missing) > 6 else ""
            raise CheckpointError(
                f"{self.prefix}: {', '.join(missing[:6])}{more} not in the checkpoint; the checkpoint is incomplete "
                "or does not match its config."
            )
        experts = [layer.packed[str(e)] for e in self.local_ids]
        gate_up = [(x.gate_up.qweight, x.gate_up.scales, x.gate_up.zeros) for x in experts]
        down = [(x.down.qweight, x.down.scales, x.down.zeros) for x in experts]
        self.op_bits = bitwidths.op_bits([bitwidths.join(*self.expert_bits[e]) for e in self.local_ids])
        self.lists = [[m[j] for m in gate_up] for j in range(3)] + [[m[j] for m in down] for j in range(3)]
        if not self.gated:  # the per-expert loop (moe_apply.apply_ungated_moe): the fused op and its checks are gated
            for e, g, d in zip(self.local_ids, gate_up, down):
                check_packed(*g, self.expert_bits[e][0])
                check_packed(*d, self.expert_bits[e][1])
            return
        check_experts(gate_up, down, self.op_bits)

    def apply(self, layer: nn.Module, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              shared_experts=None, shared_experts_input=None) -> torch.Tensor:  # fmt: skip
        total, protect, counts = len(self.expert_bits), None, None
        if not self.gated:
            bits = [self.expert_bits[e] for e in self.local_ids]
            return apply_ungated_moe(x, topk_weights, topk_ids, self.lists, bits, total, mode=self.mode,
                                     expert_map=layer.expert_map)  # fmt: skip
        if self.odp_threshold is not None:
            counts = odp.counters(self.prefix, total, topk_ids.device)
            self.calls += 1
            if self.log_every and self.calls % self.log_every == 0 and self.prefix == min(odp._COUNTERS):
                share = 100 * odp.odp_stats()["skipped_share"]
                logger.info("optimum-mc ODP: %.2f%% of expert evaluations skipped", share)
            protect = odp.protected_tokens(x.shape[0], self.protect_first) if self.odp_threshold > 0 else None
        return apply_packed_moe(
            x, topk_weights, topk_ids, self.lists, self.op_bits, total, mode=self.mode,
            expert_map=layer.expert_map, odp_threshold=self.odp_threshold, protect=protect, counts=counts,
            renormalize=bool(getattr(layer, "renormalize", True)),  # the router's: kept weights rescaled, or not
        )  # fmt: skip
