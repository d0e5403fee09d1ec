"""The vLLM MoE method's forward (``integrations/vllm/moe_apply.py``, no vLLM needed) on CPU and, where there is one,
on a CUDA GPU (the Triton kernels): against the pure-torch reference, with expert parallelism's local ids and ODP."""

from __future__ import annotations

import pytest
import torch
from helpers.moe import random_experts, random_routing

from optimum_mc.integrations.vllm.moe_apply import apply_packed_moe, local_ids
from optimum_mc.kernels.reference import moe_reference
from optimum_mc.pruning.rule import apply_drop, count_routing, drop_mask

BITS = [2, 3, 4, 2, 3, 2]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def _lists(gate_up, down, device):
    return [[m[j].to(device) for m in gate_up] for j in range(3)] + [[m[j].to(device) for m in down] for j in range(3)]


def tolerance(ref):
    return dict(rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tokens", [1, 9, 40])
def test_apply_matches_the_reference_with_and_without_odp(device, tokens):
    gate_up, down = random_experts(BITS)
    idx, w = random_routing(tokens, len(BITS), seed=tokens)
    x = torch.randn(tokens, 128, generator=torch.Generator().manual_seed(tokens))
    lists = _lists(gate_up, down, device)
    kw = dict(mode="float")
    got = apply_packed_moe(x.to(device), w.to(device), idx.to(device), lists, BITS, len(BITS), **kw)
    ref = moe_reference(x, idx, w, gate_up, down, BITS, "silu")
    torch.testing.assert_close(got.cpu(), ref, **tolerance(ref))
    # ODP: the rule drops second slots whose weight is below 0.6 x the first; the first token is protected
    protect = torch.zeros(tokens, dtype=torch.bool)
    protect[0] = True
    counts = torch.zeros(len(BITS) + 3, dtype=torch.int64, device=device)
    got = apply_packed_moe(x.to(device), w.to(device), idx.to(device), lists, BITS, len(BITS), odp_threshold=0.6,
                           protect=protect.to(device), counts=counts, **kw)  # fmt: skip
    drop = drop_mask(w, 0.6) & ~protect.unsqueeze(-1)
    ids_ref, w_ref = apply_drop(idx, w, drop, len(BITS), True)
    ref = moe_reference(x, ids_ref, w_ref, gate_up, down, BITS, "silu")
    torch.testing.assert_close(got.cpu(), ref, **tolerance(ref))
    c = counts.cpu()
    assert int(c[len(BITS)]) == int(drop.sum()) and int(c[: len(BITS)].sum()) == idx.numel() - int(drop.sum())
    assert int(c[len(BITS) + 2]) == tokens
    # no protected token: the rule and the counts run inside optimum_mc::moe (the C decode kernel on CPU)
    counts.zero_()
    got = apply_packed_moe(x.to(device), w.to(device), idx.to(device), lists, BITS, len(BITS), odp_threshold=0.6,
                           counts=counts, **kw)  # fmt: skip
    ids_ref, w_ref = apply_drop(idx, w, drop_mask(w, 0.6), len(BITS), True)
    ref = moe_reference(x, ids_ref, w_ref, gate_up, down, BITS, "silu")
    torch.testing.assert_close(got.cpu(), ref, **tolerance(ref))
    want = torch.zeros(len(BITS) + 3, dtype=torch.int64)
    count_routing(want, ids_ref, None, len(BITS))
    assert torch.equal(counts.cpu(), want)


@pytest.mark.parametrize("device", DEVICES)
def test_expert_parallel_ranks_sum_to_the_whole_layer(device):
    """Two ranks holding alternate experts (vLLM's expert map: local id, -1 elsewhere) add up to the layer."""
    gate_up, down = random_experts(BITS)
    tokens, total = 24, len(BITS)
    idx, w = random_routing(tokens, total, seed=5)
    idx[0, 1] = total  # a slot dropped by ODP upstream
    x = torch.randn(tokens, 128, generator=torch.Generator().manual_seed(3))
    out = torch.zeros(tokens, 128)
    for rank in range(2):
        mine = [e for e in range(total) if e % 2 == rank]
        emap = torch.full((total,), -1, dtype=torch.int32)
        emap[mine] = torch.arange(len(mine), dtype=torch.int32)
        bits = [BITS[e] for e in mine]
        lists = _lists([gate_up[e] for e in mine], [down[e] for e in mine], device)
        local = local_ids(idx, emap, total, len(mine))
        assert int(local.max()) <= len(mine) and bool(((local == len(mine)) == (emap[idx.clamp_max(total - 1)] < 0)
                                                        | (idx == total)).all())  # fmt: skip
        out += apply_packed_moe(x.to(device), w.to(device), idx.to(device), lists, bits, total, mode="float",
                                expert_map=emap.to(device)).cpu()  # fmt: skip
    ref = moe_reference(x, idx, w, gate_up, down, BITS, "silu")
    torch.testing.assert_close(out, ref, **tolerance(ref))
