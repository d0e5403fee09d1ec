"""llama.cpp K-quants as a CPU peer: convert -> quantize -> perplexity -> llama-bench, one markdown report.

    python scripts/bench_llamacpp.py --llama-dir /tmp/llama/llama.cpp --build-dir /tmp/llama/build \\
        --model ../shared/models/mc-ref-mixtral --out-dir /tmp/llama/models --threads 1,2

Needs a built llama.cpp tree (targets llama-quantize, llama-perplexity, llama-bench; CPU is enough) and its
``gguf-py`` (used from the tree, not installed). Not run in CI.

1. ``convert_hf_to_gguf.py`` writes an F32 GGUF. A small custom BPE tokenizer has no entry in the converter's
   table of pre-tokenizer hashes; ``--pre-tokenizer`` (default ``gpt-2``: a byte-level BPE with the GPT-2 split
   regex) is used only when the converter does not recognise the tokenizer.
2. ``llama-quantize`` to each of ``--quants``; bits per weight are read from the GGUF: the whole file and the
   routed experts alone (``ffn_{gate,up,down}_exps``).
3. ``llama-perplexity -c CTX`` on each ``dev.<domain>.txt``, one run per file; the relative change is against the
   F32 GGUF on the same chunks (llama-perplexity scores the second half of each chunk, so absolute values differ
   from ``bench_quality.py``'s; compare relative changes).
4. ``llama-bench`` prefill (pp) and decode (tg) tokens/s per thread count; ratios are against F32 in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DOMAINS = ("code", "docs", "quotes")

# Run as "python -c" with argv [llama_dir, pre_tokenizer, converter args...]: the converter, with a fallback
# pre-tokenizer for tokenizers whose hash it does not know.
CONVERT = """
import runpy, sys
llama, pre = sys.argv[1], sys.argv[2]
sys.path[:0] = [llama, llama + "/gguf-py"]
from conversion import base
orig = base.TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return orig(self, tokenizer)
    except NotImplementedError:
        print(f"pre-tokenizer not recognised: using {pre!r}", file=sys.stderr)
        return pre
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv = [llama + "/convert_hf_to_gguf.py"] + sys.argv[3:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run(cmd: list[str], log: Path | None = None, stdout_only: bool = False) -> str:
    """Run ``cmd``; return stdout + stderr (also written to ``log``), or stdout alone; raise on failure."""
    print("$", " ".join("<converter wrapper>" if "\n" in c else c for c in cmd), file=sys.stderr, flush=True)
    p = subprocess.run(cmd, capture_output=True, text=True)
    out = p.stdout + p.stderr
    if log is not None:
        log.write_text(out)
    if p.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({p.returncode}):\n{out[-3000:]}")
    return p.stdout if stdout_only else out


def tool(build_dir: Path, name: str) -> str:
    path = build_dir / "bin" / name
    if not path.is_file():
        raise SystemExit(f"{path} not found: build the target {name} first")
    return str(path)


def convert(llama_dir: Path, model: Path, out: Path, pre: str) -> None:
    if not out.is_file():
        args = [str(llama_dir), pre, str(model), "--outtype", "f32", "--outfile", str(out)]
        run([sys.executable, "-c", CONVERT, *args])


def bits_per_weight(llama_dir: Path, path: Path) -> tuple[float, float]:
    """(whole file, routed experts only) bits per weight of a GGUF's tensors."""
    sys.path.insert(0, str(llama_dir / "gguf-py"))
    from gguf import GGUFReader

    tensors = GGUFReader(str(path)).tensors
    experts = [t for t in tensors if "_exps" in t.name]
    whole = 8 * sum(int(t.n_bytes) for t in tensors) / sum(int(t.n_elements) for t in tensors)
    return whole, 8 * sum(int(t.n_bytes) for t in experts) / sum(int(t.n_elements) for t in experts)


def perplexity(build_dir: Path, gguf: Path, text: Path, ctx: int, threads: int, chunks: int | None, repack: bool):
    cmd = [tool(build_dir, "llama-perplexity"), "-m", str(gguf), "-f", str(text), "-c", str(ctx), "-t", str(threads)]
    cmd += (["--chunks", str(chunks)] if chunks else []) + ([] if repack else ["--no-repack"])
    out = run(cmd, gguf.with_suffix(f".{text.stem}.ppl.log"))
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", out)
    if m is None:
        raise RuntimeError(f"no final PPL in the llama-perplexity output of {gguf}")
    return float(m.group(1))


def bench(build_dir: Path, ggufs: list[Path], threads: str, pp: int, tg: int, reps: int, repack: bool) -> list[dict]:
    cmd = [
        tool(build_dir, "llama-bench"),
        "-m",
        ",".join(map(str, ggufs)),
        "-t",
        threads,
        "--repack",
        str(int(repack)),
    ]
    cmd += ["-p", str(pp), "-n", str(tg), "-r", str(reps), "-o", "json"]
    return json.loads(run(cmd, stdout_only=True))


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llama-dir", required=True, type=Path, help="llama.cpp source tree (convert_hf_to_gguf.py)")
    p.add_argument("--build-dir", type=Path, default=None, help="its CMake build folder (default: LLAMA_DIR/build)")
    p.add_argument("--model", required=True, type=Path, help="Hugging Face model folder")
    p.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data", help="dev.<domain>.txt")
    p.add_argument("--out-dir", type=Path, default=Path("/tmp/llamacpp-bench"), help="GGUFs and logs")
    p.add_argument("--quants", default="Q2_K,Q3_K_S,Q3_K_M,Q4_K_M")
    p.add_argument("--speed-quants", default="Q2_K,Q3_K_M,Q4_K_M", help="llama-bench these beside F32")
    p.add_argument("--pre-tokenizer", default="gpt-2", help="used only if the converter does not know the hash")
    p.add_argument("--ctx", type=int, default=256, help="llama-perplexity context (chunk) length")
    p.add_argument("--chunks", type=int, default=None, help="llama-perplexity chunks per file (default: all)")
    p.add_argument("--ppl-threads", type=int, default=1)
    p.add_argument("--threads", default="1,2", help="llama-bench thread counts")
    p.add_argument("--pp", type=int, default=256, help="llama-bench prompt tokens")
    p.add_argument("--tg", type=int, default=48, help="llama-bench generated tokens")
    p.add_argument("--reps", type=int, default=5, help="llama-bench repetitions")
    p.add_argument(
        "--repack",
        action="store_true",
        help="allow llama.cpp's extra buffer types (CPU repacking, AMX); off by default: on a sandboxed CPU that "
        "advertises AMX, the AMX path dies with SIGILL",
    )
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--json", type=Path, default=None, help="write the raw results here")
    args = p.parse_args(argv)

    build = args.build_dir or args.llama_dir / "build"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    f32 = args.out_dir / f"{args.model.name}-F32.gguf"
    convert(args.llama_dir, args.model, f32, args.pre_tokenizer)
    files = {"F32": f32}
    for q in args.quants.split(","):
        files[q] = args.out_dir / f"{args.model.name}-{q}.gguf"
        if not files[q].is_file():
            run([tool(build, "llama-quantize"), str(f32), str(files[q]), q], files[q].with_suffix(".quantize.log"))
    result: dict = {"files": {k: str(v) for k, v in files.items()}, "load_start": load()}
    print(f"machine: {os.cpu_count()} CPUs, {result['load_start']}\n")

    if not args.skip_quality:
        rows = []
        for name, path in files.items():
            ppl = {
                d: perplexity(
                    build, path, args.data / f"dev.{d}.txt", args.ctx, args.ppl_threads, args.chunks, args.repack
                )
                for d in DOMAINS
            }
            whole, experts = bits_per_weight(args.llama_dir, path)
            rows.append(
                {"type": name, "MiB": path.stat().st_size / 2**20, "bpw": whole, "expert_bpw": experts, "ppl": ppl}
            )
        result["quality"] = rows
        print(
            f"| type | file MiB | bpw (file) | bpw (experts) | {' | '.join(DOMAINS)} | rel. change vs F32 "
            f"({' / '.join(DOMAINS)}) |"
        )
        print("|---|---|---|---|" + "---|" * len(DOMAINS) + "---|")
        base = rows[0]["ppl"]
        for r in rows:
            rel = " / ".join(f"{100 * (r['ppl'][d] / base[d] - 1):+.2f}%" for d in DOMAINS)
            ppls = " | ".join(f"{r['ppl'][d]:.3f}" for d in DOMAINS)
            print(f"| {r['type']} | {r['MiB']:.1f} | {r['bpw']:.2f} | {r['expert_bpw']:.2f} | {ppls} | {rel} |")
        print()

    if not args.skip_speed:
        names = ["F32", *args.speed_quants.split(",")]
        result["load_speed"] = load()
        runs = bench(build, [files[n] for n in names], args.threads, args.pp, args.tg, args.reps, args.repack)
        result["speed"] = runs
        result["load_end"] = load()
        by_path = {str(v): k for k, v in files.items()}
        ts = {(by_path[r["model_filename"]], r["n_threads"], "pp" if r["n_prompt"] else "tg"): r for r in runs}
        print(
            f"llama-bench -p {args.pp} -n {args.tg} -r {args.reps}; before: {result['load_speed']}; "
            f"after: {result['load_end']}\n"
        )
        print("| type | threads | prefill tok/s | decode tok/s | prefill x F32 | decode x F32 |")
        print("|---|---|---|---|---|---|")
        for t in sorted({k[1] for k in ts}):
            for n in names:
                pp, tg = ts[(n, t, "pp")], ts[(n, t, "tg")]
                bp, bt = ts[("F32", t, "pp")]["avg_ts"], ts[("F32", t, "tg")]["avg_ts"]
                print(
                    f"| {n} | {t} | {pp['avg_ts']:.0f} ± {pp['stddev_ts']:.0f} | {tg['avg_ts']:.1f} ± "
                    f"{tg['stddev_ts']:.1f} | {pp['avg_ts'] / bp:.2f} | {tg['avg_ts'] / bt:.2f} |"
                )
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
