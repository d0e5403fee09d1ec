"""Progress bars go through transformers' logging utilities: its switch (and HF_HUB_DISABLE_PROGRESS_BARS)
silences them; ``MCConfig(show_progress=False)`` still does too."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from tiny_models import CORPUS, tiny_model, tiny_tokenizer
from transformers.utils import logging as hf_logging

from optimum_mc import MCConfig
from optimum_mc.pipeline import quantize_model
from optimum_mc.tools.evaluation import perplexity

QUICK = dict(bits=2.5, group_size=32, num_samples=4, seq_len=16, dataset=CORPUS)
WINDOWS = torch.randint(3, 300, (4, 8), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def bars_enabled():
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()
    yield
    (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def test_transformers_switch_silences_our_bars(bars_enabled, capfd):
    model = tiny_model("mixtral")
    perplexity(model, WINDOWS, batch_size=1, show_progress=True)
    assert "perplexity" in capfd.readouterr().err  # the bar is there while transformers' bars are on
    hf_logging.disable_progress_bar()
    perplexity(model, WINDOWS, batch_size=1, show_progress=True)
    assert capfd.readouterr().err == ""


def test_quantization_bars_follow_both_switches(bars_enabled, capfd):
    tok = tiny_tokenizer()
    quantize_model(tiny_model("mixtral"), MCConfig(**QUICK, show_progress=True), tokenizer=tok)
    assert "MC quantization" in capfd.readouterr().err
    quantize_model(tiny_model("mixtral"), MCConfig(**QUICK, show_progress=False), tokenizer=tok)
    assert "MC quantization" not in capfd.readouterr().err
    hf_logging.disable_progress_bar()
    quantize_model(tiny_model("mixtral"), MCConfig(**QUICK, show_progress=True), tokenizer=tok)
    assert "MC quantization" not in capfd.readouterr().err


@pytest.mark.parametrize("disabled", ["1", "0"])
def test_hub_environment_switch(disabled):
    code = (
        "import sys, torch; sys.path.insert(0, 'tests'); from tiny_models import tiny_model\n"
        "from optimum_mc.tools.evaluation import perplexity\n"
        "perplexity(tiny_model('mixtral'), torch.randint(3, 300, (3, 8)), batch_size=1, show_progress=True)\n"
    )
    env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": disabled}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert ("perplexity" in res.stderr) == (disabled == "0"), res.stderr
