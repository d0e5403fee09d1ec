"""The vLLM MoE method's forward on packed experts, without vLLM (imports none of it).

:class:`~.moe_method.MCFusedMoEMethod` ``.apply`` reads what only vLLM knows (the layer's expert map, the router's
renormalization, ODP's protected positions from the forward context) and calls :func:`apply_packed_moe`, which does
the rest: expert parallelism's global-to-local ids, ODP's rule and counts, and ``optimum_mc::moe`` (the C kernels on
CPU, with the whole-layer decode kernel for a few tokens; the Triton kernels on CUDA). ODP goes into the op
(``odp_threshold`` / ``odp_counts``, the contract transformers' ``MCExperts`` uses) wherever the op's rule is the
whole rule: all experts local, no protected tokens, a renormalizing router; otherwise the rule runs here in torch
ops and the op gets the pruned routing. Kept apart so that the same
code is checked on a GPU machine, where vLLM cannot be installed (``tests/integrations/test_vllm_apply.py`` on CPU
and CUDA, ``scripts/gpu_check.sh``).
"""

from __future__ import annotations

import torch

from ...kernels import moe_op, qmatmul_op
from ...pruning.rule import apply_drop, count_routing, drop_mask


def local_ids(ids: torch.Tensor, expert_map: torch.Tensor | None, total: int, num_local: int) -> torch.Tensor:
    """Global expert ids (``total``: dropped) to this rank's local ids (``num_local``: not computed on this rank).
    ``expert_map`` (vLLM's, ``(total,)``): local id of each global expert, -1 for another rank's; None: all local."""
    if expert_map is None:  # all experts local, in global order
        return ids
    local = expert_map[ids.long().clamp_max(total - 1)]
    return torch.where((local < 0) | (ids >= total), torch.full_like(local, num_local), local)


def apply_packed_moe(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    lists: list[list[torch.Tensor]],
    op_bits: list[int],
    total: int,
    *,
    mode: str = "auto",
    expert_map: torch.Tensor | None = None,
    odp_threshold: float | None = None,
    protect: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
    renormalize: bool = True,
) -> torch.Tensor:
    """``sum_k w[t, k] * expert_{ids[t, k]}(x_t)`` over this rank's packed experts.

    ``lists``: the six packed lists of this rank's experts in local order (gate/up qweight, scales, zeros, then
    down's), ``op_bits`` their widths (``optimum_mc::moe``'s), ``total`` the experts of the whole model, ``mode``
    the decode activations ("auto" / "float" / "int8").
    ODP: ``odp_threshold`` None is off; 0.0 on but not active in this layer (counted only); > 0 drops the slots its
    rule drops, except for ``protect``-ed tokens (bool ``(T,)``), with the kept weights rescaled to their sum when
    the router ``renormalize``-s; ``counts`` (int64 ``E + 3`` on the routing's device) accumulates its statistics.
    """
    num_local = len(lists[0])
    ids, w = topk_ids, topk_weights
    if odp_threshold is None:  # ODP off
        return moe_op(x, local_ids(ids, expert_map, total, num_local), w, *lists, op_bits, "silu", mode)
    if counts is None:
        counts = torch.zeros(total + 3, dtype=torch.int64, device=ids.device)
    if expert_map is None and protect is None and renormalize:  # the op's rule is the whole rule: ODP in the op
        return moe_op(x, ids, w, *lists, op_bits, "silu", mode, None, None, float(odp_threshold), counts)
    if odp_threshold > 0:
        drop = drop_mask(w, odp_threshold)
        if protect is not None:
            drop &= ~protect.to(drop.device).unsqueeze(-1)
        ids, w = apply_drop(ids, w, drop, total, renormalize)
    count_routing(counts, ids, None, total)
    return moe_op(x, local_ids(ids, expert_map, total, num_local), w, *lists, op_bits, "silu", mode)


def apply_ungated_moe(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    lists: list[list[torch.Tensor]],
    bits: list[tuple[int, int]],
    total: int,
    *,
    mode: str = "auto",
    expert_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """``sum_k w[t, k] * down_e(relu(up_e(x_t))^2)`` over this rank's non-gated packed experts (Nemotron-H's), one
    expert at a time (``optimum_mc::moe`` is gated only), as transformers' MC experts run them: ``lists`` as in
    :func:`apply_packed_moe` with ``I``-row up projections, ``bits`` each local expert's ``(up, down)`` widths."""
    num_local = len(lists[0])
    ids = local_ids(topk_ids, expert_map, total, num_local)
    out = torch.zeros(x.shape[0], lists[3][0].shape[0] if num_local else x.shape[-1], dtype=torch.float32,
                      device=x.device)  # fmt: skip
    for e in range(num_local):
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        h = qmatmul_op(x[tok], lists[0][e], lists[1][e], lists[2][e], bits[e][0], mode)
        y = qmatmul_op(torch.square(torch.relu(h)), lists[3][e], lists[4][e], lists[5][e], bits[e][1], mode)
        out.index_add_(0, tok, y.float() * topk_weights[tok, slot].float().unsqueeze(-1))
    return out.to(x.dtype)
