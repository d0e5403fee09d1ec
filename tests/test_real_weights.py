"""Real weights (../shared/models/mc-ref-mixtral, per-expert Hub layout): MC beats uniform 2-bit at 2.5 bits.

Skipped when ../shared is absent. Calibration is reduced (16 x 256 tokens of the builtin text) to keep CI short;
scripts/bench_quality.py runs the full benchmark.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import optimum_mc
from optimum_mc.tools.evaluation import perplexity, token_windows

SHARED = Path(__file__).resolve().parents[2] / "shared"
MODEL = SHARED / "models" / "mc-ref-mixtral"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not MODEL.is_dir(), reason="../shared/models/mc-ref-mixtral not available"),
]


@pytest.fixture(scope="module")
def windows():
    tok = AutoTokenizer.from_pretrained(MODEL)
    texts = [(SHARED / "data" / f"dev.{d}.txt").read_text(encoding="utf-8") for d in ("code", "docs", "quotes")]
    return [token_windows(tok, t, 256, 8) for t in texts]


def mean_ppl(model, windows) -> float:
    return sum(perplexity(model, w) for w in windows) / len(windows)


def load(**kw):
    base = dict(num_samples=16, seq_len=256, show_progress=False)
    cfg = optimum_mc.MCConfig(**{**base, **kw})
    return AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32, quantization_config=cfg)


@pytest.fixture(scope="module")
def mc_model():
    return load(bits=2.5)


def test_mc_beats_uniform_two_bit(mc_model, windows):
    fp = mean_ppl(AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32), windows)
    mc = mean_ppl(mc_model, windows)
    u2 = mean_ppl(load(bits=2, candidate_bits=[2]), windows)
    assert fp < mc < u2
    assert (mc - fp) < 0.6 * (u2 - fp)  # MC removes a large part of uniform 2-bit's degradation


def test_real_checkpoint_round_trip(mc_model, tmp_path):
    mc_model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    ids = torch.arange(3, 67).view(1, -1)
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, mc_model(input_ids=ids).logits)
    bits = mc_model.config.quantization_config.expert_bits
    assert len(bits) == 6 and all(sum(b) == 20 for b in bits)
