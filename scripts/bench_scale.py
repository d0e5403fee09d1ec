"""Scale benchmark: peak memory and time of MC quantization on Mixtral-proportioned models larger than a toy.

Builds (seeded random weights, bf16, the Hub's per-expert safetensors layout, one shard per layer) a Mixtral-layout
model with hidden 1024, intermediate 3584, 8 experts top-2, 32 heads / 8 KV heads, vocab 32000 at several depths,
quantizes each with MC 2.5 through ``from_pretrained`` in a child process, and reports the child's peak resident
memory (VmHWM), wall time and the sha256 of the saved safetensors. Optional runs: the whole float model resident
first (same bytes expected), and ``device_map="auto"`` with ``max_memory`` a quarter of the model plus an offload
folder.

    python scripts/bench_scale.py --layers 4 8 16 --resident-check 4 --offload-check 4 --out docs/results/scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HIDDEN, INTER, EXPERTS, TOP_K, HEADS, KV_HEADS, VOCAB = 1024, 3584, 8, 2, 32, 8, 32000


def model_config(layers: int) -> dict:
    return dict(
        architectures=["MixtralForCausalLM"],
        model_type="mixtral",
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_local_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        num_hidden_layers=layers,
        vocab_size=VOCAB,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=1e6,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype="bfloat16",
    )


def build_model(folder: Path, layers: int, seed: int = 0) -> int:
    """Write the model shard by shard (never more than one layer in memory); return its bf16 size in bytes."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.02):
        return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)

    head_dim = HIDDEN // HEADS
    weight_map, total = {}, 0

    def write(name: str, tensors: dict) -> None:
        nonlocal total
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        for k, v in tensors.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()

    write("embed.safetensors", {"model.embed_tokens.weight": rnd(VOCAB, HIDDEN)})
    for i in range(layers):
        p = f"model.layers.{i}."
        t = {
            p + "input_layernorm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
            p + "self_attn.q_proj.weight": rnd(HEADS * head_dim, HIDDEN),
            p + "self_attn.k_proj.weight": rnd(KV_HEADS * head_dim, HIDDEN),
            p + "self_attn.v_proj.weight": rnd(KV_HEADS * head_dim, HIDDEN),
            p + "self_attn.o_proj.weight": rnd(HIDDEN, HEADS * head_dim),
            p + "block_sparse_moe.gate.weight": rnd(EXPERTS, HIDDEN, std=0.1),
        }
        for e in range(EXPERTS):
            q = f"{p}block_sparse_moe.experts.{e}."
            t[q + "w1.weight"] = rnd(INTER, HIDDEN)
            t[q + "w3.weight"] = rnd(INTER, HIDDEN)
            t[q + "w2.weight"] = rnd(HIDDEN, INTER)
        write(f"layer-{i:03d}.safetensors", t)
    write(
        "head.safetensors",
        {"model.norm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16), "lm_head.weight": rnd(VOCAB, HIDDEN)},
    )
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
    (folder / "config.json").write_text(json.dumps(model_config(layers), indent=1))
    return total


def build_tokenizer(folder: Path) -> None:
    """A 4096-token byte-level BPE trained on the builtin calibration text (offline, deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from optimum_mc.calibration.data import load_documents

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4096,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(load_documents(None)[:400], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)


CHILD = r"""
import hashlib, json, sys, time, torch
from pathlib import Path
import optimum_mc
from transformers import AutoModelForCausalLM
from optimum_mc.pipeline import quantize_model
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
if args.get("trace"):
    sys.path.insert(0, args["scripts"])
    from memory_trace import trace_pipeline
    tracer = trace_pipeline()
bits = dict(bits=2, candidate_bits=[2]) if args["mode"] == "uniform" else dict(bits=2.5)
cfg = optimum_mc.MCConfig(**bits, show_progress=False, num_samples=args["samples"], seq_len=args["seq_len"],
                          device=args.get("device", "cpu"), offload_folder=args.get("mc_offload"))
t0 = time.perf_counter()
if args["mode"] == "resident":
    model = AutoModelForCausalLM.from_pretrained(args["model"], dtype=torch.bfloat16)
    quantize_model(model, cfg)
    model.config.quantization_config = cfg
elif args["mode"] == "offload":
    model = AutoModelForCausalLM.from_pretrained(args["model"], quantization_config=cfg, device_map="auto",
        max_memory={"cpu": args["max_memory"]}, offload_folder=args["offload"])
else:
    model = AutoModelForCausalLM.from_pretrained(args["model"], quantization_config=cfg)
seconds = time.perf_counter() - t0
out = Path(args["save"])
if args["mode"] != "offload":
    if args.get("trace"):
        with tracer.phase("save_pretrained"):
            model.save_pretrained(out)
    else:
        model.save_pretrained(out)
h = hashlib.sha256()
for f in sorted(out.glob("*.safetensors")):
    with open(f, "rb") as fh:  # in chunks: reading whole files here would count in the peak being measured
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            h.update(chunk)
if args.get("trace"):
    tracer.stop()
    print(tracer.report(), file=sys.stderr)
status = Path("/proc/self/status").read_text()
hwm = int(next(l for l in status.splitlines() if l.startswith("VmHWM")).split()[1]) * 1024
cuda = {}
if torch.cuda.is_available():
    cuda = {"cuda_peak_allocated": torch.cuda.max_memory_allocated(),
            "cuda_peak_reserved": torch.cuda.max_memory_reserved()}
digest = h.hexdigest() if args["mode"] != "offload" else None
print(json.dumps({**cuda, "seconds": seconds, "peak_rss": hwm, "sha256": digest,
                  "device_map": sorted(set(getattr(model, "hf_device_map", {"": "cpu"}).values()))}))
"""


def estimate_row(layers: int, a) -> dict:
    """The memory model's figures (optimum_mc.memory_model.estimate) for this depth and calibration set."""
    from transformers import MixtralConfig

    from optimum_mc.memory_model import estimate

    cfg = {k: v for k, v in model_config(layers).items() if k not in ("architectures", "model_type", "torch_dtype")}
    est = estimate(MixtralConfig(**cfg), num_samples=a.samples, seq_len=a.seq_len, device=a.device)
    return {k: v for k, v in vars(est).items() if isinstance(v, (int, float))}


def run_child(args: dict) -> dict:
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    env.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "0")  # as `optimum-mc quantize` sets (docs/scale.md)
    env.setdefault("LRU_CACHE_CAPACITY", "1")
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True, env=env)
    if args.get("trace"):
        print(proc.stderr[proc.stderr.find("peak RSS by phase") :], flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({args['mode']}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--samples", type=int, default=128, help="calibration sequences (MCConfig default: 128)")
    ap.add_argument("--seq-len", type=int, default=512, help="calibration length (MCConfig default: 512)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--resident-check", type=int, nargs="*", default=[], help="depths also quantized fully resident")
    ap.add_argument("--offload-check", type=int, nargs="*", default=[], help="depths also run with auto + offload")
    ap.add_argument("--uniform-check", type=int, nargs="*", default=[], help="depths also run as uniform 2-bit GPTQ")
    ap.add_argument("--device", default="cpu", help="MCConfig.device: where calibration and GPTQ run ('cpu', 'cuda')")
    ap.add_argument("--trace", action="store_true", help="print the peak RSS of each pipeline phase (memory_trace.py)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="mc-bench-scale-"))
    results = []
    for n in a.layers:
        folder = work / f"mixtral-1024x{n}"
        if not (folder / "config.json").exists():
            size = build_model(folder, n)
            build_tokenizer(folder)
        else:
            size = json.loads((folder / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
        common = dict(
            model=str(folder), samples=a.samples, seq_len=a.seq_len, threads=a.threads, trace=a.trace, device=a.device
        )
        common["scripts"] = str(Path(__file__).resolve().parent)
        modes = (
            ["streamed"]
            + (["resident"] if n in a.resident_check else [])
            + (["offload"] if n in a.offload_check else [])
            + (["uniform"] if n in a.uniform_check else [])
        )
        row = {"layers": n, "bf16_bytes": size, "device": a.device, "estimate": estimate_row(n, a)}
        for mode in modes:
            args = dict(common, mode=mode, save=str(work / f"out-{n}-{mode}"))
            if mode == "offload":
                args.update(
                    max_memory=size // 4, offload=str(work / f"offload-{n}"), mc_offload=str(work / f"mc-offload-{n}")
                )
            t0 = time.perf_counter()
            r = run_child(args)
            r["wall"] = time.perf_counter() - t0
            row[mode] = r
            print(
                f"layers={n} {mode}: {r['seconds']:.0f} s, peak RSS {r['peak_rss'] / 2**30:.2f} GiB "
                f"({r['peak_rss'] / size:.2f}x bf16 model), {r.get('device_map')}",
                flush=True,
            )
            if "cuda_peak_allocated" in r:
                est, gib = row["estimate"], 2**30
                print(
                    f"layers={n} {mode}: CUDA peak allocated {r['cuda_peak_allocated'] / gib:.3f} GiB (memory "
                    f"model's layer phase {est['layer_phase'] / gib:.3f} GiB), reserved "
                    f"{r['cuda_peak_reserved'] / gib:.3f} GiB; host estimate {est['host_peak'] / gib:.2f} GiB",
                    flush=True,
                )
        if "uniform" in row:
            row["mc_over_uniform_time"] = row["streamed"]["seconds"] / row["uniform"]["seconds"]
            print(f"layers={n}: MC 2.5 time / uniform 2-bit GPTQ time = {row['mc_over_uniform_time']:.2f}", flush=True)
        if "resident" in row:
            row["same_bytes_as_resident"] = row["resident"]["sha256"] == row["streamed"]["sha256"]
            print(f"layers={n}: streamed and resident bytes identical: {row['same_bytes_as_resident']}", flush=True)
        results.append(row)
    by = {r["layers"]: r for r in results}
    if 8 in by and 16 in by:
        ratio = by[16]["streamed"]["peak_rss"] / by[8]["streamed"]["peak_rss"]
        print(f"RSS(16 layers) / RSS(8 layers) = {ratio:.3f}")
    if a.out:
        Path(a.out).write_text(json.dumps({"samples": a.samples, "seq_len": a.seq_len, "runs": results}, indent=1))


if __name__ == "__main__":
    main()
