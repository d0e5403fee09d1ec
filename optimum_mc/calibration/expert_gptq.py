"""GPTQ of many experts of one layer at once: their matrices share shapes, so one batched column loop serves all.

Results are identical (``torch.equal``) to quantizing each expert alone (:func:`factors.quantize_expert`), since
``gptq.gptq_quantize_batched`` keeps every rounding-sensitive operation per matrix; only the per-column Python
and kernel-launch overhead is shared. Experts are processed in chunks that keep the stacked weights and Hessians
within a workspace budget.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..bitwidths import ExpertBits, split
from ..gptq import calibration_free_quantize, gptq_quantize_batched
from .factors import ExpertQuant, GPTQOptions
from .hessians import input_hessian, mid_hessian

# Stacked fp32 weights + Hessians of one chunk (the column loop needs about 3x this): small on the host, where the
# quantization's peak RSS is budgeted (docs/scale.md), larger on accelerators.
WORKSPACE_BYTES = {"cpu": 128 << 20}
DEFAULT_WORKSPACE_BYTES = 2 << 30


def stacked_bytes(hidden: int, inter: int) -> int:
    """fp32 bytes one expert adds to a chunk's stacked weights + Hessians (the larger of the two projections)."""
    return 4 * max(2 * inter * hidden + hidden * hidden, hidden * inter + inter * inter)


def chunk_size(hidden: int, inter: int, device_type: str) -> int:
    """Experts per batched GPTQ loop on a device type."""
    return max(1, WORKSPACE_BYTES.get(device_type, DEFAULT_WORKSPACE_BYTES) // stacked_bytes(hidden, inter))


def quantize_experts(
    weights: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    tokens: Callable[[int], tuple[torch.Tensor, torch.Tensor | None]],
    act_fn: Callable,
    bits: dict[int, ExpertBits],
    opts: GPTQOptions,
    emit: Callable[[int, ExpertQuant], None] | None = None,
    count: Callable[[int], int] | None = None,
    expert_act: Callable[[int], Callable] | None = None,
) -> dict[int, ExpertQuant]:
    """Quantize the experts in ``bits`` (expert -> width, or ``[gate_up, down]`` widths) with GPTQ, batched;
    ``weights(e)`` gives fp32 ``(gate_up, down)`` and ``tokens(e)`` the expert's calibration inputs and optional token
    weights. Experts with fewer than ``opts.min_tokens`` tokens use calibration-free quantization, as
    :func:`quantize_expert` does. Per chunk, the gate/up matrices are stacked and quantized first, then the down
    matrices: only one projection's stacked weights and Hessians are alive at a time (the down Hessians, ``I x I``,
    dominate). With ``emit``, each result is handed to ``emit(e, quant)`` as soon as it exists and not kept (the
    returned dict is empty). Token inputs may come in the model dtype: Hessians convert them to fp32 chunk by chunk.
    ``count(e)``, when given, is the number of rows ``tokens(e)`` would return (saves gathering them just to count).
    ``expert_act(e)``, when given, is expert ``e``'s gate (``act_fn`` with the expert's gate/up bias folded in)."""
    out: dict[int, ExpertQuant] = {}

    def done(e: int, q: ExpertQuant) -> None:
        if emit is None:
            out[e] = q
        else:
            emit(e, q)

    gptq: list[int] = []
    for e, b in bits.items():
        rows = count(e) if count is not None else tokens(e)[0].shape[0]
        if rows < max(opts.min_tokens, 1):
            w_gu, w_dn = weights(e)
            b_gu, b_dn = split(b)
            done(
                e,
                ExpertQuant(
                    b,
                    calibration_free_quantize(w_gu, b_gu, opts.group_size, zero_point=opts.zero_point),
                    calibration_free_quantize(w_dn, b_dn, opts.group_size, zero_point=opts.zero_point),
                    "calibration-free",
                ),
            )
        else:
            gptq.append(e)
    if not gptq:
        return out
    w0, d0 = weights(gptq[0])
    (rows, hidden), inter, dev = w0.shape, d0.shape[1], w0.device  # rows: 2I, or I of non-gated experts
    del w0, d0  # only their shapes and device were needed
    step = chunk_size(hidden, inter, dev.type)
    kw = opts.gptq_kwargs()
    for start in range(0, len(gptq), step):
        chunk = gptq[start : start + step]
        widths = [split(bits[e]) for e in chunk]  # (gate_up, down) per expert
        w = torch.empty(len(chunk), rows, hidden, device=dev)
        h = torch.empty(len(chunk), hidden, hidden, device=dev)
        for k, e in enumerate(chunk):
            w[k] = weights(e)[0]
            input_hessian(*tokens(e), out=h[k])
        gu_q = gptq_quantize_batched(w, h, [g for g, _ in widths], opts.group_size, consume=True, **kw)
        del w, h
        w = torch.empty(len(chunk), hidden, inter, device=dev)
        h = torch.empty(len(chunk), inter, inter, device=dev)
        for k, e in enumerate(chunk):
            gu, dn = weights(e)
            x, tw = tokens(e)
            w[k] = dn
            del dn
            mid_hessian(gu, x, expert_act(e) if expert_act else act_fn, tw, out=h[k])
            del gu, x, tw
        dn_q = gptq_quantize_batched(w, h, [d for _, d in widths], opts.group_size, consume=True, **kw)
        del w, h
        for k, e in enumerate(chunk):
            done(e, ExpertQuant(bits[e], gu_q[k], dn_q[k], "gptq"))
        del gu_q, dn_q
    return out
