"""Batched expert GPTQ equals quantizing each expert alone (bit for bit), including the calibration-free fallback."""

from __future__ import annotations

import pytest
import torch

from optimum_mc.calibration import expert_gptq
from optimum_mc.calibration.expert_gptq import quantize_experts
from optimum_mc.calibration.factors import GPTQOptions, quantize_expert


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("chunk_bytes", [1 << 30, 1])  # all experts in one loop / one expert per loop
def test_batched_equals_one_by_one(monkeypatch, weighted, chunk_bytes):
    monkeypatch.setattr(expert_gptq, "WORKSPACE_BYTES", {"cpu": chunk_bytes})
    g = torch.Generator().manual_seed(0)
    hidden, inter, n_exp = 64, 96, 5
    w_gu = [torch.randn(2 * inter, hidden, generator=g) * 0.1 for _ in range(n_exp)]
    w_dn = [torch.randn(hidden, inter, generator=g) * 0.1 for _ in range(n_exp)]
    counts = [40, 3, 64, 17, 25]  # expert 1 is below min_tokens: calibration-free
    xs = [torch.randn(n, hidden, generator=g) for n in counts]
    tws = [torch.rand(n, generator=g) if weighted else None for n in counts]
    bits = {0: 2, 1: 3, 2: 1, 3: 3, 4: 2}
    opts = GPTQOptions(group_size=32, act_order=True, min_tokens=8)
    act = torch.nn.functional.silu
    got = quantize_experts(lambda e: (w_gu[e], w_dn[e]), lambda e: (xs[e], tws[e]), act, bits, opts)
    assert sorted(got) == sorted(bits)
    for e, b in bits.items():
        ref = quantize_expert(w_gu[e], w_dn[e], xs[e], act, [b], opts, token_weights=tws[e])[b]
        assert got[e].method == ref.method == ("calibration-free" if counts[e] < 8 else "gptq")
        for a, r in zip(got[e].gate_up + got[e].down, ref.gate_up + ref.down):
            assert torch.equal(a, r)


@pytest.mark.parametrize("expert_hessian", ["routed", "router-weighted"])
def test_pipeline_counts_match_the_gathered_tokens(monkeypatch, expert_hessian):
    """The pipeline tells quantize_experts each expert's row count without gathering its tokens: it must be the
    number of rows the gather returns (else the calibration-free fallback would pick the wrong experts)."""
    from tiny_models import CORPUS, tiny_model, tiny_tokenizer

    import optimum_mc
    from optimum_mc import pipeline, pmq

    checked = []
    original = pmq.quantize_experts

    def spy(weights, tokens, act_fn, bits, opts, emit=None, count=None, **kw):
        for e in bits:
            assert count(e) == tokens(e)[0].shape[0], (e, count(e))
            checked.append(e)
        return original(weights, tokens, act_fn, bits, opts, emit=emit, count=count, **kw)

    monkeypatch.setattr(pmq, "quantize_experts", spy)
    cfg = optimum_mc.MCConfig(bits=2.5, group_size=32, num_samples=4, seq_len=16, dataset=CORPUS,
                              show_progress=False, expert_hessian=expert_hessian,
                              tokenizer=tiny_tokenizer())  # fmt: skip
    pipeline.quantize_model(tiny_model("mixtral"), cfg)
    assert checked
