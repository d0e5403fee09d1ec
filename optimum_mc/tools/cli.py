"""The ``optimum-mc`` command (also ``optimum-cli mc``): quantize, eval, inspect, bench, demo.

The arguments are defined once, in ``optimum.commands.mc`` (a light module optimum-cli imports at start-up); this
module runs the commands.

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


def _check_model_path(path: str) -> str:
    if os.path.isdir(path) or "/" in path and not path.startswith((".", "/")):
        return path
    raise UsageError(f"model {path!r} not found: pass a local folder (or an owner/name Hub id)")


def _describe(qc: dict) -> str:
    if qc.get("quant_method") != "mc":
        return f"quantized with {qc.get('quant_method', 'an unknown method')!r}"
    base = f"; it was quantized from {qc['base_model']}" if qc.get("base_model") else ""
    counted = " stored" if qc.get("bits_budget") == "stored" else ""
    return f"already MC-quantized ({qc.get('bits')}{counted} average expert bits{base})"


def _refuse_quantized(path: str, what: str) -> None:
    """``quantize`` of a quantized folder: one line, before any work (issue 20)."""
    from .inspect_model import stored_quantization

    qc = stored_quantization(path)
    if qc is not None:
        raise UsageError(
            f"{path} is {_describe(qc)}: {what} needs the float model; pass the float model's folder or Hub id"
        )


def hub_options(args) -> dict:
    """``revision`` / ``trust_remote_code`` / ``token`` for both ``from_pretrained`` calls (model and tokenizer)."""
    out = {"revision": args.revision, "token": args.token}
    if args.trust_remote_code:
        out["trust_remote_code"] = True
    return {k: v for k, v in out.items() if v is not None}


def model_options(args) -> dict:
    """What ``AutoModelForCausalLM.from_pretrained`` gets from the loading flags (dtype, device map, Hub options)."""
    import torch

    out = {"dtype": "auto" if args.dtype == "auto" else getattr(torch, args.dtype), **hub_options(args)}
    if args.device_map is not None:
        out["device_map"] = args.device_map
    return out


def _load_tokenizer(path: str, args):
    from transformers import AutoTokenizer

    _check_model_path(path)
    try:
        return AutoTokenizer.from_pretrained(path, **hub_options(args))
    except OSError as exc:
        raise UsageError(f"cannot load the tokenizer of {path!r}: {str(exc).splitlines()[0]}") from exc


def _load(path: str, args, quantization_config=None, tok=None):
    from transformers import AutoModelForCausalLM

    tok = tok if tok is not None else _load_tokenizer(path, args)
    try:
        kw = {"quantization_config": quantization_config} if quantization_config is not None else {}
        model = AutoModelForCausalLM.from_pretrained(path, **model_options(args), **kw)
    except OSError as exc:
        raise UsageError(f"cannot load {path!r}: {str(exc).splitlines()[0]}") from exc
    return model.eval(), tok


def _config_from_args(args, tokenizer=None):
    import optimum_mc

    return optimum_mc.MCConfig(
        bits=args.bits,
        bits_budget=getattr(args, "bits_budget", "codes"),
        candidate_bits=args.candidate_bits,
        attn_bits=None if args.attn_bits == 0 else args.attn_bits,
        group_size=args.group_size,
        allocation=args.allocation,
        dataset=args.dataset,
        dataset_config=args.dataset_config,
        dataset_split=args.dataset_split,
        text_column=args.text_column,
        tokenizer=tokenizer,
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


def _perplexities(model, tok, texts: dict[str, str], window: int, max_windows: int | None,
                  odp: bool = False) -> dict[str, tuple[float, str]]:  # fmt: skip
    """Per text: perplexity and what it was measured on (windows, tokens, and ODP's skipped share when on)."""
    from ..errors import CalibrationError
    from ..pruning import get_odp_stats, reset_odp_stats
    from .evaluation import perplexity, token_windows

    out = {}
    for name, text in texts.items():
        try:
            windows = token_windows(tok, text, window, max_windows)
        except CalibrationError as exc:
            raise UsageError(f"{name}: {exc}") from exc
        if odp:
            reset_odp_stats(model)
        ppl = perplexity(model, windows)
        n = windows.shape[0]
        what = f"{n} window{'s' * (n != 1)} of {window} tokens, {n * (window - 1):,} tokens scored"
        if odp:
            skipped = get_odp_stats(model)["total"]["skipped_fraction"]
            what += f", ODP skipped {100 * skipped:.1f}% of expert evaluations"
        out[name] = (ppl, what)
    return out


# ----------------------------------------------------------------------------------------------- commands


def _check_output(output: str, model: str) -> Path:
    from ..errors import OutputPathError
    from ..saving import check_output_dir

    try:
        return check_output_dir(output, model if os.path.isdir(model) else None)
    except OutputPathError as exc:
        raise UsageError(f"--output: {exc}") from exc


def _push(model, tok, repo: str, out: Path, token: str | None = None, prog: str = "optimum-mc") -> int:
    try:
        model.push_to_hub(repo, token=token)
        tok.push_to_hub(repo, token=token)
    except Exception as exc:  # noqa: BLE001 - any Hub / network failure: the local save is what matters
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        print(
            f"{prog}: error: could not push to {repo!r} ({type(exc).__name__}: {first}); the model is saved in "
            f"{out}: push it later with huggingface-cli upload {repo} {out}",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_quantize(args) -> int:
    _refuse_quantized(args.model, "quantize")
    out = _check_output(args.output, args.model)  # before the (long) quantization
    eval_texts = _texts(args.eval_text or [])
    _config_from_args(args)  # every option checked before any download or load
    tok = _load_tokenizer(args.model, args)
    cfg = _config_from_args(args, tokenizer=tok)  # calibration uses this tokenizer (same revision / token)
    t0 = time.perf_counter()
    model, tok = _load(args.model, args, cfg, tok)
    seconds = time.perf_counter() - t0
    if eval_texts:
        from ..model_card import record_evaluation

        for name, (ppl, what) in _perplexities(model, tok, eval_texts, 256, None).items():
            record_evaluation(model, name, "perplexity", ppl)
            if not args.quiet:
                print(f"{name}: perplexity {ppl:.3f} ({what})")
    from ..saving import atomic_directory
    from .inspect_model import allocation_table

    with atomic_directory(out, args.model if os.path.isdir(args.model) else None) as tmp:
        model.save_pretrained(tmp, _mc_card={"location": str(out)})  # the card names --output, not the temporary
        tok.save_pretrained(tmp)
    if not args.quiet:
        print(allocation_table(model.config.quantization_config))
        print(f"quantized in {seconds:.1f}s, saved to {out}")
    if args.push_to_hub:
        if _push(model, tok, args.push_to_hub, out, args.token, args.mc_prog):
            return 1
        if not args.quiet:
            print(f"pushed to {args.push_to_hub}")
    return 0


def cmd_eval(args) -> int:
    texts = _texts(args.text or [])
    if args.dataset:
        from ..calibration.data import load_documents
        from ..errors import CalibrationError

        options = {"dataset_config": args.dataset_config, "dataset_split": args.dataset_split}
        try:
            docs = load_documents(args.dataset, text_column=args.text_column, **options)
        except CalibrationError as exc:
            raise UsageError(str(exc)) from exc
        texts[args.dataset] = "\n\n".join(docs)
    model, tok = _load(args.model, args)
    if not texts:
        from .demo import split_documents

        texts["builtin-heldout"] = "\n\n".join(split_documents()[1])
    if args.odp:
        import optimum_mc

        optimum_mc.set_odp(model, True)
    for name, (ppl, what) in _perplexities(model, tok, texts, args.window, args.max_windows, args.odp).items():
        print(f"{name}: perplexity {ppl:.3f} ({what})")
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
    from .inspect_model import stored_quantization
    from .speed import run_speed_bench

    cfg = _config_from_args(args)
    qc = stored_quantization(args.model)
    if qc is not None and qc.get("quant_method") != "mc":
        raise UsageError(f"{args.model} is {_describe(qc)}: bench takes a float model or an MC folder")
    if qc is not None:
        from ..config import MCConfig
        from ..errors import MCError

        set_ = cfg.quantization_options_set()
        if set_:
            try:
                MCConfig.from_dict(qc).check_not_requantized(set_)
            except MCError as exc:
                opts = ", ".join("--" + k.replace("_", "-") for k in sorted(set_))
                raise UsageError(
                    f"{args.model} is already MC-quantized: {opts} only apply when bench quantizes a float model "
                    "(an MC folder is measured as saved)"
                ) from exc
        cfg = None  # measured as loaded, against its own weights dequantized
    model, tok = _load(args.model, args)
    print(run_speed_bench(model, tok, args, cfg))
    return 0


def cmd_demo(args) -> int:
    from .demo_run import run_demo

    return run_demo(quiet=args.quiet)


# ----------------------------------------------------------------------------------------------- entry points

COMMANDS = {"quantize": cmd_quantize, "eval": cmd_eval, "inspect": cmd_inspect, "bench": cmd_bench, "demo": cmd_demo}


def build_parser() -> argparse.ArgumentParser:
    """The ``optimum-mc`` parser: the same arguments as ``optimum-cli mc`` (``optimum.commands.mc``)."""
    from optimum.commands.mc import OneLineErrorParser, add_arguments

    parser = OneLineErrorParser(prog="optimum-mc", description="MC quantization for MoE LLMs")
    add_arguments(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the parsed command; the exit code (module docstring)."""
    prog = getattr(args, "mc_prog", "optimum-mc")
    args.quiet = getattr(args, "quiet", False)
    if args.mc_command == "quantize":
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
        return COMMANDS[args.mc_command](args)
    except (UsageError, MCError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing was saved or left half-written", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `optimum-mc inspect OUT | head`: the reader left; end quietly, as head expects
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's own flush of stdout at exit would raise again
        return 0


def main(argv: list[str] | None = None) -> int:
    """The ``optimum-mc`` script."""
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
