"""push_to_hub -> from_pretrained(repo_id) -> identical logits and pipeline(), against a loopback mock Hub."""

from __future__ import annotations

import torch
from mock_hub import mock_hub, run_with_hub
from tiny_models import CORPUS, save_tiny


def test_push_to_hub_round_trip(tmp_path):
    src = save_tiny("mixtral", tmp_path / "float")
    ids = [[5, 17, 42, 99, 7, 3]]
    push = f"""
import torch, optimum_mc
from transformers import AutoModelForCausalLM, AutoTokenizer
cfg = optimum_mc.MCConfig(bits=2.5, group_size=32, num_samples=8, seq_len=32, dataset={CORPUS!r}, show_progress=False)
m = AutoModelForCausalLM.from_pretrained({src!r}, quantization_config=cfg)
m.push_to_hub("me/tiny-mc")
AutoTokenizer.from_pretrained({src!r}).push_to_hub("me/tiny-mc")
torch.save(m(input_ids=torch.tensor({ids})).logits, {str(tmp_path / "expected.pt")!r})
print("pushed")
"""
    pull = f"""
import torch
from transformers import AutoModelForCausalLM, pipeline
m = AutoModelForCausalLM.from_pretrained("me/tiny-mc")
assert type(m.model.layers[0].mlp.experts).__name__ == "MCExperts"
exp = torch.load({str(tmp_path / "expected.pt")!r})
assert torch.equal(m(input_ids=torch.tensor({ids})).logits, exp), "logits differ"
out = pipeline("text-generation", model="me/tiny-mc")("def add", max_new_tokens=4, do_sample=False)
print("pulled", out[0]["generated_text"])
"""
    with mock_hub(tmp_path / "hub") as url:
        res = run_with_hub(push, url, tmp_path / "home1")
        assert res.returncode == 0 and "pushed" in res.stdout, res.stderr[-3000:]
        res = run_with_hub(pull, url, tmp_path / "home2")  # fresh cache: everything comes from the mock Hub
        assert res.returncode == 0 and "pulled def add" in res.stdout, res.stderr[-3000:]
    assert torch.load(tmp_path / "expected.pt").shape[-1] == 320
