"""Per-expert factors of PMQ: activation frequency, routing-weight mass, and quantization loss per bit-width.

- frequency phi(e): share of calibration tokens routed to expert e (counting every top-k slot).
- weight mass w(e): router probability (softmax/sigmoid before top-k renormalization) summed over the tokens that
  select e, per calibration token.
- loss eps(e, b): squared error of the MoE block output when only expert e is quantized to b bits, relative to the
  block output energy. Only tokens routed to e change, by ``r * (f_q(x) - f(x))``, so
  ``eps(e, b) = sum_{t -> e} ||r_t (f_q(x_t) - f(x_t))||^2 / sum_t ||y_t||^2``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..gptq import HessianAccumulator, calibration_free_quantize, gptq_quantize_multi
from ..group_quant import dequantize_matrix

QuantTriple = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # codes uint8, scales fp16, zeros fp16


@dataclass(frozen=True)
class GPTQOptions:
    """GPTQ settings shared by every matrix of a run."""

    group_size: int
    damp_percent: float = 0.01
    block_size: int = 128
    act_order: bool = True
    min_tokens: int = 16


@dataclass
class ExpertQuant:
    """One expert quantized at one bit-width: fused gate/up ``(2I, H)`` and down ``(H, I)`` matrices."""

    bits: int
    gate_up: QuantTriple
    down: QuantTriple
    method: str  # "gptq" or "calibration-free"

    def dequantized(self, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return dequantize_matrix(*self.gate_up, group_size), dequantize_matrix(*self.down, group_size)


def expert_forward(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, act_fn: Callable) -> torch.Tensor:
    """The expert MLP of transformers' fused layout: ``down(act(gate(x)) * up(x))`` in fp32."""
    gate, up = (x @ w_gate_up.t()).chunk(2, dim=-1)
    return (act_fn(gate) * up) @ w_down.t()


def quantize_expert(
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    x: torch.Tensor,
    act_fn: Callable,
    bits: list[int],
    opts: GPTQOptions,
) -> dict[int, ExpertQuant]:
    """Quantize one expert at each of ``bits`` from its routed tokens ``x`` (fp32 ``(n, H)``).

    GPTQ runs once per matrix for all bit-widths (shared Hessians and column loop). Experts that received fewer
    than ``opts.min_tokens`` tokens use calibration-free quantization (``gptq.calibration_free_quantize``).
    """
    w_gate_up, w_down = w_gate_up.float(), w_down.float()
    if not bits:
        return {}
    if x.shape[0] < max(opts.min_tokens, 1):
        return {
            b: ExpertQuant(
                b,
                calibration_free_quantize(w_gate_up, b, opts.group_size),
                calibration_free_quantize(w_down, b, opts.group_size),
                "calibration-free",
            )
            for b in bits
        }
    h_in = HessianAccumulator(w_gate_up.shape[1], device=x.device)
    h_in.add(x)
    gate, up = (x @ w_gate_up.t()).chunk(2, dim=-1)
    h_mid = HessianAccumulator(w_down.shape[1], device=x.device)
    h_mid.add(act_fn(gate) * up)
    kw = dict(damp_percent=opts.damp_percent, block_size=opts.block_size, act_order=opts.act_order)
    gu = gptq_quantize_multi(w_gate_up, h_in.hessian, bits, opts.group_size, **kw)
    dn = gptq_quantize_multi(w_down, h_mid.hessian, bits, opts.group_size, **kw)
    return {b: ExpertQuant(b, gu[k], dn[k], "gptq") for k, b in enumerate(bits)}


def expert_loss(
    x: torch.Tensor,
    r: torch.Tensor,
    reference: torch.Tensor,
    quant: ExpertQuant,
    act_fn: Callable,
    group_size: int,
    output_energy: float,
) -> float:
    """eps(e, b): weighted squared change of the block output over routed tokens, relative to ``output_energy``.

    ``reference`` is the float expert's output on ``x`` (:func:`expert_forward`).
    """
    if x.shape[0] == 0:
        return 0.0
    q_gu, q_dn = quant.dequantized(group_size)
    out = expert_forward(x, q_gu, q_dn, act_fn)
    err = ((out - reference) * r.unsqueeze(-1)).pow(2).sum().item()
    return err / max(output_energy, 1e-30)
