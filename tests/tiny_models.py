"""Tiny random MoE models of every supported family, built offline from configs (no Hub)."""

from __future__ import annotations

import torch
import transformers

COMMON = dict(
    vocab_size=320,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

FAMILIES: dict[str, tuple[str, str, dict]] = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(intermediate_size=64, num_local_experts=4)),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            intermediate_size=64,
            moe_intermediate_size=64,
            shared_expert_intermediate_size=64,
            num_experts=6,
            num_experts_per_tok=4,
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(intermediate_size=64, moe_intermediate_size=64, num_experts=4, head_dim=16),
    ),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(intermediate_size=64, num_experts=4)),
    "deepseek_v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(
            intermediate_size=64,
            moe_intermediate_size=64,
            n_routed_experts=4,
            n_shared_experts=1,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=0,
            q_lora_rank=32,
            kv_lora_rank=32,
            qk_rope_head_dim=16,
            qk_nope_head_dim=16,
            v_head_dim=16,
            num_key_value_heads=4,
        ),
    ),
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM", dict(intermediate_size=64, num_local_experts=4)),
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM", dict(intermediate_size=64, num_local_experts=4)),
}


def tiny_config(family: str, **overrides):
    cfg_name, _, extra = FAMILIES[family]
    kw = {**COMMON, "num_experts_per_tok": 2, **extra, **overrides}
    return getattr(transformers, cfg_name)(**kw)


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A randomly initialized tiny model of ``family`` (deterministic for a seed)."""
    cfg = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, FAMILIES[family][1])(cfg).to(dtype)
    with torch.no_grad():  # make experts distinct and routing non-degenerate
        g = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.08)
    return model.eval()


CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def add(a, b):\n    return a + b\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n",
    "Mixture of experts models route every token to a few experts chosen by a router network.",
    "Quantization stores weights with fewer bits; calibration text tells which errors matter most.",
    "import os\nimport sys\nfor name in sorted(os.listdir('.')):\n    print(name, len(name))\n",
    "A journey of a thousand miles begins with a single step. Knowledge speaks, but wisdom listens.",
]


def tiny_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer trained in memory on ``CORPUS`` (offline, deterministic; a new one per call)."""
    from optimum_mc.tools.families import build_tiny_tokenizer

    return build_tiny_tokenizer(vocab_size, CORPUS)


def save_tiny(family: str, path, seed: int = 0, **overrides) -> str:
    """Save a tiny model of ``family`` and its tokenizer to ``path``; return the path as a string."""
    tok = tiny_tokenizer()
    model = tiny_model(family, seed=seed, vocab_size=len(tok), **overrides)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
