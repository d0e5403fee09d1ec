"""vLLM quantization config ``"mc"``: packed per-expert mixed-precision MoE layers and packed linears.

Imported only by :func:`optimum_mc.integrations.vllm.register` (this module imports vLLM). The math is optimum-mc's
own kernels (``optimum_mc::qmatmul`` for linears, ``optimum_mc::moe`` for a whole MoE layer); vLLM does everything
else (attention, KV cache, routing, scheduling, sampling).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn
from vllm.model_executor.layers.fused_moe import FusedMoEMethodBase
from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
from vllm.model_executor.layers.linear import LinearBase, LinearMethodBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.model_executor.utils import set_weight_attrs

from ... import bitwidths
from ...errors import CheckpointError, MCConfigError, UnsupportedArchitectureError
from ...kernels import check_experts, check_packed, moe_op
from ...packing import WORD_BITS

# Architectures whose vLLM model hands a MoE layer's checkpoint tensors to its RoutedExperts.load_weights (through
# AutoWeightsLoader and MoERunner.load_weights) and uses a plain gated SiLU MoE: what MCFusedMoEMethod relies on.
# Models with a hand-written load_weights loop over expert_params_mapping would look the packed names up in their
# own params dict and fail, so they are refused at load with this list in the message.
SUPPORTED_ARCHITECTURES = ("MixtralForCausalLM", "Qwen3MoeForCausalLM")

# A fused vLLM linear and the checkpoint's linears it stacks (used when the model did not say).
_DEFAULT_PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
_EXPERT_NAME = re.compile(r"packed\.(\d+)\.(gate_up|down)\.(qweight|scales|zeros)")
_TENSOR_DTYPES = {"qweight": torch.int32, "scales": torch.float16, "zeros": torch.float16}


def _working_tp_sizes(size: int, group: int, limit: int = 64) -> list[int]:
    """Tensor-parallel sizes that split ``size`` input columns only at ``group`` boundaries."""
    if group <= 0:
        return [1]
    return [t for t in range(1, limit + 1) if size % t == 0 and (size // t) % group == 0]


def _packed_shape(rows: int, cols: int, bits: int, group: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(qweight shape, scales/zeros shape)`` of a ``rows x cols`` matrix at ``bits`` (group -1: whole row)."""
    group = cols if group <= 0 else group
    return (rows, cols * bits // WORD_BITS), (rows, cols // group)


def _check_tensor(where: str, name: str, got: torch.Tensor, shape: tuple[int, int], bits: int) -> None:
    want = _TENSOR_DTYPES[name]
    if got.dtype != want or tuple(got.shape) != tuple(shape):
        hint = ""
        if name == "qweight" and got.dim() == 2 and got.shape[0] == shape[0] and got.shape[1] != shape[1]:
            hint = f" ({got.shape[1] * WORD_BITS / max(shape[1] * WORD_BITS // bits, 1):g}-bit words?)"
        raise CheckpointError(
            f"{where}.{name}: expected {want} {tuple(shape)} for {bits}-bit weights as quantization_config says, "
            f"the checkpoint has {got.dtype} {tuple(got.shape)}{hint}; the checkpoint does not match its config "
            "(truncated, edited, or expert_bits / linear_bits disagree with the tensors)."
        )


def _allow_amx() -> None:
    """Ask Linux for AMX tile state for this process (once per process; no-op elsewhere).

    vLLM 0.32's CPU attention kernel uses AMX without asking for it, relying on torch's oneDNN having asked during
    an earlier bf16 matmul. With every linear running on optimum-mc's kernels no oneDNN bf16 GEMM runs first, and
    the attention kernel died with SIGILL on the first request (seen on this repository's tiny MC Mixtral)."""
    init = getattr(getattr(torch._C, "_cpu", None), "_init_amx", None)
    if init is not None:
        try:
            init()
        except Exception:  # noqa: BLE001 - a CPU without AMX: nothing to ask for
            pass


class MCVllmConfig(QuantizationConfig):
    """``quantization_config`` of an MC checkpoint (``quant_method: "mc"``), as vLLM uses it."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
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
        if self.group_size != -1 and (self.group_size <= 0 or self.group_size % WORD_BITS):
            raise MCConfigError(f"group_size {self.group_size} is not -1 or a positive multiple of 32.")
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
        if archs and not any(a in SUPPORTED_ARCHITECTURES for a in archs):
            raise UnsupportedArchitectureError(
                f"{model_name}: architecture {', '.join(archs)} is not supported by optimum-mc's vLLM plugin yet; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}. Serve it with transformers "
                "(AutoModelForCausalLM.from_pretrained) instead."
            )

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        # linear_bits is keyed by transformers' module names; follow the model's renames (not its stacking)
        self.linear_bits = {hf_to_vllm_mapper.map_name(k) or k: v for k, v in self.linear_bits.items()}

    def get_quant_method(self, layer: nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if isinstance(layer, LinearBase):
            bits = self.linear_bits_for(prefix)
            return UnquantizedLinearMethod() if bits is None else MCLinearMethod(self, bits, prefix)
        if isinstance(layer, RoutedExperts):
            return MCFusedMoEMethod(self, layer.moe_config, self.expert_bits_for(prefix), prefix)
        return None  # embeddings, lm_head, attention (KV cache): unquantized

    # --- lookups ---
    def linear_bits_for(self, prefix: str) -> int | None:
        """Bits of the packed linear ``prefix`` (a fused vLLM linear: its parts'), None when unquantized."""
        if prefix in self.linear_bits:
            return self.linear_bits[prefix]
        parent, _, leaf = prefix.rpartition(".")
        parts = self.packed_modules_mapping.get(leaf) or _DEFAULT_PACKED.get(leaf)
        if not parts:
            return None
        names = [f"{parent}.{p}" if parent else p for p in parts]
        found = {n: self.linear_bits.get(n) for n in names}
        widths = set(found.values())
        if widths == {None}:
            return None
        if len(widths) != 1:
            raise CheckpointError(
                f"{prefix}: vLLM fuses {', '.join(names)} into one layer, but the checkpoint stores them at "
                f"different widths {found}; the vLLM plugin needs one width per fused layer."
            )
        return widths.pop()

    def expert_bits_for(self, prefix: str) -> list[int | list[int]]:
        """The per-expert widths of the MoE layer at ``prefix`` (``model.layers.<i>.<...>.experts``)."""
        m = re.search(r"layers\.(\d+)\.", prefix + ".")
        if m is None or int(m.group(1)) not in self.moe_layers:
            raise CheckpointError(
                f"{prefix}: vLLM builds a MoE layer here, but quantization_config's moe_layers {self.moe_layers} "
                "has no entry for it; the checkpoint does not match the model."
            )
        return self.expert_bits[self.moe_layers.index(int(m.group(1)))]


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
                    f"{_working_tp_sizes(input_size, group)}."
                )
        if input_size_per_partition % WORD_BITS:
            raise MCConfigError(f"{self.prefix}: {input_size_per_partition} input columns are not a multiple of 32.")
        g = input_size if group <= 0 else group
        rows = sum(output_partition_sizes)
        qshape, gshape = _packed_shape(rows, input_size_per_partition, self.bits, g)
        loader = extra_weight_attrs.pop("weight_loader")
        full_q, full_g = _packed_shape(0, input_size, self.bits, g)
        for name, shape, dtype, full_cols in (("qweight", qshape, torch.int32, full_q[1]),
                                              ("scales", gshape, torch.float16, full_g[1]),
                                              ("zeros", gshape, torch.float16, full_g[1])):  # fmt: skip
            param = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
            checked = self._checked_loader(loader, layer, name, full_cols)
            set_weight_attrs(param, {"input_dim": 1, "output_dim": 0, **extra_weight_attrs, "weight_loader": checked})
            layer.register_parameter(name, param)
        layer.mc_bits = self.bits

    def _checked_loader(self, loader, layer: nn.Module, name: str, full_cols: int):
        """vLLM's weight loader for the layer, after a check naming the tensor (its own is a bare assert)."""
        prefix, bits = self.prefix, self.bits

        def load(param: nn.Parameter, loaded_weight: torch.Tensor, *args, **kwargs):
            shard = args[0] if args else kwargs.get("loaded_shard_id")
            sizes = getattr(layer, "output_sizes", None)
            rows = loaded_weight.shape[0] if loaded_weight.dim() == 2 else -1
            if shard is None:
                rows = layer.output_size
            elif sizes is not None:
                idx = {"q": 0, "k": 1, "v": 2}.get(shard, shard)
                if isinstance(idx, int) and idx < len(sizes):
                    rows = sizes[idx]
            where = prefix if shard is None else f"{prefix} (shard {shard})"
            _check_tensor(where, name, loaded_weight, (rows, full_cols), bits)
            layer.__dict__.setdefault("_mc_loaded", set()).add((name, shard))
            return loader(param, loaded_weight, *args, **kwargs)

        return load

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        _allow_amx()
        # vLLM checks that every parameter was loaded only when asked to track loading; check here, always
        loaded = layer.__dict__.pop("_mc_loaded", set())
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
        y = torch.ops.optimum_mc.qmatmul(x, layer.qweight, layer.scales, layer.zeros, self.bits)
        return y if bias is None else y + bias.to(y.dtype)


class _PackedMatrix(nn.Module):
    def __init__(self, rows: int, cols: int, bits: int, group: int) -> None:
        super().__init__()
        qshape, gshape = _packed_shape(rows, cols, bits, group)
        self.qweight = nn.Parameter(torch.empty(qshape, dtype=torch.int32), requires_grad=False)
        self.scales = nn.Parameter(torch.empty(gshape, dtype=torch.float16), requires_grad=False)
        self.zeros = nn.Parameter(torch.empty(gshape, dtype=torch.float16), requires_grad=False)


class _PackedExpert(nn.Module):
    def __init__(self, hidden: int, inter: int, gate_up_bits: int, down_bits: int, group: int, inter_group: int):
        super().__init__()
        self.gate_up = _PackedMatrix(2 * inter, hidden, gate_up_bits, group)
        self.down = _PackedMatrix(hidden, inter, down_bits, inter_group)


class MCFusedMoEMethod(FusedMoEMethodBase):
    """A MoE layer of per-expert packed matrices, each at its expert's own width (never padded to the widest).

    Parameters live on the RoutedExperts layer as ``packed.<e>.gate_up.{qweight,scales,zeros}`` and
    ``packed.<e>.down.{...}``, the checkpoint's own names, for the experts of this rank (all of them without expert
    parallelism). Tensor parallelism splits each expert's intermediate dimension (gate and up rows, down's input
    columns) at quantization-group boundaries; vLLM all-reduces the partial outputs as for its own MoE methods.

    Loading: vLLM's ``RoutedExperts.load_weights`` maps checkpoint names through ``expert_params_mapping``
    (``experts.<e>.w1/w2/w3`` or ``gate_up_proj``) onto one stacked ``w13_*`` / ``w2_*`` parameter of shape
    ``(E, ...)``, which presumes every expert has the same shape. MC experts differ in size, so that route would
    need a fake stacked parameter and every packed name rewritten into it. Instead this method gives the layer its
    own ``load_weights`` (an instance attribute set in :meth:`create_weights`): ``MoERunner.load_weights`` hands the
    layer every tensor under ``...experts.`` with the names exactly as saved, and ours checks and copies them
    (this rank's experts, this rank's slice). Nothing else in vLLM is changed; the parameters stay ordinary
    parameters, so vLLM's own "weights not initialized from checkpoint" check reports a missing tensor.

    Routing is vLLM's (the layer's router: softmax / sigmoid, grouped top-k, renormalization, bias correction all as
    vLLM computes them for the model); ``apply`` then runs ``optimum_mc::moe`` over the packed lists.
    """

    def __init__(self, config: MCVllmConfig, moe, expert_bits: list, prefix: str) -> None:
        super().__init__(moe)
        self.config, self.prefix = config, prefix
        self.expert_bits = [bitwidths.split(b) for b in expert_bits]
        self.local_ids: list[int] = []  # global ids of this rank's experts, in local order
        self.loaded: set[str] = set()  # names load_packed copied in

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
        if moe.activation.value != "silu" or not moe.is_act_and_mul:
            raise UnsupportedArchitectureError(
                f"{self.prefix}: MoE activation {moe.activation.value!r}; the vLLM plugin serves gated SiLU experts."
            )
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
                f"{_working_tp_sizes(inter_full, group)} (or enable expert parallelism, which keeps experts whole)."
            )
        self.hidden, self.inter, self.inter_full = hidden_size, inter, inter_full
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
        layer.packed = nn.ModuleDict({
            str(e): _PackedExpert(hidden_size, inter, *self.expert_bits[e], self.group, self.inter_group)
            for e in self.local_ids
        })  # fmt: skip
        method = self

        def load_weights(weights):
            return method.load_packed(layer, weights)

        layer.load_weights = load_weights  # see the class docstring

    def load_packed(self, layer: nn.Module, weights):
        """Copy the checkpoint's ``packed.<e>.<proj>.<tensor>`` tensors (names relative to the layer) in; yield the
        names loaded."""
        total = len(self.expert_bits)
        for name, w in weights:
            m = _EXPERT_NAME.fullmatch(name)
            if m is None:
                raise CheckpointError(
                    f"{self.prefix}.{name}: not an MC expert tensor (expected packed.<e>.gate_up|down."
                    "qweight|scales|zeros); the checkpoint's MoE layers are not in MC's packed format."
                )
            e, proj, kind = int(m.group(1)), m.group(2), m.group(3)
            if e >= total:
                raise CheckpointError(f"{self.prefix}.{name}: expert {e}, but the layer has {total} experts.")
            if str(e) not in layer.packed:
                continue  # another rank's expert (expert parallelism)
            gu_bits, dn_bits = self.expert_bits[e]
            if proj == "gate_up":
                bits, full = gu_bits, _packed_shape(2 * self.inter_full, self.hidden, gu_bits, self.group)
            else:
                bits, full = dn_bits, _packed_shape(self.hidden, self.inter_full, dn_bits, self.inter_group)
            _check_tensor(f"{self.prefix}.packed.{e}.{proj}", kind, w, full[0 if kind == "qweight" else 1], bits)
            if self.tp_size > 1:
                r, n = self.tp_rank, self.inter
                if proj == "gate_up":  # gate rows then up rows: this rank's slice of each
                    w = torch.cat([w[r * n:(r + 1) * n], w[self.inter_full + r * n:self.inter_full + (r + 1) * n]])
                else:  # input columns: words and groups of this rank's slice (whole groups, so whole words)
                    cols = w.shape[1] // self.tp_size
                    w = w[:, r * cols:(r + 1) * cols]
            param = getattr(getattr(layer.packed[str(e)], proj), kind)
            param.data.copy_(w)
            self.loaded.add(name)
            yield name

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        _allow_amx()
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
        check_experts(gate_up, down, self.op_bits)
        self.lists = [[m[j] for m in gate_up] for j in range(3)] + [[m[j] for m in down] for j in range(3)]
        self.num_local = len(experts)

    def apply(self, layer: nn.Module, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              shared_experts=None, shared_experts_input=None) -> torch.Tensor:  # fmt: skip
        ids = topk_ids
        expert_map = layer.expert_map
        if expert_map is not None:  # expert parallelism: global -> local ids, other ranks' experts dropped
            ids = expert_map[ids.long()]
            ids = torch.where(ids < 0, torch.full_like(ids, self.num_local), ids)
        return moe_op(x, ids, topk_weights, *self.lists, self.op_bits, "silu")
