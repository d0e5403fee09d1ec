"""What int8 decode activations (``decode_activations="int8"``) cost in quality: perplexity scored in decode mode.

    python scripts/bench_int8_quality.py ../shared/models/mc-ref-mixtral ../shared/data/dev.code.txt ...

int8 activations apply only to decode steps, so an ordinary (prefill) perplexity cannot see them: here every window
is fed one token at a time through the KV cache, as ``generate`` does, and the next-token log-likelihoods are
collected. Variants: the float model, the MC-shaped model (2/3-bit experts by round-to-nearest, 2.5 mean; 4-bit
attention; the same modules as an MC 2.5 checkpoint) with float activations, and the same with int8 activations.
The int8 row's change vs the float-activation row is the cost of the rounding; a paired interval over windows
says whether it is distinguishable from zero.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import quantize_rtn  # noqa: E402

from optimum_mc.nn.experts import set_decode_activations  # noqa: E402
from optimum_mc.tools.evaluation import token_windows  # noqa: E402


@torch.no_grad()
def decode_nll(model, window: torch.Tensor) -> float:
    """Mean next-token NLL of one window, fed one token per forward through a KV cache."""
    cache, total = DynamicCache(), 0.0
    for t in range(window.numel() - 1):
        out = model(input_ids=window[t : t + 1].view(1, 1), cache=cache, use_cache=True)  # fills cache in place
        total -= torch.log_softmax(out.logits[0, -1].float(), -1)[window[t + 1]].item()
    return total / (window.numel() - 1)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("texts", nargs="+", help="held-out text files (one result row group per file)")
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--max-windows", type=int, default=8)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="the models' dtype")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model)
    dtype = getattr(torch, args.dtype)
    f32 = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    mc = quantize_rtn(copy.deepcopy(f32)).to(dtype)  # quantized from fp32 weights, then run in ``dtype``
    f32 = f32.to(dtype)
    set_decode_activations(mc, "float")  # explicit: the default ("auto") takes int8 for bf16 models
    mc8 = copy.deepcopy(mc)
    set_decode_activations(mc8, "int8")
    variants = {"float": f32, "MC 2.5 float activations": mc, "MC 2.5 int8 activations": mc8}
    print(f"model {args.model} in {args.dtype}; windows of {args.window} tokens scored in decode mode\n")
    print("| text | variant | decode-mode perplexity | int8 vs float activations (95% paired interval) |")
    print("|---|---|---|---|")
    for path in args.texts:
        windows = token_windows(tok, Path(path).read_text(), args.window, args.max_windows)
        nll = {name: [decode_nll(m, w) for w in windows] for name, m in variants.items()}
        diffs = [a - b for a, b in zip(nll["MC 2.5 int8 activations"], nll["MC 2.5 float activations"])]
        mean = statistics.fmean(diffs)
        half = 1.96 * statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
        for name in variants:
            ppl = math.exp(statistics.fmean(nll[name]))
            note = ""
            if name == "MC 2.5 int8 activations":
                lo, mid, hi = (100 * math.expm1(v) for v in (mean - half, mean, mean + half))
                note = f"{mid:+.3f}% [{lo:+.3f}, {hi:+.3f}]"
            print(f"| {Path(path).name} | {name} | {ppl:.3f} | {note} |")


if __name__ == "__main__":
    main()
