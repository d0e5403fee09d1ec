"""A peft LoRA adapter trains on top of an MC-quantized MoE: the loss falls, the packed weights stay as they were."""

from __future__ import annotations

import pytest
import torch
from tiny_models import CORPUS, save_tiny
from transformers import AutoModelForCausalLM, AutoTokenizer

from optimum_mc import MCConfig
from optimum_mc.nn import MCExperts, QuantLinear

peft = pytest.importorskip("peft")

from optimum_mc.nn.lora import MCLoraLinear, prepare_lora_config  # noqa: E402  (needs peft)

QUICK = dict(bits=2.5, group_size=32, num_samples=4, seq_len=16, dataset=CORPUS, show_progress=False)
TARGETS = ["q_proj", "v_proj", "o_proj"]


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    path = save_tiny("mixtral", tmp_path_factory.mktemp("lora") / "f")
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=MCConfig(**QUICK))
    model.save_pretrained(path + "-mc")
    return path, model


def _batch(path):
    tok = AutoTokenizer.from_pretrained(path)
    enc = tok(CORPUS[:4], return_tensors="pt", padding="max_length", truncation=True, max_length=24)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return dict(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels)


def _train(pm, batch, steps: int = 8) -> list[float]:
    """A few AdamW steps on the adapters of ``pm`` over one fixed batch; the losses before each step."""
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    pm.train()
    losses = []
    for _ in range(steps):
        loss = pm(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _assert_base_unchanged(pm, before: dict) -> None:
    """Every packed buffer of the wrapped base model equals its copy taken before training."""
    for n, b in pm.base_model.model.named_buffers():
        assert torch.equal(b, before[n.replace(".base_layer", "")]), n


def _wrap_lora(model, base_type):
    """``(peft model, buffers before)``: LoRA on TARGETS, every adapter wrapping a ``base_type`` base layer."""
    before = {n: b.clone() for n, b in model.named_buffers()}
    config = prepare_lora_config(peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))
    pm = peft.get_peft_model(model, config)
    wrapped = [m for m in pm.modules() if isinstance(m, MCLoraLinear)]
    assert len(wrapped) == len(TARGETS) * 2 and all(isinstance(m.base_layer, base_type) for m in wrapped)
    return pm, before


def test_quantizer_reports_trainable(quantized):
    _, model = quantized
    assert model.hf_quantizer.is_trainable and not model.hf_quantizer.is_qat_trainable


def test_lora_trains_on_mc_model_and_packed_weights_stay(quantized, tmp_path):
    path, model = quantized
    model.save_pretrained(tmp_path / "mc")
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantLinear)
    assert isinstance(model.model.layers[0].mlp.experts, MCExperts)
    pm, before = _wrap_lora(model, QuantLinear)
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)

    batch = _batch(path)
    losses = _train(pm, batch)
    # the LoRA moves the loss on this fixed batch; a frozen model (no input gradients) would keep it exactly
    assert losses[-1] < 0.9 * losses[0], losses
    grads = [p.grad for n, p in pm.named_parameters() if "lora_A" in n]
    # every adapter's gradient comes back through the packed ops of the layers after it (their input gradients)
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    _assert_base_unchanged(pm, before)

    pm.eval()
    with torch.no_grad():
        tuned = pm(**batch).logits
        with pm.disable_adapter():
            base = pm(**batch).logits
    assert not torch.allclose(tuned, base)
    with pytest.raises(NotImplementedError, match="re-quantization"):
        pm.merge_adapter()

    # the adapter saves alone and loads onto the MC checkpoint (the mapping is passed again with the config)
    pm.save_pretrained(tmp_path / "adapter")
    base_again = AutoModelForCausalLM.from_pretrained(tmp_path / "mc")
    cfg = prepare_lora_config(peft.LoraConfig.from_pretrained(tmp_path / "adapter"))
    loaded = peft.PeftModel.from_pretrained(base_again, tmp_path / "adapter", config=cfg).eval()
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, tuned)


def test_transformers_trainer_trains_the_adapter(quantized, tmp_path):
    from transformers import Trainer, TrainingArguments

    path, _ = quantized
    model = AutoModelForCausalLM.from_pretrained(path + "-mc")  # the MC checkpoint: no calibration
    pm = peft.get_peft_model(model, prepare_lora_config(peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"])))
    batch = _batch(path)
    rows = [{k: v[i] for k, v in batch.items()} for i in range(batch["input_ids"].shape[0])]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=6,
        learning_rate=1e-2,
        report_to=[],
        logging_steps=1,
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    # Trainer refuses quantized models whose quantizer is not trainable (validate_quantization_for_training)
    trainer = Trainer(model=pm, args=args, train_dataset=rows)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 6 and losses[-1] < losses[0], losses


def test_lora_on_nf4_attention(tmp_path):
    """With ``nonexpert_method="bnb_nf4"`` the attention is bitsandbytes NF4: adapters wrap it and train too."""
    pytest.importorskip("bitsandbytes")
    from optimum_mc.nn.nf4_linear import NF4Linear

    path = save_tiny("mixtral", tmp_path / "f")
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=MCConfig(**QUICK, nonexpert_method="bnb_nf4")
    )
    assert isinstance(model.model.layers[0].self_attn.q_proj, NF4Linear)
    pm, before = _wrap_lora(model, NF4Linear)
    batch = _batch(path)
    losses = _train(pm, batch)
    assert losses[-1] < 0.9 * losses[0], losses
    _assert_base_unchanged(pm, before)
