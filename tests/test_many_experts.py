"""Realistic expert counts: 128 experts top-8 (Qwen3-MoE-like) and 256 experts top-8 (DeepSeek-V3-like, sigmoid,
group-limited), with small hidden sizes so the whole run takes seconds.

Quantize with MC at 2.5 bits: every MoE layer's allocation meets its bit budget (the mean width is the target
within one bit step over the layer, never above), and the packed experts' fused forward matches a pure-torch
reference built from the dequantized weights (fp32: accumulation order only, rtol 1e-5) for decode and prefill
token counts, with the model's own top-8 routing.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers.threads import one_thread  # noqa: F401 - autouse: one torch thread in this module
from transformers import AutoModelForCausalLM

import optimum_mc
from optimum_mc.architectures import moe_blocks
from optimum_mc.bitwidths import split
from optimum_mc.nn import MCExperts
from optimum_mc.tools.families import CORPUS, tiny_model, tiny_tokenizer

BITS = 2.5
CASES = {
    "qwen3_moe-128x8": ("qwen3_moe", dict(num_experts=128, num_experts_per_tok=8, norm_topk_prob=True)),
    "deepseek_v3-256x8": ("deepseek_v3", dict(n_routed_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4)),
}


def _reference(experts: MCExperts, x, idx, w) -> torch.Tensor:
    """``sum_k w * down(silu(gate) * up)`` with the dequantized weights, token by token, slot by slot (fp32)."""
    gu, dn = (t.float() for t in experts.dequantize())
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(idx.shape[1]):
            e = int(idx[t, k])
            gate, up = (gu[e] @ x[t]).chunk(2)
            out[t] += w[t, k] * (dn[e] @ (F.silu(gate) * up))
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_allocation_and_fused_forward_at_realistic_expert_counts(case, tmp_path):
    family, overrides = CASES[case]
    model = tiny_model(family, **overrides)
    model.save_pretrained(tmp_path / "f")
    tiny_tokenizer().save_pretrained(tmp_path / "f")
    qc = optimum_mc.MCConfig(bits=BITS, group_size=32, num_samples=8, seq_len=32, dataset=CORPUS, show_progress=False)
    q = AutoModelForCausalLM.from_pretrained(tmp_path / "f", quantization_config=qc)
    cfg = q.config.quantization_config
    blocks = list(moe_blocks(q))
    e = blocks[0].num_experts
    assert e == next(v for k, v in overrides.items() if "experts" in k and k != "num_experts_per_tok")
    assert all(b.top_k == 8 for b in blocks)
    step = min(cfg.candidate_bits[i + 1] - cfg.candidate_bits[i] for i in range(len(cfg.candidate_bits) - 1))
    for bits in cfg.expert_bits:
        total = sum(sum(split(b)) / len(split(b)) for b in bits)
        assert len(bits) == e
        assert BITS * e - step <= total <= BITS * e + 1e-9, f"{case}: {total / e:.3f} bits per expert"
    g = torch.Generator().manual_seed(0)
    for blk in blocks:
        experts = blk.experts
        assert isinstance(experts, MCExperts) and experts.activation == "silu"
        for tokens in (1, 5, 70):
            h = torch.randn(tokens, experts.hidden_dim, generator=g)
            with torch.no_grad():
                _, w, idx = blk.router(h)
                got = experts(h, idx, w)
            assert idx.shape == (tokens, 8) and len(set(idx[0].tolist())) == 8
            ref = _reference(experts, h, idx, w.float())
            scale = ref.abs().max().item()
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * scale)
