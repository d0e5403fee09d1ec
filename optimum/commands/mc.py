"""The command line of optimum-mc, shared by ``optimum-cli mc ...`` and the ``optimum-mc`` script.

This module only defines arguments (standard library and optimum's command base class): optimum-cli imports it at
start-up to list its commands, so torch, transformers and optimum_mc are imported only when a command runs
(``optimum_mc.tools.cli.run``).
"""

from __future__ import annotations

import argparse
import json

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo

DTYPES = ("auto", "float32", "float16", "bfloat16")
# optimum_mc.config.ALLOCATION_MODES (not imported here: this module must stay light; a test keeps them equal)
ALLOCATION_MODES = ("layer", "global", "random", "frequency", "hessian")


class OneLineErrorParser(argparse.ArgumentParser):
    """A mistake in the arguments prints one line (what is wrong, and where the usage is), not the whole usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (usage: {self.prog} -h)\n")


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


def _device_map(text: str) -> str | dict:
    """A device-map name (``auto``, ``cpu``, ``cuda:0``, ...) or a JSON object ``{"module": "device", ...}``."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty device map names nothing; e.g. auto, cpu, cuda:0 or a JSON object")
    if text.lstrip().startswith("{"):
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object ({exc})") from None
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError(f"{text!r} must be a JSON object of module -> device")
        return value
    return text


def _loading_options(p: argparse.ArgumentParser) -> None:
    """How the model (and its tokenizer) is loaded: passed to ``from_pretrained``."""
    p.add_argument(
        "--dtype", default="auto", choices=DTYPES, help="dtype of the float weights (default: the checkpoint's own)"
    )
    p.add_argument(
        "--device-map", type=_device_map, default=None, help="device map: auto, cpu, cuda:0, ... or a JSON object"
    )
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of the model")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code from the Hub")
    p.add_argument("--token", default=None, help="Hub token (default: the stored login / HF_TOKEN)")


def _quant_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bits", type=_positive_float, default=2.5, help="average expert bits (default 2.5)")
    p.add_argument(
        "--bits-budget",
        default="codes",
        choices=("codes", "stored"),
        help="what --bits counts per expert weight: codes (default) or stored (codes + fp16 scales and zeros, "
        "e.g. 2.25 stored = 2.0 code bits at group size 128)",
    )
    p.add_argument(
        "--candidate-bits",
        type=_bits_list,
        default=[1, 2, 3],
        metavar="B,B,...",
        help="bit-widths an expert may get, comma-separated from 1,2,3,4 (default 1,2,3)",
    )
    p.add_argument("--attn-bits", type=int, default=4, help="attention / dense bits; 0 keeps them float")
    p.add_argument(
        "--group-size", type=int, default=128, help="weights sharing one scale and zero point (default 128)"
    )
    p.add_argument(
        "--allocation",
        default="layer",
        choices=ALLOCATION_MODES,
        help="bit allocation: layer (MC, one integer program per MoE layer; default), global (one for the whole "
        "model), or a baseline: random, frequency (routing frequency only), hessian (GPTQ Hessian trace)",
    )
    p.add_argument(
        "--dataset",
        default=None,
        help="calibration: a text file, a folder of .txt, wikitext2, c4, or a datasets name (default: builtin)",
    )
    p.add_argument("--dataset-config", default=None, help="configuration name of a datasets calibration source")
    p.add_argument("--dataset-split", default=None, help="split of a datasets calibration source (default train)")
    p.add_argument("--text-column", default=None, help="text column of a datasets calibration source (default text)")
    p.add_argument("--num-samples", type=_positive_int, default=128, help="calibration sequences (default 128)")
    p.add_argument("--seq-len", type=_positive_int, default=512, help="tokens per calibration sequence (default 512)")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of calibration sampling and random allocation (default 0)"
    )
    p.add_argument("--odp", action="store_true", help="enable online dynamic pruning")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--quiet`` and the subcommands (quantize, eval, inspect, bench, demo) to ``parser``.

    The chosen subcommand is stored as ``args.mc_command``, the program name (for error messages) as
    ``args.mc_prog``.
    """
    parser.add_argument("--quiet", action="store_true", help="no progress bars or logs")
    parser.set_defaults(mc_prog=parser.prog)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars or logs")
    sub = parser.add_subparsers(
        dest="mc_command", metavar="{quantize,eval,inspect,bench,demo}", required=True, parser_class=OneLineErrorParser
    )

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, parents=[common])

    q = add("quantize", "quantize a model with MC and save it (with a model card)")
    q.add_argument("model", help="the float model: a local folder or a Hub id")
    _quant_options(q)
    _loading_options(q)
    q.add_argument(
        "--output", required=True, metavar="DIR", help="folder the quantized model, tokenizer and card are saved to"
    )
    q.add_argument("--push-to-hub", default=None, metavar="REPO", help="also upload to this Hub repository")
    q.add_argument(
        "--eval-text",
        action="append",
        default=None,
        metavar="FILE",
        help="UTF-8 text file whose perplexity is measured after quantizing and written into the model card "
        "(repeatable)",
    )
    e = add("eval", "perplexity (and lm-eval tasks) of a model or MC folder")
    e.add_argument("model", help="a float model or an MC folder (local folder or Hub id)")
    e.add_argument("--text", action="append", metavar="FILE", help="UTF-8 text file (repeatable)")
    e.add_argument("--dataset", default=None, help="a text file, folder, wikitext2, c4 or a datasets name")
    e.add_argument("--dataset-config", default=None, help="configuration name of a datasets source")
    e.add_argument("--dataset-split", default=None, help="split of a datasets source (default train)")
    e.add_argument("--text-column", default=None, help="text column of a datasets source (default text)")
    e.add_argument(
        "--window", type=_window, default=256, help="tokens per scored window (non-overlapping; default 256)"
    )
    e.add_argument("--max-windows", type=_positive_int, default=None, help="score at most this many windows per text")
    e.add_argument("--odp", action="store_true", help="enable online dynamic pruning (reports the skipped share)")
    e.add_argument("--lm-eval-tasks", default=None, help="comma-separated lm-eval tasks (needs lm-eval)")
    _loading_options(e)
    i = add("inspect", "bit allocation, size breakdown and ODP thresholds of an MC folder")
    i.add_argument("dir", help="a folder saved by optimum-mc")
    i.add_argument("--plot", default=None, metavar="FILE.png", help="write the allocation heatmap to this PNG")
    b = add("bench", "prefill / decode speed and memory: float vs MC vs MC+ODP")
    b.add_argument(
        "model",
        help="a float model (quantized here with the options below) or an MC folder (measured as saved, against "
        "its weights dequantized)",
    )
    _quant_options(b)
    _loading_options(b)
    b.add_argument("--prompt-len", type=_positive_int, default=256, help="prefill prompt tokens (default 256)")
    b.add_argument("--new-tokens", type=_positive_int, default=32, help="greedy decode tokens (default 32)")
    b.add_argument("--repeats", type=_positive_int, default=3, help="rounds over the variants; the best is kept")
    add("demo", "quantize the embedded demo MoE offline and show what MC does")


class MCCommand(BaseOptimumCLICommand):
    """``optimum-cli mc``: the optimum-mc commands under optimum's CLI."""

    COMMAND = CommandInfo(name="mc", help="MC mixed-precision quantization and pruning of MoE models (optimum-mc)")

    def __init__(self, subparsers=None, args=None, command=None, from_defaults_factory=False, parser=None):
        existing = None if from_defaults_factory else getattr(subparsers, "choices", {}).get(self.COMMAND.name)
        if existing is not None:
            # optimum-cli registers every register module once per sys.path entry holding it (two checkouts, or a
            # checkout on PYTHONPATH beside an install): keep the parser the first registration made
            super().__init__(subparsers, args, command, from_defaults_factory=True, parser=existing)
            return
        super().__init__(subparsers, args, command, from_defaults_factory, parser)

    @staticmethod
    def parse_args(parser: argparse.ArgumentParser) -> None:
        add_arguments(parser)

    def run(self) -> None:
        from optimum_mc.tools.cli import run

        code = run(self.args)
        if code:
            raise SystemExit(code)
