"""MCExperts: the fused experts module of transformers 5.x MoE layers, each expert at its own bit-width.

Same interface as ``MixtralExperts`` & co.: ``forward(hidden_states, top_k_index, top_k_weights)`` with the
fused layout (gate and up stacked in one ``(2I, H)`` matrix, ``down`` ``(H, I)``). Routing slots whose index is
``>= num_experts`` are skipped (online dynamic pruning marks dropped slots that way). With ODP on,
:attr:`MCExperts.odp` holds the layer's ODP state and the experts pass its threshold and counters to
``optimum_mc::moe``, which applies the rule and counts (inside the C decode kernel on CPU). Buffers are named
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
from ..expert_layout import canonical_experts, experts_layout, experts_weight, gate_up_weight
from ..kernels import (
    activation_name,
    apply_odp,
    check_routing,
    int8_kernels_available,
    intermediate,
    moe_op,
    projection_rows,
)
from .linear import QuantLinear

QuantTriple = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class PackedExpert(nn.Module):
    """One expert: fused gate/up and down projections as :class:`QuantLinear` (with the expert's biases, if any)."""

    def __init__(self, hidden: int, inter: int, bits: ExpertBits, group_size: int, dtype: torch.dtype, device,
                 bias: tuple[bool, bool] = (False, False), rows: int | None = None,
                 metadata: str = "fp16") -> None:  # fmt: skip
        super().__init__()
        gu_bits, dn_bits = split(bits)
        rows = 2 * inter if rows is None else rows  # (I for non-gated experts: up rows alone)
        kw = dict(dtype=dtype, device=device, metadata=metadata)
        self.gate_up = QuantLinear(hidden, rows, gu_bits, group_size, bias[0], **kw)
        self.down = QuantLinear(inter, hidden, dn_bits, group_size, bias[1], **kw)


def float_experts_shape(module: nn.Module) -> tuple[int, int, int]:
    """``(num_experts, hidden, intermediate)`` of a transformers fused experts module (MC's layout or its
    transpose, :mod:`~optimum_mc.expert_layout`); typed error otherwise."""
    gu, dn = gate_up_weight(module), getattr(module, "down_proj", None)
    if gu is None or not isinstance(dn, torch.Tensor):
        raise UnsupportedArchitectureError(f"{type(module).__name__} is not a fused (gate_up_proj, down_proj) module.")
    layout = experts_layout(module, type(module).__name__)
    return layout.num_experts, layout.hidden, layout.inter


def packed_like(
    module: nn.Module, bits: list[ExpertBits], group_size: int, device=None, metadata: str = "fp16"
) -> MCExperts:
    """An empty :class:`MCExperts` for the float experts ``module`` (any layout :func:`experts_layout` reads): its
    sizes, gate, biases and dtype, on ``device`` (default: the module's); ``metadata`` as :class:`QuantLinear`."""
    layout = experts_layout(module, type(module).__name__)
    weight = experts_weight(module)
    return MCExperts(
        layout.num_experts,
        layout.hidden,
        layout.inter,
        bits,
        group_size,
        layout.act_fn,
        dtype=weight.dtype,
        device=weight.device if device is None else device,
        bias=(layout.gate_up_bias, layout.down_bias),
        metadata=metadata,
    )


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
        bias: tuple[bool, bool] = (False, False),
        metadata: str = "fp16",
    ) -> None:
        super().__init__()
        if len(bits) != num_experts:
            raise CheckpointError(f"got {len(bits)} bit-widths for {num_experts} experts.")
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden_dim, intermediate_dim
        self.bits = [join(*split(b)) for b in bits]
        self.group_size, self.act_fn, self.dtype = group_size, act_fn, dtype
        self.op_bits = op_bits(self.bits)  # the fused op's bits argument (E or 2E ints)
        rows = projection_rows(act_fn, intermediate_dim)  # 2I, or I for non-gated experts
        self.packed = nn.ModuleList(
            PackedExpert(hidden_dim, intermediate_dim, b, group_size, dtype, device, bias, rows, metadata)
            for b in bits
        )
        # (gate_up, down) biases, stored in the model dtype next to each expert's packed matrices (packed.<e>.*.bias)
        # and handed to the fused op stacked in fp32 ((E, 2I) / (E, H), built once: _op_biases)
        self.has_bias = tuple(bool(b) for b in bias)
        # the fused op's name for act_fn; None (an activation it does not know) keeps the per-expert loop
        self.activation = activation_name(act_fn)
        # what the CPU decode kernel feeds its GEMVs: "auto" (int8 for bf16 / fp16 inputs where the CPU has the
        # integer-dot kernels), "float" or "int8" (kernels.cpu.int8_decode; set_decode_activations)
        self.decode_activations = "auto"
        # online dynamic pruning: the layer's ODPLayerState (pruning.odp.set_odp), or None; read every call
        self.odp = None

    @classmethod
    def from_float(cls, module: nn.Module, bits: list[int], group_size: int) -> MCExperts:
        """Round-to-nearest conversion of a transformers fused experts module."""
        from ..group_quant import rtn_quantize

        module = canonical_experts(module, type(module).__name__)  # MC's layout (exact transposes / permutations)
        new = packed_like(module, bits, group_size)
        for k, b in enumerate(bits):
            gu_bits, dn_bits = split(b)
            new.set_expert(
                k,
                gate_up=rtn_quantize(module.gate_up_proj[k].detach(), gu_bits, group_size),
                down=rtn_quantize(module.down_proj[k].detach(), dn_bits, group_size),
            )
            new.set_bias(k, getattr(module, "gate_up_proj_bias", None), getattr(module, "down_proj_bias", None))
        return new

    def set_expert(self, e: int, gate_up: QuantTriple, down: QuantTriple) -> None:
        """Store expert ``e`` from codes / scales / zeros of its two matrices."""
        self.packed[e].gate_up.set_codes(*gate_up)
        self.packed[e].down.set_codes(*down)

    def set_bias(self, e: int, gate_up_bias: torch.Tensor | None, down_bias: torch.Tensor | None) -> None:
        """Copy expert ``e``'s biases (rows ``e`` of float ``(E, 2I)`` / ``(E, H)`` tensors in MC's layout)."""
        for lin, b in ((self.packed[e].gate_up, gate_up_bias), (self.packed[e].down, down_bias)):
            if (lin.bias is None) != (b is None):
                built = "with" if b is None else "without"
                raise CheckpointError(f"expert {e}: a bias given or missing for a projection built {built} one.")
            if b is not None:
                with torch.no_grad():
                    lin.bias.copy_(b[e].detach().to(lin.bias.dtype))

    def _op_biases(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The biases as the fused op takes them: fp32 ``(E, 2I)`` / ``(E, H)`` stacks, rebuilt only when a bias
        tensor was replaced (``.to()``, loading) or changed in place (its version counter)."""
        if not any(self.has_bias):
            return None, None
        parts = [p._modules[n]._buffers["bias"] for p in self.packed._modules.values() for n in ("gate_up", "down")]

        def stacked() -> tuple[torch.Tensor | None, torch.Tensor | None]:
            gb, db = (torch.stack([t.float() for t in parts[j::2]]) if self.has_bias[j] else None for j in (0, 1))
            return gb, db

        if torch.compiler.is_compiling():  # traced once into the graph: no cache to consult
            return stacked()
        key = tuple((id(t), t._version) if t is not None else None for t in parts)
        cached = self.__dict__.get("_mc_op_biases")
        if cached is None or cached[0] != key:
            cached = (key, stacked(), parts)  # the parts are kept alive: their ids stay theirs
            self.__dict__["_mc_op_biases"] = cached
        return cached[1]

    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Float ``gate_up_proj (E, 2I, H)`` and ``down_proj (E, H, I)`` in the module dtype."""
        gu = torch.stack([p.gate_up.dequantize_weight(self.dtype) for p in self.packed])
        dn = torch.stack([p.down.dequantize_weight(self.dtype) for p in self.packed])
        return gu, dn

    def biases(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``gate_up_proj_bias (E, 2I)`` and ``down_proj_bias (E, H)`` in MC's row order (None where absent)."""
        gb = torch.stack([p.gate_up.bias for p in self.packed]) if self.has_bias[0] else None
        db = torch.stack([p.down.bias for p in self.packed]) if self.has_bias[1] else None
        return gb, db

    def expert_nbytes(self, e: int) -> int:
        """Stored bytes of expert ``e`` (both matrices, with scales and zeros as saved; :meth:`QuantLinear.nbytes`)."""
        return self.packed[e].gate_up.nbytes() + self.packed[e].down.nbytes()

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return self.packed[e].down(intermediate(self.act_fn, self.packed[e].gate_up(x)))

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
        threshold, counts = 0.0, None
        if self.odp is not None:  # ODP's rule and counters for this call (pruning.odp.ODPLayerState.experts_routing)
            top_k_index, top_k_weights, threshold, counts = self.odp.experts_routing(
                hidden_states, top_k_index, top_k_weights
            )
        first = self.packed._modules["0"]._modules["gate_up"]._buffers["qweight"]  # (no __getattr__ chain per call)
        if self.activation is None or first.is_meta:
            # meta buffers: offloaded by accelerate, whose hooks load them only when each QuantLinear runs
            top_k_index, top_k_weights = apply_odp(top_k_index, top_k_weights, threshold, counts, self.num_experts)
            return self.forward_per_expert(hidden_states, top_k_index, top_k_weights)
        # the packed buffers were validated when built or loaded (QuantLinear); only the routing is checked here
        check_routing(hidden_states, top_k_index, top_k_weights, self.hidden_dim, first.device, self.activation)
        gb, db = self._op_biases()
        return moe_op(hidden_states, top_k_index, top_k_weights, *self.packed_weights(), self.op_bits,
                      self.activation, self.decode_activations, gb, db, threshold, counts)  # fmt: skip

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
        bias = f", bias={self.has_bias}" if any(self.has_bias) else ""
        return f"num_experts={self.num_experts}, bits={self.bits}, group_size={self.group_size}{bias}"


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
    if mode == "int8" and not int8_kernels_available():
        logging.getLogger(__name__).warning(
            "optimum-mc: this CPU (or build) lacks the AVX512-VNNI/VBMI int8 kernel, so int8 decode activations run "
            "a portable loop that is slower than the fp32 decode; keep decode_activations='float' here."
        )
    for m in modules:
        m.decode_activations = mode
    return len(modules)
