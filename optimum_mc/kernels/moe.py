"""``optimum_mc::moe``: one op for a whole mixed-precision MoE layer (all experts, both projections, routing sum).

Schema (:data:`.ops.SCHEMAS`): ``moe(x (T, H), top_k_index (T, K), top_k_weights (T, K),
gate_up_{qweight,scales,zeros}: E tensors each, down_{qweight,scales,zeros}: E tensors each, bits: E or 2E ints,
activation: str, decode_activations: str, gate_up_bias: (E, 2I)?, down_bias: (E, H)?, odp_threshold: float,
odp_counts: int64 (E + 3)?, mutated) -> (T, H)`` in ``x.dtype``: for every token
``sum_k w[t, k] * down_e(glu(gate_e(x_t), up_e(x_t)))`` with ``e = top_k_index[t, k]`` (each projection plus its
expert's bias row where biases are given: gpt-oss); a slot whose index is ``E`` (dropped by online dynamic pruning)
contributes nothing and costs nothing. With ``odp_threshold`` > 0 the op first drops slots by ODP's rule
(:mod:`.odp_rule`, kept weights renormalized); with ``odp_counts`` it adds the post-rule routing's statistics to
them. Expert ``e``'s fused ``(2I, H)`` gate/up matrix and ``(I, H)``-input down matrix are packed at ``bits[e]``
bits (docs/format.md), or, with ``2E`` widths, at ``bits[e]`` and ``bits[E + e]`` (per-projection allocation,
:mod:`optimum_mc.bitwidths`), so one call mixes bit-widths. Intermediates are fp32.

The default implementation (every device) is the pure-torch reference (:mod:`.reference`); ``kernels/moe_cpu.py``
and ``kernels/moe_fused.py`` register the fast ones for "CPU" and "CUDA" (the latter falls back to
``kernels/moe_triton.py``'s tiled kernels). The packed buffers are validated once, when the module holding them is
built or loaded (:func:`check_experts`); :func:`check_routing` is the cheap per-call check of the routing tensors
(shapes, dtypes, devices).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..bitwidths import from_op_bits
from ..errors import DeviceMismatchError, DTypeError, RoutingError, ShapeError, UnsupportedArchitectureError
from .activations import GATED
from .ops import check_packed

Packed = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def check_index_values(top_k_index: torch.Tensor, num_experts: int) -> None:
    """Indices must lie in ``[0, E]`` (``E`` = dropped slot): a typed error on CPU, a device-side assert elsewhere
    (raising there would need a device-to-host sync)."""
    if top_k_index.numel() == 0:
        return
    if top_k_index.device.type == "cpu":
        lo, hi = torch.aminmax(top_k_index)
        if int(lo) < 0 or int(hi) > num_experts:
            raise RoutingError(
                f"top_k_index holds {int(lo)}..{int(hi)}; expert indices must lie in [0, {num_experts}] "
                f"({num_experts} marks a dropped slot)."
            )
    else:
        ok = ((top_k_index >= 0) & (top_k_index <= num_experts)).all()
        torch._assert_async(ok, f"optimum_mc::moe: top_k_index outside [0, {num_experts}]")


def check_experts(gate_up: Sequence[Packed], down: Sequence[Packed], bits: Sequence[int]) -> tuple[int, int]:
    """Validate every expert's packed matrices once (at construction / load); return ``(hidden, intermediate)``.
    ``bits``: ``E`` widths, or ``2E`` (gate/up then down)."""
    if len(gate_up) != len(down) or not gate_up or len(bits) not in (len(gate_up), 2 * len(gate_up)):
        raise ShapeError(f"got {len(gate_up)} gate_up, {len(down)} down matrices and {len(bits)} bit-widths.")
    gu_bits, dn_bits = from_op_bits(bits, len(gate_up))
    shapes = set()
    for e, (bg, bd) in enumerate(zip(gu_bits, dn_bits)):
        h = check_packed(*gate_up[e], bg)
        i = check_packed(*down[e], bd)
        two_i, h_out = gate_up[e][0].shape[0], down[e][0].shape[0]
        if two_i != 2 * i or h_out != h:
            raise ShapeError(f"expert {e}: gate_up is {two_i}x{h} and down {h_out}x{i}; need (2I, H) and (H, I).")
        shapes.add((h, i, gate_up[e][1].shape[1], down[e][1].shape[1]))
        if gate_up[e][0].device != gate_up[0][0].device or down[e][0].device != gate_up[0][0].device:
            raise DeviceMismatchError(f"expert {e}'s packed weights are not on {gate_up[0][0].device}.")
    if len(shapes) != 1:
        raise ShapeError(f"experts differ in shape or group count: {sorted(shapes)}.")
    h, i, _, _ = shapes.pop()
    return h, i


def check_biases(gate_up_bias: torch.Tensor | None, down_bias: torch.Tensor | None, experts: int, hidden: int,
                 inter: int, device: torch.device) -> None:  # fmt: skip
    """The optional expert biases: float ``(E, 2I)`` and ``(E, H)`` on the experts' device."""
    for name, b, shape in (("gate_up_bias", gate_up_bias, (experts, 2 * inter)), ("down_bias", down_bias,
                                                                                  (experts, hidden))):  # fmt: skip
        if b is None:
            continue
        if tuple(b.shape) != shape:
            raise ShapeError(f"{name} must be {shape}, got {tuple(b.shape)}.")
        if not b.dtype.is_floating_point:
            raise DTypeError(f"{name} must be floating point, got {b.dtype}.")
        if b.device != device:
            raise DeviceMismatchError(f"{name} is on {b.device}, the packed experts on {device}.")


def check_routing(x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, hidden: int,
                  device: torch.device, activation: str) -> None:  # fmt: skip
    """Cheap per-call checks of the op's non-weight inputs (shapes, dtypes, devices; never values)."""
    if x.dim() != 2 or x.shape[1] != hidden:
        raise ShapeError(f"hidden states must be (tokens, {hidden}), got {tuple(x.shape)}.")
    if not x.dtype.is_floating_point:
        raise DTypeError(f"hidden states must be floating point, got {x.dtype}.")
    if top_k_index.dim() != 2 or top_k_index.shape[0] != x.shape[0]:
        raise RoutingError(f"top_k_index must be (tokens={x.shape[0]}, k), got {tuple(top_k_index.shape)}.")
    if top_k_index.dtype.is_floating_point or top_k_index.dtype.is_complex or top_k_index.dtype == torch.bool:
        raise DTypeError(f"top_k_index must be an integer tensor, got {top_k_index.dtype}.")
    if top_k_weights.shape != top_k_index.shape:
        raise RoutingError(f"top_k_weights {tuple(top_k_weights.shape)} must match top_k_index "
                           f"{tuple(top_k_index.shape)}.")  # fmt: skip
    if not top_k_weights.dtype.is_floating_point:
        raise DTypeError(f"top_k_weights must be floating point, got {top_k_weights.dtype}.")
    if not (x.device == top_k_index.device == top_k_weights.device == device):
        raise DeviceMismatchError(
            f"hidden states ({x.device}), top_k_index ({top_k_index.device}), top_k_weights "
            f"({top_k_weights.device}) and the packed experts ({device}) must share a device."
        )
    if activation not in GATED:
        raise UnsupportedArchitectureError(f"activation {activation!r} is not one of {sorted(GATED)}.")


def moe(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up: Sequence[Packed],
    down: Sequence[Packed],
    bits: Sequence[int],
    activation: str = "silu",
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    odp_threshold: float = 0.0,
    odp_counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Validated entry point of ``optimum_mc::moe``: ``gate_up[e]`` / ``down[e]`` are expert ``e``'s packed
    ``(qweight, scales, zeros)``, optional ``gate_up_bias (E, 2I)`` / ``down_bias (E, H)`` their biases; ODP's
    ``odp_threshold`` / ``odp_counts`` as :func:`moe_op`. Checks the packed experts too (modules check them once, at
    build / load)."""
    hidden, inter = check_experts(gate_up, down, bits)
    check_routing(x, top_k_index, top_k_weights, hidden, gate_up[0][0].device, activation)
    check_biases(gate_up_bias, down_bias, len(gate_up), hidden, inter, gate_up[0][0].device)
    lists = [[m[j] for m in gate_up] for j in range(3)] + [[m[j] for m in down] for j in range(3)]
    if odp_counts is not None:
        check_odp_counts(odp_counts, len(gate_up), top_k_index.device)
    return moe_op(x, top_k_index, top_k_weights, *lists, list(bits), activation, "float", gate_up_bias, down_bias,
                  float(odp_threshold), odp_counts)  # fmt: skip


def check_odp_counts(counts: torch.Tensor, experts: int, device: torch.device) -> None:
    """ODP's counters: int64 ``(E + 3,)`` on the routing's device."""
    if counts.dtype != torch.int64 or tuple(counts.shape) != (experts + 3,):
        raise ShapeError(f"odp_counts must be int64 ({experts + 3},), got {counts.dtype} {tuple(counts.shape)}.")
    if counts.device != device:
        raise DeviceMismatchError(f"odp_counts is on {counts.device}, the routing on {device}.")


def moe_op(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_qweight: list[torch.Tensor],
    gate_up_scales: list[torch.Tensor],
    gate_up_zeros: list[torch.Tensor],
    down_qweight: list[torch.Tensor],
    down_scales: list[torch.Tensor],
    down_zeros: list[torch.Tensor],
    bits: list[int],
    activation: str,
    decode_activations: str = "float",
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    odp_threshold: float = 0.0,
    odp_counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """``optimum_mc::moe`` on already-validated experts (what :class:`~optimum_mc.nn.MCExperts` and the vLLM method
    call). ``decode_activations`` ("float", "int8", "auto"): what the CPU decode kernel feeds its GEMVs
    (``kernels.cpu.int8_decode``); prefill and other devices ignore it. ``odp_threshold`` > 0 applies online dynamic
    pruning's rule (:mod:`.odp_rule`, kept weights renormalized) inside the op; ``odp_counts`` (int64 ``E + 3`` on
    the routing's device) accumulates the routing's statistics after the rule.

    Straight to the op, unless ``x`` or ``top_k_weights`` needs a gradient: then the rule runs here in torch ops and
    the op runs inside :class:`~.autograd.MoEFunction` (the op carries no autograd kernel of its own)."""
    if torch.is_grad_enabled() and (x.requires_grad or top_k_weights.requires_grad):
        from .autograd import MoEFunction
        from .odp_rule import apply_odp

        top_k_index, top_k_weights = apply_odp(top_k_index, top_k_weights, odp_threshold, odp_counts,
                                               len(gate_up_qweight))  # fmt: skip
        return MoEFunction.apply(x, top_k_index, top_k_weights, gate_up_qweight, gate_up_scales, gate_up_zeros,
                                 down_qweight, down_scales, down_zeros, bits, activation, decode_activations,
                                 gate_up_bias, down_bias)  # fmt: skip
    if odp_counts is None and torch.compiler.is_compiling():
        odp_counts = top_k_index.new_empty(0, dtype=torch.int64)  # (inductor cannot lower a None mutable argument)
    return torch.ops.optimum_mc.moe.default(x, top_k_index, top_k_weights, gate_up_qweight, gate_up_scales,
                                            gate_up_zeros, down_qweight, down_scales, down_zeros, bits, activation,
                                            decode_activations, gate_up_bias, down_bias, odp_threshold,
                                            odp_counts)  # fmt: skip
