"""GPTQ of many experts of one layer at once: their matrices share shapes, so one batched column loop serves all.

Results are identical (``torch.equal``) to quantizing each expert alone (:func:`factors.quantize_expert`), since
``gptq.gptq_quantize_batched`` keeps every rounding-sensitive operation per matrix; only the per-column Python
and kernel-launch overhead is shared. Experts are processed in chunks that keep the stacked weights and Hessians
within a workspace budget.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..gptq import HessianAccumulator, calibration_free_quantize, gptq_quantize_batched
from .factors import ExpertQuant, GPTQOptions

# Stacked fp32 weights + Hessians of one chunk (the column loop needs about 3x this): small on the host, where the
# quantization's peak RSS is budgeted (docs/scale.md), larger on accelerators.
WORKSPACE_BYTES = {"cpu": 256 << 20}
DEFAULT_WORKSPACE_BYTES = 2 << 30


def expert_hessians(
    w_gate_up: torch.Tensor, x: torch.Tensor, act_fn: Callable, token_weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input Hessians of an expert's gate/up and down projections from its tokens ``x`` (optionally weighted)."""
    root = None if token_weights is None else token_weights.float().clamp_min(0).sqrt().unsqueeze(-1)
    h_in = HessianAccumulator(w_gate_up.shape[1], device=x.device)
    h_in.add(x if root is None else x * root)
    gate, up = (x @ w_gate_up.t()).chunk(2, dim=-1)
    mid = act_fn(gate) * up
    h_mid = HessianAccumulator(w_gate_up.shape[0] // 2, device=x.device)
    h_mid.add(mid if root is None else mid * root)
    return h_in.hessian, h_mid.hessian


def _chunk_size(hidden: int, inter: int, device: torch.device) -> int:
    per_expert = 4 * (3 * hidden * inter + hidden * hidden + inter * inter)
    return max(1, WORKSPACE_BYTES.get(device.type, DEFAULT_WORKSPACE_BYTES) // per_expert)


def quantize_experts(
    weights: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    tokens: Callable[[int], tuple[torch.Tensor, torch.Tensor | None]],
    act_fn: Callable,
    bits: dict[int, int],
    opts: GPTQOptions,
) -> dict[int, ExpertQuant]:
    """Quantize the experts in ``bits`` (expert -> width) with GPTQ, batched; ``weights(e)`` gives fp32
    ``(gate_up, down)`` and ``tokens(e)`` the expert's calibration inputs and optional token weights. Experts with
    fewer than ``opts.min_tokens`` tokens use calibration-free quantization, as :func:`quantize_expert` does."""
    out: dict[int, ExpertQuant] = {}
    gptq: list[int] = []
    for e, b in bits.items():
        x, _ = tokens(e)
        if x.shape[0] < max(opts.min_tokens, 1):
            w_gu, w_dn = weights(e)
            out[e] = ExpertQuant(
                b,
                calibration_free_quantize(w_gu, b, opts.group_size, zero_point=opts.zero_point),
                calibration_free_quantize(w_dn, b, opts.group_size, zero_point=opts.zero_point),
                "calibration-free",
            )
        else:
            gptq.append(e)
    if not gptq:
        return out
    w0 = weights(gptq[0])[0]
    step = _chunk_size(w0.shape[1], w0.shape[0] // 2, w0.device)
    kw = dict(
        damp_percent=opts.damp_percent,
        block_size=opts.block_size,
        act_order=opts.act_order,
        zero_point=opts.zero_point,
    )
    for start in range(0, len(gptq), step):
        chunk = gptq[start : start + step]
        w_gu, w_dn, h_in, h_mid = [], [], [], []
        for e in chunk:
            gu, dn = weights(e)
            x, tw = tokens(e)
            hi, hm = expert_hessians(gu, x, act_fn, tw)
            w_gu.append(gu)
            w_dn.append(dn)
            h_in.append(hi)
            h_mid.append(hm)
        widths = [bits[e] for e in chunk]
        gu_q = gptq_quantize_batched(torch.stack(w_gu), torch.stack(h_in), widths, opts.group_size, **kw)
        del w_gu, h_in
        dn_q = gptq_quantize_batched(torch.stack(w_dn), torch.stack(h_mid), widths, opts.group_size, **kw)
        for k, e in enumerate(chunk):
            out[e] = ExpertQuant(bits[e], gu_q[k], dn_q[k], "gptq")
    return out
