"""MCExperts: the fused experts module of transformers 5.x MoE layers, each expert at its own bit-width.

Same interface as ``MixtralExperts`` & co.: ``forward(hidden_states, top_k_index, top_k_weights)`` with the
fused layout (gate and up stacked in one ``(2I, H)`` matrix, ``down`` ``(H, I)``). Routing slots whose index is
``>= num_experts`` are skipped (online dynamic pruning marks dropped slots that way). Buffers are named
``packed.<e>.gate_up.*`` / ``packed.<e>.down.*`` so transformers' checkpoint conversions (which match
``gate_up_proj`` / ``down_proj`` and per-expert ``w1/w2/w3``) leave them alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from ..bitwidths import ExpertBits, join, op_bits, split
from ..errors import CheckpointError, UnsupportedArchitectureError
from ..expert_activation import experts_act_fn, gated
from ..kernels import activation_name, check_routing, cpu, moe_op
from ..kernels.eager import plain_eager
from ..kernels.moe_cpu import DecodePlan
from .linear import QuantLinear

QuantTriple = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class PackedExpert(nn.Module):
    """One expert: fused gate/up and down projections as :class:`QuantLinear`."""

    def __init__(self, hidden: int, inter: int, bits: ExpertBits, group_size: int, dtype: torch.dtype, device) -> None:
        super().__init__()
        gu_bits, dn_bits = split(bits)
        self.gate_up = QuantLinear(hidden, 2 * inter, gu_bits, group_size, dtype=dtype, device=device)
        self.down = QuantLinear(inter, hidden, dn_bits, group_size, dtype=dtype, device=device)


def float_experts_shape(module: nn.Module) -> tuple[int, int, int]:
    """``(num_experts, hidden, intermediate)`` of a transformers fused experts module; typed error otherwise."""
    if hasattr(module, "gate_up_proj_bias") or getattr(module, "is_transposed", False):
        raise UnsupportedArchitectureError(
            f"{type(module).__name__} stores experts transposed with interleaved gate/up and biases (gpt-oss "
            f"layout), which MCExperts does not support."
        )
    gu, dn = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not isinstance(gu, torch.Tensor) or not isinstance(dn, torch.Tensor) or gu.dim() != 3:
        raise UnsupportedArchitectureError(f"{type(module).__name__} is not a fused (gate_up_proj, down_proj) module.")
    e, two_i, h = gu.shape
    if two_i % 2 or tuple(dn.shape) != (e, h, two_i // 2):
        raise UnsupportedArchitectureError(
            f"{type(module).__name__}: gate_up_proj {tuple(gu.shape)} and down_proj {tuple(dn.shape)} are not the "
            f"(E, 2I, H) / (E, H, I) layout."
        )
    return e, h, two_i // 2


class MCExperts(nn.Module):
    """Mixed-precision experts: expert ``e`` is stored at ``bits[e]`` bits (an ``int``, or ``[gate_up, down]`` with
    per-projection widths, :mod:`~optimum_mc.bitwidths`)."""

    def __init__(
        self,
        num_experts: int,
        hidden_dim: int,
        intermediate_dim: int,
        bits: list[int],
        group_size: int,
        act_fn: Callable[[torch.Tensor], torch.Tensor],
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if len(bits) != num_experts:
            raise CheckpointError(f"got {len(bits)} bit-widths for {num_experts} experts.")
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden_dim, intermediate_dim
        self.bits = [join(*split(b)) for b in bits]
        self.group_size, self.act_fn, self.dtype = group_size, act_fn, dtype
        self.op_bits = op_bits(self.bits)  # the fused op's bits argument (E or 2E ints)
        self.packed = nn.ModuleList(
            PackedExpert(hidden_dim, intermediate_dim, b, group_size, dtype, device) for b in bits
        )
        # the fused op's name for act_fn; None (an activation it does not know) keeps the per-expert loop
        self.activation = activation_name(act_fn)
        # what the CPU decode kernel feeds its GEMVs: "auto" (int8 for bf16 / fp16 inputs where the CPU has the
        # integer-dot kernels), "float" or "int8" (kernels.cpu.int8_decode; set_decode_activations)
        self.decode_activations = "auto"

    @classmethod
    def from_float(cls, module: nn.Module, bits: list[int], group_size: int) -> MCExperts:
        """Round-to-nearest conversion of a transformers fused experts module."""
        from ..group_quant import rtn_quantize

        e, h, i = float_experts_shape(module)
        dtype, device = module.gate_up_proj.dtype, module.gate_up_proj.device
        new = cls(e, h, i, bits, group_size, experts_act_fn(module), dtype, device)
        for k, b in enumerate(bits):
            gu_bits, dn_bits = split(b)
            new.set_expert(
                k,
                gate_up=rtn_quantize(module.gate_up_proj[k].detach(), gu_bits, group_size),
                down=rtn_quantize(module.down_proj[k].detach(), dn_bits, group_size),
            )
        return new

    def set_expert(self, e: int, gate_up: QuantTriple, down: QuantTriple) -> None:
        """Store expert ``e`` from codes / scales / zeros of its two matrices."""
        self.packed[e].gate_up.set_codes(*gate_up)
        self.packed[e].down.set_codes(*down)

    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Float ``gate_up_proj (E, 2I, H)`` and ``down_proj (E, H, I)`` in the module dtype."""
        gu = torch.stack([p.gate_up.dequantize_weight(self.dtype) for p in self.packed])
        dn = torch.stack([p.down.dequantize_weight(self.dtype) for p in self.packed])
        return gu, dn

    def expert_nbytes(self, e: int) -> int:
        """Packed bytes of expert ``e`` (both matrices, with scales and zeros)."""
        return self.packed[e].gate_up.nbytes() + self.packed[e].down.nbytes()

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.packed[e].gate_up(x).chunk(2, dim=-1)
        return self.packed[e].down(gated(self.act_fn)(gate, up))

    def packed_weights(self) -> tuple[list[torch.Tensor], ...]:
        """Six lists over experts: gate_up ``qweight``, ``scales``, ``zeros``, then the same of down.

        Read straight from the submodules' buffer dicts (``nn.Module.__getattr__`` would cost ~1 µs per tensor,
        which is most of a small decode step); never cached, so replaced buffers (``.to()``, loading) are seen.
        """
        gq, gs, gz, dq, ds, dz = [], [], [], [], [], []
        for p in self.packed._modules.values():
            g, d = p._modules["gate_up"]._buffers, p._modules["down"]._buffers
            gq.append(g["qweight"])
            gs.append(g["scales"])
            gz.append(g["zeros"])
            dq.append(d["qweight"])
            ds.append(d["scales"])
            dz.append(d["zeros"])
        return gq, gs, gz, dq, ds, dz

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        # set by ODP's router hook for this call (eager mode only: under torch.compile the hook rewrites the routing)
        pending = None if torch.compiler.is_compiling() else self.__dict__.pop("_mc_odp_pending", None)
        if pending is not None:
            return self.forward_with_odp(hidden_states, top_k_index, top_k_weights, *pending)
        first = self.packed[0].gate_up.qweight
        if self.activation is None or first.is_meta:
            # meta buffers: offloaded by accelerate, whose hooks load them only when each QuantLinear runs
            return self.forward_per_expert(hidden_states, top_k_index, top_k_weights)
        # the packed buffers were validated when built or loaded (QuantLinear); only the routing is checked here
        check_routing(hidden_states, top_k_index, top_k_weights, self.hidden_dim, first.device, self.activation)
        weights = self.packed_weights()
        plan = self._decode_plan(hidden_states, weights)
        if plan is not None:
            int8 = cpu.int8_decode(self.decode_activations, hidden_states.dtype)
            return plan(hidden_states, top_k_index, top_k_weights, int8=int8)
        return moe_op(hidden_states, top_k_index, top_k_weights, *weights, self.op_bits, self.activation,
                      self.decode_activations)  # fmt: skip

    def _decode_plan(self, x: torch.Tensor, weights: tuple[list[torch.Tensor], ...]) -> DecodePlan | None:
        """The CPU decode kernel's cached plan for a plain-eager CPU decode step, else None (the op's dispatch)."""
        if x.device.type != "cpu" or x.dim() != 2 or x.shape[0] > cpu.GEMV_MAX_ROWS or not plain_eager(x):
            return None
        plan = self.__dict__.get("_mc_decode_plan")
        if plan is None or not plan.matches(weights):
            plan = DecodePlan(weights, self.op_bits, self.activation)
            self.__dict__["_mc_decode_plan"] = plan
        return plan if plan.ok else None

    def forward_with_odp(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        threshold: float,
        counts: torch.Tensor,
    ) -> torch.Tensor:
        """Forward with online dynamic pruning's rule (``threshold`` 0: none) applied to the routing here, and its
        statistics added to ``counts`` (``pruning.rule.count_routing``'s layout). On CPU in eager mode, decode
        steps do both inside the fused C kernel; elsewhere the rule runs as torch ops (same results)."""
        first = self.packed[0].gate_up.qweight
        if (
            self.activation is not None
            and not first.is_meta
            and top_k_weights.dtype == torch.float32
            and counts.device.type == "cpu"
        ):
            plan = self._decode_plan(hidden_states, self.packed_weights())
            if plan is not None:
                check_routing(
                    hidden_states, top_k_index, top_k_weights, self.hidden_dim, first.device, self.activation
                )
                int8 = cpu.int8_decode(self.decode_activations, hidden_states.dtype)
                return plan(hidden_states, top_k_index, top_k_weights, threshold, counts, int8=int8)
        from ..pruning.rule import apply_drop, count_routing, drop_mask

        if threshold > 0:
            drop = drop_mask(top_k_weights.reshape(-1, top_k_weights.shape[-1]), threshold).reshape(top_k_index.shape)
            top_k_index, top_k_weights = apply_drop(top_k_index, top_k_weights, drop, self.num_experts)
        with torch.no_grad():
            count_routing(counts, top_k_index, None, self.num_experts)
        return self.forward(hidden_states, top_k_index, top_k_weights)

    def forward_per_expert(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """Expert-by-expert evaluation (a Python loop over the hit experts): for activations the fused op lacks."""
        out = torch.zeros_like(hidden_states)
        flat = top_k_index.reshape(top_k_index.shape[0], -1)
        hit = torch.unique(flat)
        for e in hit.tolist():
            if e < 0 or e >= self.num_experts:
                continue
            token, slot = torch.where(flat == e)
            y = self.expert_forward(e, hidden_states[token])
            y = y * top_k_weights[token, slot, None].to(y.dtype)
            out.index_add_(0, token, y.to(out.dtype))
        return out

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, bits={self.bits}, group_size={self.group_size}"


def set_decode_activations(model: nn.Module, mode: str = "int8") -> int:
    """What the CPU decode kernels of ``model``'s packed modules (every :class:`MCExperts` and
    :class:`QuantLinear`) feed their GEMVs: ``"float"`` (fp32), ``"int8"`` (each group of the inputs rounded to
    int8 with its own scale, as llama.cpp does, and multiplied with the codes in exact integer dots: 1.5-2x faster
    per GEMV than fp32 decode on CPUs with AVX512-VNNI/VBMI, no measurable perplexity change) or ``"auto"`` (the
    default: int8 for bf16 / fp16 models on CPUs with those kernels, float otherwise). Eager and compiled decode
    agree (the mode is an argument of the ops); prefill and GPUs stay float. Returns how many modules were set."""
    from ..config import DECODE_ACTIVATIONS
    from ..errors import MCConfigError

    if mode not in DECODE_ACTIVATIONS:
        raise MCConfigError(f"decode activations must be one of {DECODE_ACTIVATIONS}, got {mode!r}.")
    modules = [m for m in model.modules() if isinstance(m, (MCExperts, QuantLinear))]
    if not modules:
        raise UnsupportedArchitectureError("the model has no MC-packed modules: quantize it with MCConfig first.")
    lib = cpu.library()
    if mode == "int8" and (lib is None or not lib.mc_i8dot_available()):
        logging.getLogger(__name__).warning(
            "optimum-mc: this CPU (or build) lacks the AVX512-VNNI/VBMI int8 kernel, so int8 decode activations run "
            "a portable loop that is slower than the fp32 decode; keep decode_activations='float' here."
        )
    for m in modules:
        m.decode_activations = mode
    return len(modules)
