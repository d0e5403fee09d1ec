"""The embedded default: a small Mixtral-layout MoE trained on offline text, built on first use (< 2 min, 2 cores).

Text: the builtin calibration corpus (Python's own documentation topics, docstrings and sources), split by
document into train (9 of 10) and held-out (1 of 10). A byte-level BPE tokenizer (2048 tokens) and a 4-layer,
8-expert top-2 model (d=128) are trained from a fixed seed and cached in ``$OPTIMUM_MC_CACHE/demo-model``
(default ``~/.cache/optimum_mc``), written to a temporary folder and renamed into place.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from transformers.utils.logging import tqdm  # silenced by disable_progress_bar() / HF_HUB_DISABLE_PROGRESS_BARS

VOCAB = 2048
SEQ = 128
BATCH = 8
TRAIN_SECONDS = 110.0
MAX_STEPS = 600


def cache_path() -> Path:
    root = os.environ.get("OPTIMUM_MC_CACHE") or Path.home() / ".cache" / "optimum_mc"
    return Path(root) / "demo-model"


def split_documents() -> tuple[list[str], list[str]]:
    """Builtin offline documents split 9:1 into train and held-out text."""
    from ..calibration.data import load_documents

    docs = [d for d in load_documents(None) if d.strip()]
    return [d for i, d in enumerate(docs) if i % 10], [d for i, d in enumerate(docs) if i % 10 == 0]


def _tokenizer(train: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(train, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def build_demo_model(path: Path | None = None, seconds: float = TRAIN_SECONDS, quiet: bool = False) -> Path:
    """Train (or reuse) the demo model; return its folder."""
    from transformers import MixtralConfig, MixtralForCausalLM

    path = Path(path) if path else cache_path()
    if (path / "config.json").exists():
        return path
    torch.manual_seed(0)
    train, _ = split_documents()
    tok = _tokenizer(train)
    ids = []
    for d in train:
        ids.extend(tok(d)["input_ids"] + [tok.eos_token_id])
    data = torch.tensor(ids)
    cfg = MixtralConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=512,
        router_aux_loss_coef=0.02,
        output_router_logits=True,
        tie_word_embeddings=False,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id,
        bos_token_id=tok.eos_token_id,
    )
    model = MixtralForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    bar = tqdm(total=MAX_STEPS, desc="training demo MoE", disable=quiet)
    step = 0
    while step < MAX_STEPS and time.perf_counter() - start < seconds:
        lr = 5e-3 * min(1.0, (step + 1) / 30) * 0.5 * (1 + math.cos(math.pi * min(step / MAX_STEPS, 1.0)))
        for group in opt.param_groups:
            group["lr"] = lr
        offs = torch.randint(0, data.numel() - SEQ - 1, (BATCH,), generator=g)
        batch = torch.stack([data[o : o + SEQ] for o in offs.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.2f}")
    bar.close()
    model.config.output_router_logits = False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".demo-"))
    try:
        model.to(torch.bfloat16).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path
