"""The ``optimum-mc`` command: quantize, eval, inspect, bench, demo.

User mistakes (unknown paths, unreadable files, bad numbers, invalid options, unusable output paths) print one
line to stderr and exit with code 2, checked before any model is loaded or quantized where possible. A failed Hub
upload prints one line and exits 1 (the local save is kept); Ctrl-C prints one line and exits 130, leaving no
partial files (saves are atomic). Any other failure inside the library exits with 1 and a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path


class UsageError(Exception):
    """A mistake in the command line or its inputs (exit code 2, no traceback)."""


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return v


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return v


def _window(text: str) -> int:
    v = _positive_int(text)
    if v < 2:
        raise argparse.ArgumentTypeError(
            f"{text!r} must be >= 2 (a window predicts its tokens from the previous ones)"
        )
    return v


def _bits_list(text: str) -> list[int]:
    try:
        return [int(b) for b in text.split(",") if b]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def _check_model_path(path: str) -> str:
    if os.path.isdir(path) or "/" in path and not path.startswith((".", "/")):
        return path
    raise UsageError(f"model {path!r} not found: pass a local folder (or an owner/name Hub id)")


def _load(path: str, quantization_config=None, quiet: bool = False):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_model_path(path)
    try:
        tok = AutoTokenizer.from_pretrained(path)
        kw = {"quantization_config": quantization_config} if quantization_config is not None else {}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw)
    except OSError as exc:
        raise UsageError(f"cannot load {path!r}: {str(exc).splitlines()[0]}") from exc
    return model.eval(), tok


def _config_from_args(args):
    import optimum_mc

    return optimum_mc.MCConfig(
        bits=args.bits,
        candidate_bits=args.candidate_bits,
        attn_bits=None if args.attn_bits == 0 else args.attn_bits,
        group_size=args.group_size,
        allocation=args.allocation,
        dataset=args.dataset,
        num_samples=args.num_samples,
        seq_len=args.seq_len,
        seed=args.seed,
        odp=args.odp,
        show_progress=not args.quiet,
    )


def _texts(files: list[str]) -> dict[str, str]:
    out = {}
    for f in files:
        try:
            out[Path(f).name] = Path(f).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read text file {f}: {exc}") from exc
    return out


def _perplexities(model, tok, texts: dict[str, str], window: int, max_windows: int | None) -> dict[str, float]:
    from ..errors import CalibrationError
    from .evaluation import perplexity, token_windows

    out = {}
    for name, text in texts.items():
        try:
            out[name] = perplexity(model, token_windows(tok, text, window, max_windows))
        except CalibrationError as exc:
            raise UsageError(f"{name}: {exc}") from exc
    return out


# ----------------------------------------------------------------------------------------------- commands


def _check_output(output: str, model: str) -> Path:
    from ..errors import OutputPathError
    from ..saving import check_output_dir

    try:
        return check_output_dir(output, model if os.path.isdir(model) else None)
    except OutputPathError as exc:
        raise UsageError(f"--output: {exc}") from exc


def _push(model, tok, repo: str, out: Path) -> int:
    try:
        model.push_to_hub(repo)
        tok.push_to_hub(repo)
    except Exception as exc:  # noqa: BLE001 - any Hub / network failure: the local save is what matters
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        print(
            f"optimum-mc: error: could not push to {repo!r} ({type(exc).__name__}: {first}); the model is saved in "
            f"{out}: push it later with huggingface-cli upload {repo} {out}",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_quantize(args) -> int:
    out = _check_output(args.output, args.model)  # before the (long) quantization
    cfg = _config_from_args(args)
    t0 = time.perf_counter()
    model, tok = _load(args.model, cfg, args.quiet)
    seconds = time.perf_counter() - t0
    from ..saving import atomic_directory
    from .inspect_model import allocation_table

    with atomic_directory(out, args.model if os.path.isdir(args.model) else None) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    if not args.quiet:
        print(allocation_table(model.config.quantization_config))
        print(f"quantized in {seconds:.1f}s, saved to {out}")
    if args.push_to_hub:
        if _push(model, tok, args.push_to_hub, out):
            return 1
        if not args.quiet:
            print(f"pushed to {args.push_to_hub}")
    return 0


def cmd_eval(args) -> int:
    texts = _texts(args.text or [])
    if args.dataset:
        from ..calibration.data import load_documents
        from ..errors import CalibrationError

        try:
            texts[args.dataset] = "\n\n".join(load_documents(args.dataset))
        except CalibrationError as exc:
            raise UsageError(str(exc)) from exc
    model, tok = _load(args.model, quiet=args.quiet)
    if not texts:
        from .demo import split_documents

        texts["builtin-heldout"] = "\n\n".join(split_documents()[1])
    if args.odp:
        import optimum_mc

        optimum_mc.set_odp(model, True)
    ppl = _perplexities(model, tok, texts, args.window, args.max_windows)
    for name, v in ppl.items():
        print(f"{name}: perplexity {v:.3f}")
    if args.lm_eval_tasks:
        _lm_eval(model, tok, args.lm_eval_tasks)
    return 0


def _lm_eval(model, tok, tasks: str) -> None:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as exc:
        raise UsageError("--lm-eval-tasks needs lm-eval: pip install lm-eval") from exc
    res = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok), tasks=tasks.split(","))
    print(json.dumps(res["results"], indent=2, default=str))


def _fmt(t) -> str:
    import math

    ok = isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t)
    return f"{t:.3f}" if ok else "n/a"


def _check_plot(path: str | None) -> None:
    if path is None:
        return
    parent = Path(path).absolute().parent
    if Path(path).is_dir() or not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UsageError(f"cannot write --plot {path}: pass a PNG file path inside an existing, writable folder")


def cmd_inspect(args) -> int:
    _check_plot(args.plot)
    from .inspect_model import load_quant_config, plot_allocation, size_breakdown

    path = Path(args.dir)
    if not (path / "config.json").exists():
        raise UsageError(f"{path} is not a model folder (no config.json)")
    cfg = load_quant_config(path)
    if cfg is None:
        raise UsageError(f"{path} is not an MC-quantized model (no quantization_config with quant_method 'mc')")
    from .inspect_model import allocation_table

    print(allocation_table(cfg))
    print()
    print(size_breakdown(path, cfg))
    if cfg.odp_thresholds:
        print("\nODP thresholds per MoE layer: " + ", ".join(_fmt(t) for t in cfg.odp_thresholds))
    if args.plot:
        try:
            plot_allocation(cfg, args.plot)
        except OSError as exc:
            raise UsageError(f"cannot write --plot {args.plot}: {exc.strerror or exc}") from exc
        print(f"allocation heatmap written to {args.plot}")
    return 0


def cmd_bench(args) -> int:
    from .speed import run_speed_bench

    model, tok = _load(args.model, quiet=args.quiet)
    print(run_speed_bench(model, tok, args, _config_from_args(args)))
    return 0


def cmd_demo(args) -> int:
    from .demo_run import run_demo

    return run_demo(quiet=args.quiet)


# ----------------------------------------------------------------------------------------------- parser


def _quant_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bits", type=_positive_float, default=2.5, help="average expert bits (default 2.5)")
    p.add_argument("--candidate-bits", type=_bits_list, default=[1, 2, 3])
    p.add_argument("--attn-bits", type=int, default=4, help="attention / dense bits; 0 keeps them float")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--allocation", default="layer", choices=["layer", "global", "random", "frequency"])
    p.add_argument("--dataset", default=None, help="calibration: a text file, a folder of .txt, or a datasets name")
    p.add_argument("--num-samples", type=_positive_int, default=128)
    p.add_argument("--seq-len", type=_positive_int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--odp", action="store_true", help="enable online dynamic pruning")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="optimum-mc", description="MC quantization for MoE LLMs")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or logs")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars or logs")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, parents=[common])

    q = add("quantize", "quantize a model with MC and save it")
    q.add_argument("model")
    _quant_options(q)
    q.add_argument("--output", required=True)
    q.add_argument("--push-to-hub", default=None, metavar="REPO")
    q.set_defaults(func=cmd_quantize)
    e = add("eval", "perplexity (and lm-eval tasks) of a model or MC folder")
    e.add_argument("model")
    e.add_argument("--text", action="append", help="UTF-8 text file (repeatable)")
    e.add_argument("--dataset", default=None)
    e.add_argument("--window", type=_window, default=256)
    e.add_argument("--max-windows", type=_positive_int, default=None)
    e.add_argument("--odp", action="store_true")
    e.add_argument("--lm-eval-tasks", default=None, help="comma-separated lm-eval tasks (needs lm-eval)")
    e.set_defaults(func=cmd_eval)
    i = add("inspect", "bit allocation, size breakdown and ODP thresholds of an MC folder")
    i.add_argument("dir")
    i.add_argument("--plot", default=None, metavar="FILE.png")
    i.set_defaults(func=cmd_inspect)
    b = add("bench", "prefill / decode speed and memory: float vs MC vs MC+ODP")
    b.add_argument("model")
    _quant_options(b)
    b.add_argument("--prompt-len", type=_positive_int, default=256)
    b.add_argument("--new-tokens", type=_positive_int, default=32)
    b.set_defaults(func=cmd_bench)
    d = add("demo", "quantize the embedded demo MoE offline and show what MC does")
    d.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.quiet = getattr(args, "quiet", False)
    if args.command == "quantize":
        # a dedicated quantization process: oneDNN's and torch's per-shape primitive caches grow with every new
        # GEMM shape (each expert's token count is one) and are never reused here (docs/scale.md)
        os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "0")
        os.environ.setdefault("LRU_CACHE_CAPACITY", "1")
    if args.quiet:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        logging.disable(logging.WARNING)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    from ..errors import MCError

    try:
        return args.func(args)
    except (UsageError, MCError) as exc:
        print(f"optimum-mc: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("optimum-mc: interrupted; nothing was saved or left half-written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
