"""The embedded default: a small Mixtral-layout MoE trained on offline text, built on first use and cached.

Text: the builtin calibration corpus (Python's own documentation topics, docstrings and sources), split by
document into train (9 of 10) and held-out (1 of 10). A byte-level BPE tokenizer and a 4-layer, 8-expert top-2
model are trained from a fixed seed for a fixed number of steps (the same model whatever the machine's speed)
with a load-balancing auxiliary loss computed *per layer* (:func:`balance_loss`), so every expert of every layer
is routed, and cached in
``$OPTIMUM_MC_CACHE/demo-model-v4`` (default ``~/.cache/optimum_mc``), written to a temporary folder and renamed
into place. Training always runs on ``Recipe.threads`` threads, whatever the machine: the thread count changes
the rounding of the matrix products (1 and 2 threads give different bits; 2 and 2 identical), so every run on one
kind of CPU builds the same model. Other CPUs (another vector unit, another BLAS code path) round differently and
build a slightly different model: its float perplexity agrees closely, the quantized rows less (README, "The
demo's embedded default"; ``tests/tools/test_demo.py`` checks what holds on any CPU). Two threads take 1000 steps in
~2:15 on a quiet 2-core machine (one thread: ~3:20); on a busy machine the second thread mostly waits for its turn
and training is slower.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.utils.logging import tqdm  # silenced by disable_progress_bar() / HF_HUB_DISABLE_PROGRESS_BARS


@dataclass(frozen=True)
class Recipe:
    """Model shape and training schedule of the demo model."""

    vocab: int = 4096  # whole words as tokens: samples made of real words (1024 spelled out invented ones)
    hidden: int = 128
    intermediate: int = 256
    layers: int = 4
    experts: int = 8
    top_k: int = 2
    seq: int = 128
    batch: int = 8
    steps: int = 1000  # held-out perplexity 171 after 600 steps, 104 after 1000, 60 after 1800 (7 minutes)
    # held-out perplexity per token after 600 steps at vocab 4096 (3.63 characters a token): 203 at 1e-3, 171 at
    # 1.5e-3, 176 at 2e-3, 223 at 3e-3 (171 is 1.42 nats a character, against 1.51 for the best vocab-1024 model);
    # after 1000 steps 104 at 1.5e-3, 106 at 2e-3
    lr: float = 1.5e-3
    warmup: int = 30
    balance_coef: float = 0.3  # weight of the per-layer load-balancing loss (see balance_loss)
    seed: int = 0
    threads: int = 2  # fixed, so the model does not depend on the machine (see the module docstring)


RECIPE = Recipe()
CACHE_NAME = "demo-model-v4"  # bump when the recipe changes, so a stale cached model is not reused


def cache_path() -> Path:
    root = os.environ.get("OPTIMUM_MC_CACHE") or Path.home() / ".cache" / "optimum_mc"
    return Path(root) / CACHE_NAME


def split_documents() -> tuple[list[str], list[str]]:
    """Builtin offline documents split 9:1 into train and held-out text."""
    from ..calibration.data import load_documents

    docs = [d for d in load_documents(None) if d.strip()]
    return [d for i, d in enumerate(docs) if i % 10], [d for i, d in enumerate(docs) if i % 10 == 0]


def _tokenizer(train: list[str], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(train, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def _token_stream(tok, docs: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for row in tok(docs, add_special_tokens=False)["input_ids"]:
        ids.extend(row + [tok.eos_token_id])
    return torch.tensor(ids)


def demo_config(recipe: Recipe, vocab_size: int, eos: int):
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=vocab_size,
        hidden_size=recipe.hidden,
        intermediate_size=recipe.intermediate,
        num_hidden_layers=recipe.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=recipe.experts,
        num_experts_per_tok=recipe.top_k,
        max_position_embeddings=512,
        router_aux_loss_coef=0.0,  # transformers' own auxiliary loss is replaced by balance_loss
        output_router_logits=True,
        tie_word_embeddings=False,
        eos_token_id=eos,
        pad_token_id=eos,
        bos_token_id=eos,
    )


def balance_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Switch-Transformer load balancing, per MoE layer, averaged over layers: ``E * sum_e f_e * P_e`` with
    ``f_e`` the share of routing slots expert ``e`` receives and ``P_e`` its mean router probability (1 when
    balanced). transformers' Mixtral loss pools the tokens of all layers before balancing, which lets each layer
    keep dead experts as long as the layers' favourites differ (the old demo model had two such experts)."""
    losses = []
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        e = probs.shape[-1]
        chosen = torch.nn.functional.one_hot(probs.topk(top_k, dim=-1).indices, e).sum(1).float()
        losses.append(e * (chosen.mean(0) / top_k * probs.mean(0)).sum())
    return torch.stack(losses).mean()


def train_demo_model(recipe: Recipe = RECIPE, seconds: float | None = None, quiet: bool = False):
    """Train the demo model in memory; return ``(model, tokenizer)``. ``seconds`` stops early (tests only)."""
    from transformers import MixtralForCausalLM

    threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)  # see the module docstring
    try:
        torch.manual_seed(recipe.seed)
        train, _ = split_documents()
        tok = _tokenizer(train, recipe.vocab)
        data = _token_stream(tok, train)
        model = MixtralForCausalLM(demo_config(recipe, len(tok), tok.eos_token_id))
        model.set_experts_implementation("grouped_mm")  # the fastest float experts for training on CPU
        opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01)
        g = torch.Generator().manual_seed(recipe.seed)
        start = time.perf_counter()
        bar = tqdm(total=recipe.steps, desc="training the demo MoE (first run only)", disable=quiet)
        model.train()
        for step in range(recipe.steps):
            if seconds is not None and time.perf_counter() - start > seconds:
                break
            warm = min(1.0, (step + 1) / recipe.warmup)
            for group in opt.param_groups:
                group["lr"] = recipe.lr * warm * 0.5 * (1 + math.cos(math.pi * step / recipe.steps))
            offs = torch.randint(0, data.numel() - recipe.seq - 1, (recipe.batch,), generator=g)
            batch = torch.stack([data[o : o + recipe.seq] for o in offs.tolist()])
            out = model(input_ids=batch, labels=batch)
            loss = out.loss + recipe.balance_coef * balance_loss(out.router_logits, recipe.top_k)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.2f}")
        bar.close()
    finally:
        torch.set_num_threads(threads)
    model.config.output_router_logits = False
    return model.eval(), tok


def build_demo_model(
    path: Path | None = None, seconds: float | None = None, quiet: bool = False, recipe: Recipe = RECIPE
) -> Path:
    """Train (or reuse) the demo model; return its folder."""
    path = Path(path) if path else cache_path()
    if (path / "config.json").exists():
        return path
    model, tok = train_demo_model(recipe, seconds, quiet)
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


@torch.no_grad()
def expert_usage(model, windows: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Share of routing slots each expert receives, ``(MoE layers, experts)``, over ``windows`` of token ids."""
    from ..architectures import moe_blocks, router_output_positions

    blocks = list(moe_blocks(model))
    counts = torch.zeros(len(blocks), blocks[0].num_experts)

    def hook(row):
        def count(module, args, out):
            idx = out[router_output_positions(out)[2]].reshape(-1)
            counts[row] += torch.bincount(idx[idx < counts.shape[1]].cpu(), minlength=counts.shape[1]).float()

        return count

    handles = [b.router.register_forward_hook(hook(i)) for i, b in enumerate(blocks)]
    try:
        for s in range(0, windows.shape[0], batch_size):
            model(input_ids=windows[s : s + batch_size], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return counts / counts.sum(1, keepdim=True)
