"""MoE layers for the kernel and pruning tests: random packed experts at given widths, random routing, the
tolerances of the fused op against its reference, and tiny models with every MoE block packed."""

from __future__ import annotations

import torch

from optimum_mc.architectures import moe_blocks
from optimum_mc.group_quant import rtn_quantize
from optimum_mc.nn import MCExperts
from optimum_mc.packing import pack

BITS = [1, 2, 3, 4, 8, 2, 3, 2]  # every bit-width in one layer


def random_experts(bits, hidden=128, inter=96, group=32, seed=0, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    gate_up, down = [], []
    for b in bits:
        q, s, z = rtn_quantize(torch.randn(2 * inter, hidden, generator=g) * scale, b, group)
        gate_up.append((pack(q, b), s, z))
        q, s, z = rtn_quantize(torch.randn(hidden, inter, generator=g) * scale, b, group)
        down.append((pack(q, b), s, z))
    return gate_up, down


def random_routing(tokens, num_experts, k=2, seed=1, skew=False):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(num_experts, generator=g)[:k] for _ in range(tokens)])
    if skew:  # one expert gets many rows (BLAS path), the others few (GEMV path), in one call
        idx[:, 0] = 0
    weights = torch.rand(tokens, k, generator=g)
    return idx, weights / weights.sum(-1, keepdim=True)


def tolerance(ref: torch.Tensor, dtype: torch.dtype, prefill: bool) -> dict:
    # fp32: accumulation order only. bf16: the result's rounding (2^-8 relative), and on the BLAS path bf16
    # inputs / intermediates (x and act(gate) * up rounded to bf16, as a bf16 float model does)
    scale = ref.float().abs().max().item()
    if dtype == torch.float32:
        return dict(rtol=1e-5, atol=1e-5 * scale)
    return dict(rtol=2**-7, atol=(3e-2 if prefill else 2**-8) * scale)


def quantized_blocks(model, group=32):
    for blk in moe_blocks(model):
        e = blk.experts.num_experts
        bits = [(1, 2, 3, 4)[i % 4] for i in range(e)]
        new = MCExperts.from_float(blk.experts, bits, group)
        blk.block.experts = new
    return model
