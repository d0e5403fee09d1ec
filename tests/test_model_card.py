"""Model cards of MC models: written by save_pretrained and push_to_hub (loopback Hub), fields, which README wins."""

from __future__ import annotations

import pytest
from helpers.hub_server import MockHub, assert_ok, run_in_hub_subprocess
from huggingface_hub import ModelCard
from tiny_models import CORPUS, save_tiny
from transformers import AutoModelForCausalLM

import optimum_mc
from optimum_mc.model_card import MARK, TAGS, hub_id, record_evaluation


def mc_config(**kw) -> optimum_mc.MCConfig:
    base = dict(bits=2.5, group_size=32, num_samples=8, seq_len=32, dataset=CORPUS, show_progress=False)
    return optimum_mc.MCConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    src = save_tiny("mixtral", tmp_path_factory.mktemp("float"))
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=mc_config())
    record_evaluation(model, "heldout.txt", "perplexity", 12.5)
    return model


def test_save_pretrained_writes_a_parsable_card(quantized, tmp_path):
    quantized.save_pretrained(tmp_path / "q")
    card = ModelCard.load(tmp_path / "q" / "README.md")
    assert set(TAGS) <= set(card.data.tags) and card.data.library_name == "transformers"
    assert card.data.base_model is None  # quantized from a local folder: no Hub id to name
    cfg = quantized.config.quantization_config
    text = card.text
    assert MARK in text and "average expert bits | 2.500" in text
    for idx, bits in zip(cfg.moe_layers, cfg.expert_bits):  # the allocation table, one row per MoE layer
        assert f"| {idx} | `{''.join(map(str, bits))}` |" in text
    assert "| MC (this checkpoint) |" in text and "16-bit float" in text
    assert f'from_pretrained("{tmp_path / "q"}"' in text and "import optimum_mc" in text
    (result,) = card.data.eval_results
    assert (result.dataset_name, result.metric_type, result.metric_value) == ("heldout.txt", "perplexity", 12.5)


def test_reloaded_model_keeps_its_evaluation_numbers(quantized, tmp_path):
    quantized.save_pretrained(tmp_path / "q")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    again.save_pretrained(tmp_path / "copy")
    (result,) = ModelCard.load(tmp_path / "copy" / "README.md").data.eval_results
    assert (result.dataset_name, result.metric_value) == ("heldout.txt", 12.5)
    record_evaluation(again, "other.txt", "perplexity", 9.0)  # new numbers replace the old card's
    again.save_pretrained(tmp_path / "copy2")
    (result,) = ModelCard.load(tmp_path / "copy2" / "README.md").data.eval_results
    assert (result.dataset_name, result.metric_value) == ("other.txt", 9.0)


def _save_over_readme(model, target, readme: str) -> None:
    """Save ``model`` into ``target``, where a README.md with ``readme`` already is."""
    target.mkdir()
    (target / "README.md").write_text(readme, encoding="utf-8")
    model.save_pretrained(target)


def test_a_readme_written_by_hand_is_kept(quantized, tmp_path):
    target = tmp_path / "q"
    _save_over_readme(quantized, target, "---\nlicense: mit\ntags:\n- mine\n---\n# My notes\n\nHand-written text.\n")
    card = ModelCard.load(target / "README.md")
    assert card.text.strip() == "# My notes\n\nHand-written text." and MARK not in card.content
    assert card.data.license == "mit" and card.data.tags[0] == "mine" and set(TAGS) <= set(card.data.tags)


def test_generated_and_generic_cards_are_replaced(quantized, tmp_path):
    target = tmp_path / "q"
    _save_over_readme(quantized, target, "---\ntags: []\n---\nThis model card has been automatically generated.\n")
    first = (target / "README.md").read_text()
    assert MARK in first and "automatically generated" not in first
    quantized.save_pretrained(target)  # our own card: regenerated, identical for the same model
    assert (target / "README.md").read_text() == first


def test_hub_id_only_for_repo_names(tmp_path):
    assert hub_id("mistralai/Mixtral-8x7B-v0.1") == "mistralai/Mixtral-8x7B-v0.1" and hub_id("gpt2") == "gpt2"
    assert hub_id(str(tmp_path)) is None and hub_id("../x/y") is None and hub_id(None) is None


def test_push_to_hub_card_on_the_loopback_hub(tmp_path):
    src = save_tiny("mixtral", tmp_path / "float")
    script = f"""
        import optimum_mc
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from tiny_models import CORPUS
        AutoModelForCausalLM.from_pretrained({src!r}).push_to_hub("me/float-moe")
        AutoTokenizer.from_pretrained({src!r}).push_to_hub("me/float-moe")
        cfg = optimum_mc.MCConfig(bits=2.5, group_size=32, num_samples=8, seq_len=32, dataset=CORPUS,
                                  show_progress=False)
        m = AutoModelForCausalLM.from_pretrained("me/float-moe", quantization_config=cfg)
        optimum_mc.model_card.record_evaluation(m, "wikitext2", "perplexity", 7.25)
        m.push_to_hub("me/float-moe-mc", tags=["extra"])
        print("pushed")
        from huggingface_hub import HfApi
        mine = b"---\\nlicense: mit\\n---\\n# Written by me\\n"
        HfApi().create_repo("me/mine-mc")
        HfApi().upload_file(path_or_fileobj=mine, path_in_repo="README.md", repo_id="me/mine-mc", repo_type="model")
        m.push_to_hub("me/mine-mc")
        print("pushed again")
    """
    with MockHub(root=tmp_path / "hub") as hub:
        assert_ok(run_in_hub_subprocess(script, hub.url, tmp_path), "pushed again")
        readme = hub.read("me/float-moe-mc", "README.md").decode()
        kept = ModelCard(hub.read("me/mine-mc", "README.md").decode())
        files = set(hub.list_files("me/mine-mc"))
    card = ModelCard(readme)
    assert card.data.base_model == "me/float-moe" and card.data.base_model_relation == "quantized"
    assert set(TAGS) | {"extra"} <= set(card.data.tags) and card.data.library_name == "transformers"
    assert card.data.eval_results[0].metric_value == 7.25
    assert 'from_pretrained("me/float-moe-mc"' in card.text and "## Bit allocation" in card.text
    assert "automatically generated" not in readme
    # a README a person put in the repo stays (text untouched), with our metadata added
    assert kept.text.strip() == "# Written by me" and kept.data.license == "mit"
    assert set(TAGS) <= set(kept.data.tags) and kept.data.base_model == "me/float-moe"
    assert {"config.json", "model.safetensors"} <= files
