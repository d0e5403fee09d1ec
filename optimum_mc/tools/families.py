"""The MoE text families of the installed transformers, and tiny random configs of each (tests, support matrix).

The family list is generated from transformers itself: every ``models/<name>/modeling_*.py`` whose experts follow
the shared experts interface (``forward(hidden_states, top_k_index, top_k_weights)``, or are declared to
transformers' experts dispatch with ``@use_experts_implementation``, as gpt-oss's are under other argument names), or
that hold fused 3-D experts (``gate_up_proj = nn.Parameter``) behind another interface (Llama 4's experts on inputs
scaled by a dense router's scores: adapted by ``optimum_mc/input_scaled.py``), mapped to the config model types that
have a causal-LM class. A newer transformers
adds its families here without a code change.
"""

from __future__ import annotations

import functools
import os

_SIZES = dict(
    vocab_size=320,
    unpadded_vocab_size=320,
    vocab_size_per_layer_input=320,  # (gemma4: per-layer input embeddings)
    hidden_size_per_layer_input=16,  # (inkling2: the head's size before padding to vocab_size)
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=64,
    intermediate_size_mlp=64,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    moe_shared_expert_intermediate_size=32,
    shared_intermediate_size=32,  # (ergo)
    first_dense_intermediate_size=64,
    expert_intermediate_size=32,
    ffn_hidden_size=64,
    max_position_embeddings=256,
    num_experts=8,
    num_local_experts=8,
    n_routed_experts=8,
    moe_num_experts=8,
    num_experts_per_tok=2,
    moe_topk=2,
    moe_top_k=2,  # (dbrx's ffn_config)
    kv_n_heads=2,  # (dbrx's attn_config)
    top_k_experts=2,
    moe_k=2,
    n_shared_experts=1,
    num_shared_experts=1,
    zero_expert_num=2,
    enable_moe_block=True,  # (a config that switches its MoE block on and off: on)
    q_lora_rank=32,
    kv_lora_rank=32,
    qk_rope_head_dim=16,
    qk_nope_head_dim=16,
    qk_head_dim=32,
    v_head_dim=16,
    n_group=2,
    topk_group=1,
    first_k_dense_replace=1,
    tie_word_embeddings=False,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    sliding_window=64,
    num_dense_layers=1,
    index_num_heads=2,
    index_n_heads=2,
    index_head_dim=16,
    # sparse-attention indexers a default config leaves unset (qwen4_exp: its default layers need them)
    indexer_n_heads=2,
    indexer_kv_heads=1,
    indexer_head_dim=16,
    indexer_budget=16,
    indexer_compress_ratio=4,
    hc_lowrank=16,
    ple_embed_dim=64,
)
# families whose defaults cannot be derived from the generic rules above
_EXCEPTIONS = {
    "lfm2_moe": dict(layer_types=["conv", "full_attention"]),
    "zaya": dict(num_experts_per_tok=1),
    # its default is all Mamba layers, which transformers' mask creation cannot run with a cache (real checkpoints
    # interleave attention layers): one of each kind
    "granitemoehybrid": dict(layer_types=["linear_attention", "full_attention"]),
    # its attention reads attn_config.rope_theta, which the config class does not define, and clamps q/k/v to
    # clip_qkv, which it cannot do at the class's default None: published config.json files carry both
    # (transformers-community/dbrx-instruct: 500000 and 8); merged into the tiny attn_config
    "dbrx": dict(attn_config=dict(rope_theta=500000, clip_qkv=8)),
}
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def moe_model_types() -> list[str]:
    """Config model types of the installed transformers whose causal LM uses the shared MoE experts interface."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    root = os.path.join(os.path.dirname(transformers.__file__), "models")
    modules = set()
    for name in sorted(os.listdir(root)):
        folder = os.path.join(root, name)
        if not os.path.isdir(folder):
            continue
        for f in os.listdir(folder):
            if f.startswith("modeling_") and f.endswith(".py"):
                with open(os.path.join(folder, f), encoding="utf-8") as fh:
                    src = fh.read()
                    markers = ("top_k_index", "@use_experts_implementation", "gate_up_proj = nn.Parameter")
                    if any(m in src for m in markers):
                        modules.add(name)
    return [
        mt
        for mt in CONFIG_MAPPING_NAMES
        if mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type_to_module_name(mt) in modules
    ]


def _has(config, key: str) -> bool:
    """``hasattr`` that counts a heterogeneous config's per-layer attribute (which refuses a global read) as
    present."""
    try:
        return hasattr(config, key)
    except Exception:
        return key in config.to_dict()


def _get(config, key: str):
    try:
        return getattr(config, key, None)
    except Exception:  # a per-layer attribute of a heterogeneous config: its global value
        return config.to_dict().get(key)


def _layer_references(v: list) -> bool:
    """A per-layer list of layer indices: each entry an earlier (or its own) layer that refers to itself, more than
    two distinct ones (not a list of 0 / 1 flags, as llama4's no_rope_layers), some layer referring to another one
    (not a list of all layers' indices, as llama4's moe_layers at its default)."""
    if not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= i for i, x in enumerate(v)):
        return False
    return len(set(v)) > 2 and all(v[x] == x for x in v) and any(x != i for i, x in enumerate(v))


def _tiny_per_layer(values: dict, per_layer: dict, keep: list[int], kw: dict) -> dict:
    """A heterogeneous config's per-layer overrides (``{"05": {"head_dim": 512}}``) for the kept layers, indexed
    anew, each size scaled as the tiny global one is (512 over a global 256 -> twice the tiny head_dim)."""
    out = {}
    for key, over in per_layer.items():
        i = int(key)
        if i not in keep or not isinstance(over, dict):
            continue
        tiny = {}
        for k, v in over.items():
            g, t = values.get(k), kw.get(k)
            if isinstance(v, int) and not isinstance(v, bool) and isinstance(g, int) and g and isinstance(t, int):
                tiny[k] = max(1, round(t * v / g))
            elif k not in kw:
                tiny[k] = v
        # head_dim = qk_nope_head_dim + qk_rope_head_dim where the full-size layer has it (dots3_note's sliding
        # layers: its config validates it); the tiny parts, scaled separately, are summed again
        full = [over.get(p, values.get(p)) for p in _HEAD_PARTS]
        if all(isinstance(x, int) for x in full) and full[0] == sum(full[1:]):
            parts = [tiny.get(p, kw.get(p)) for p in _HEAD_PARTS[1:]]
            if all(isinstance(x, int) for x in parts):
                tiny["head_dim"] = sum(parts)
        out[str(keep.index(i)).zfill(len(key))] = tiny
    return out


_HEAD_PARTS = ("head_dim", "qk_nope_head_dim", "qk_rope_head_dim")


def tiny_config(model_type: str, **overrides):
    """A tiny config of ``model_type``: hidden 64, 2 layers (the first dense where the family has dense layers),
    8 experts, top-2, vocabulary 320. Per-layer lists are cut to the layer count; token ids kept in the vocabulary.
    """
    from transformers import AutoConfig

    base = AutoConfig.for_model(model_type)
    if getattr(base, "sub_configs", None):
        from .tiny_nested import tiny_nested

        return tiny_nested(model_type, base, overrides)
    layers0 = _get(base, "num_hidden_layers")
    kw = {k: v for k, v in _SIZES.items() if _has(base, k)}
    n = kw.get("num_hidden_layers", layers0)
    if "kv_lora_rank" in kw:  # multi-head latent attention: one key/value head per query head
        kw["num_key_value_heads"] = kw.get("num_attention_heads", 4)
    values = base.to_dict()
    keep = list(range(n or 0))
    kinds = [
        v
        for k, v in sorted(values.items(), key=lambda kv: kv[0] != "layer_types")
        if ("layer" in k and "type" in k or "mlp" in k) and isinstance(v, list) and layers0 and len(v) == layers0
    ]
    if kinds and n:
        # keep one layer of every kind of attention (a hybrid's linear and full attention) and of MLP (dense and
        # sparse), adding a layer only for a kind the kept ones miss; then fill up in order
        first: list[int] = []
        for types in kinds:
            for t in dict.fromkeys(types):
                if all(types[i] != t for i in first):
                    first.append(types.index(t))
        keep = sorted(first + [i for i in range(layers0) if i not in first][: max(0, n - len(first))])
        kw["num_hidden_layers"] = n = len(keep)
    for k, v in values.items():
        if isinstance(v, list) and layers0 and len(v) == layers0 and n != layers0 and k not in kw:
            kw[k] = [v[i] for i in keep]
            if _layer_references(v):
                # per layer, the index of another layer (kolibri1_1's kv_source_layers: whose K/V it reads): the kept
                # layer's new index, or its own where that layer is dropped (it then produces its own)
                kw[k] = [keep.index(v[i]) if v[i] in keep else j for j, i in enumerate(keep)]
        elif k.endswith("_layers") and isinstance(v, list) and all(isinstance(x, int) for x in v) and k not in kw:
            kw[k] = [keep.index(x) for x in v if x in keep]  # layer indices follow the kept layers
        elif k.endswith("_layer_period") and isinstance(v, int):
            kw[k] = 2
        elif k.endswith("_layer_offset") and isinstance(v, int):
            kw[k] = 1
    if isinstance(values.get("per_layer_config"), dict) and values["per_layer_config"]:
        kw["per_layer_config"] = _tiny_per_layer(values, values["per_layer_config"], keep, kw)
    for k in _TOKEN_IDS:
        if _has(base, k):
            kw[k] = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}[k]
    kw.update(_EXCEPTIONS.get(model_type, {}))
    alias = getattr(base, "attribute_map", None) or {}  # e.g. num_local_experts -> num_experts: one value wins
    for k in overrides:
        kw = {j: v for j, v in kw.items() if alias.get(j, j) != alias.get(k, k)}
    kw.update(overrides)
    return AutoConfig.for_model(model_type, **kw)


CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def add(a, b):\n    return a + b\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n",
    "Mixture of experts models route every token to a few experts chosen by a router network.",
    "Quantization stores weights with fewer bits; calibration text tells which errors matter most.",
    "A journey of a thousand miles begins with a single step. Knowledge speaks, but wisdom listens.",
]


@functools.lru_cache(maxsize=4)
def tiny_tokenizer(vocab_size: int = 320):
    """:func:`build_tiny_tokenizer` on ``CORPUS``, built once per size."""
    return build_tiny_tokenizer(vocab_size, CORPUS)


def build_tiny_tokenizer(vocab_size: int, corpus: list[str]):
    """A byte-level BPE tokenizer trained in memory on ``corpus`` (offline, deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_model(model_type: str, seed: int = 0, **overrides):
    """A random tiny causal LM of ``model_type`` (weights ~ N(0, 0.08²): distinct experts, non-degenerate routing);
    ``overrides`` go to :func:`tiny_config` (e.g. :data:`VLLM_SIZES`)."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(model_type, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            if p.dim() >= 2 and p.is_floating_point():
                p.copy_(torch.randn(p.shape, generator=g) * 0.08)
    return model.eval()


IDS = [[5, 17, 42, 99, 7, 3, 250, 11, 64, 128, 31, 8]]


def save_tiny(model_type: str, folder: str, **overrides) -> str:
    """Save :func:`tiny_model` of ``model_type`` (``overrides``: config fields) and :func:`tiny_tokenizer` to
    ``folder``; return it."""
    tiny_model(model_type, **overrides).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def quick_config(**overrides):
    """The MC settings of the tiny-model checks: 2.5 bits, group 32, 4 x 16 calibration tokens of :data:`CORPUS`,
    seed 0, no progress bars (``overrides`` replace any of them)."""
    import optimum_mc

    options = dict(bits=2.5, group_size=32, num_samples=4, seq_len=16, dataset=CORPUS, show_progress=False, seed=0)
    return optimum_mc.MCConfig(**{**options, **overrides})


def _kept_float(model) -> list[str]:
    """Classes of the decoder-layer modules whose own matrices stay in float (routers, gates, convolutions, ...)."""
    from ..architectures import decoder_layers

    kinds = set()
    for layer in decoder_layers(model):
        for m in layer.modules():
            if "norm" in type(m).__name__.lower():  # (packed modules hold their matrices in buffers, not here)
                continue
            if any(p.dim() >= 2 and p.is_floating_point() for p in m.parameters(recurse=False)):
                kinds.add(type(m).__name__)
    return sorted(kinds)


def check_family(model_type: str, workdir: str) -> dict:
    """Quantize a tiny random ``model_type`` with MC (2.5 bits), save, reload (logits must be equal), generate, and
    run ODP (top-k >= 2). Returns ``{"status": "pass", "notes": ...}``; raises on the first failing step."""
    import torch
    from transformers import AutoModelForCausalLM

    import optimum_mc

    from ..architectures import decoder_layers, moe_blocks

    src, dst = save_tiny(model_type, os.path.join(workdir, "float")), os.path.join(workdir, "mc")
    q = AutoModelForCausalLM.from_pretrained(src, quantization_config=quick_config())
    ids = torch.tensor(IDS)
    with torch.no_grad():
        ref = q(input_ids=ids).logits
    if not torch.isfinite(ref).all():
        raise AssertionError("quantized logits are not finite")
    q.save_pretrained(dst)
    again = AutoModelForCausalLM.from_pretrained(dst)
    with torch.no_grad():
        got = again(input_ids=ids).logits
    if not torch.equal(ref, got):
        raise AssertionError(f"reloaded logits differ (max |diff| {(ref - got).abs().max().item():.3g})")
    out = again.generate(ids[:, :5], max_new_tokens=3, do_sample=False)
    if out.shape[1] != 8:
        raise AssertionError(f"generate returned {out.shape[1]} tokens, expected 8")
    blocks = list(moe_blocks(again))
    top_k = min(b.top_k for b in blocks)
    notes = {
        "moe_layers": [b.layer_idx for b in blocks],
        "dense_layers": [  # (decoder layers, not num_hidden_layers: longcat_flash's layer holds two sublayers)
            i for i in range(len(decoder_layers(again))) if i not in {b.layer_idx for b in blocks}
        ],
        "experts": blocks[0].num_experts,
        "top_k": top_k,
        "shared_experts": list(again.__dict__["_mc_architecture"].shared_expert_attrs),
        "score_fn": again.__dict__["_mc_architecture"].score_fn,
        "kept_float": _kept_float(again),
        "odp": "n/a (top-1)",
    }
    if top_k >= 2:  # the calibrated per-layer thresholds (median ratio): a fixed one means another share per router
        active = optimum_mc.set_odp(again, True, layers=len(blocks))
        with torch.no_grad():
            pruned = again(input_ids=ids).logits
        stats = optimum_mc.get_odp_stats(again)["total"]
        if not torch.isfinite(pruned).all() or not active:
            raise AssertionError("ODP produced non-finite logits or no active layer")
        if stats["skipped_fraction"] <= 0:
            raise AssertionError("ODP at the calibrated thresholds skipped no expert slot")
        thr = ", ".join(f"{t:.2f}" for t in again.config.quantization_config.odp_thresholds)
        notes["odp"] = f"skipped {stats['skipped_fraction']:.2f} of expert slots at calibrated thresholds {thr}"
    return {"status": "pass", "notes": notes}


# the vLLM-sized tiny configs (their own module; kept importable from here)
from optimum_mc.tools.vllm_sizes import VLLM_CONFIG_EXTRAS, VLLM_SIZES, vllm_sizes  # noqa: E402,F401
