"""Project MC's peak memory (optimum_mc.memory_model) onto real MoE models, with CPU or GPU calibration.

    python scripts/memory_model.py            # markdown table for docs/scale.md

Configs are written out here (no Hub access needed); DeepSeek-V2-Lite is counted with transformers' DeepSeek-V3
classes (same MLA attention and MoE shapes; only the router's group limit differs, which holds no parameters).
"""

from __future__ import annotations

import torch
import transformers

from optimum_mc.memory_model import GiB, estimate

MODELS = {
    "Mixtral-8x7B": transformers.MixtralConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        num_local_experts=8,
        num_experts_per_tok=2,
        vocab_size=32000,
    ),
    "Mixtral-8x22B": transformers.MixtralConfig(
        hidden_size=6144,
        intermediate_size=16384,
        num_hidden_layers=56,
        num_attention_heads=48,
        num_key_value_heads=8,
        num_local_experts=8,
        num_experts_per_tok=2,
        vocab_size=32768,
    ),
    "Qwen3-30B-A3B": transformers.Qwen3MoeConfig(
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        num_experts=128,
        num_experts_per_tok=8,
        vocab_size=151936,
        tie_word_embeddings=False,
    ),
    "DeepSeek-V2-Lite": transformers.DeepseekV3Config(
        hidden_size=2048,
        intermediate_size=10944,
        moe_intermediate_size=1408,
        num_hidden_layers=27,
        num_attention_heads=16,
        num_key_value_heads=16,
        n_routed_experts=64,
        n_shared_experts=2,
        num_experts_per_tok=6,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        q_lora_rank=None,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        vocab_size=102400,
    ),
}


def main() -> None:
    head = "| model | bf16 | packed (2.5 b) | GPU calibration: device peak | host peak | CPU calibration: host peak |"
    print(head)
    print("|---|---|---|---|---|---|")
    for name, cfg in MODELS.items():
        gpu = estimate(cfg, device="cuda")
        cpu = estimate(cfg, device="cpu")
        with torch.device("meta"):
            size = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_config(cfg).parameters()) * 2
        print(
            f"| {name} | {size / GiB:.1f} GiB | {gpu.packed_model / GiB:.1f} GiB | {gpu.device_peak / GiB:.1f} GiB "
            f"| {gpu.host_peak / GiB:.1f} GiB | {cpu.host_peak / GiB:.1f} GiB |"
        )


if __name__ == "__main__":
    main()
