"""Calibration sources -> token windows.

Sources (``MCConfig.dataset``):
- ``None`` / ``"builtin"``: offline text shipped with every Python installation — the reference documentation
  topics of ``pydoc_data``, docstrings of standard-library modules, and standard-library source code, interleaved
  in a fixed order (identical on machines with the same Python minor version). General English prose + code, no
  network, not tuned to any evaluation text.
- a list of strings: those texts.
- a path to a text file, or to a folder (every ``*.txt`` inside, sorted).
- any other string: a ``datasets`` name (its ``train`` split's ``text`` column), when ``datasets`` is installed
  and the dataset is reachable.

Documents are tokenized, joined with the tokenizer's EOS token, and ``num_samples`` windows of ``seq_len``
tokens are drawn at seeded random offsets (a local ``torch.Generator``; no global RNG state is touched).
"""

from __future__ import annotations

import importlib
import logging
import os
import sysconfig
from pathlib import Path

import torch

from ..errors import CalibrationError

logger = logging.getLogger(__name__)

# Standard-library modules whose docstrings and source go into the builtin corpus (stable, pure-Python, varied).
_STDLIB_MODULES = (
    "argparse", "ast", "asyncio.events", "base64", "bisect", "calendar", "collections", "configparser",
    "contextlib", "csv", "dataclasses", "datetime", "decimal", "difflib", "email.message", "enum", "fractions",
    "functools", "getopt", "gettext", "heapq", "html.parser", "http.client", "inspect", "ipaddress", "json.decoder",
    "logging", "mailbox", "operator", "optparse", "pathlib", "pickle", "pprint", "queue", "random", "shlex",
    "shutil", "statistics", "string", "subprocess", "tarfile", "textwrap", "threading", "tokenize", "typing",
    "unittest.case", "urllib.parse", "uuid", "warnings", "zipfile",
)  # fmt: skip
_BUILTIN_CHARS = 2_500_000  # enough for 128 x 512 tokens with any common tokenizer


def _builtin_documents() -> list[str]:
    docs: list[str] = []
    try:
        from pydoc_data.topics import topics

        docs.extend(topics[k] for k in sorted(topics))
    except ImportError:  # pragma: no cover - stripped Python builds
        pass
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in _STDLIB_MODULES:
        try:
            mod = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a missing optional module just contributes nothing
            continue
        if mod.__doc__:
            docs.append(mod.__doc__)
        for attr in sorted(vars(mod)):
            obj = getattr(mod, attr)
            if getattr(obj, "__module__", None) == name and getattr(obj, "__doc__", None):
                docs.append(f"{attr}: {obj.__doc__}")
        src = stdlib / (name.replace(".", os.sep) + ".py")
        if src.is_file():
            docs.append(src.read_text(encoding="utf-8", errors="replace"))
    # interleave prose and code so any prefix of the corpus is mixed
    half = len(docs) // 2
    mixed = [d for pair in zip(docs[:half], docs[half:]) for d in pair] + docs[2 * half :]
    out, total = [], 0
    for d in mixed:
        out.append(d)
        total += len(d)
        if total >= _BUILTIN_CHARS:
            break
    return out


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CalibrationError(f"cannot read calibration text file {path}: {exc}; pass UTF-8 text files.") from exc


def load_documents(dataset: str | list[str] | None) -> list[str]:
    """The calibration documents of a source (see the module docstring)."""
    if dataset is None or dataset == "builtin":
        return _builtin_documents()
    if isinstance(dataset, (list, tuple)):
        return [str(t) for t in dataset]
    path = Path(dataset)
    if path.is_file():
        return [_read_text(path)]
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise CalibrationError(f"calibration folder {path} has no *.txt files.")
        return [_read_text(f) for f in files]
    try:
        import datasets
    except ImportError as exc:
        raise CalibrationError(
            f"calibration dataset {dataset!r} is not a file or folder, and the `datasets` library is not installed; "
            f"pass texts, a local path, or None for the builtin offline text."
        ) from exc
    try:
        ds = datasets.load_dataset(dataset, split="train")
    except Exception as exc:  # noqa: BLE001 - offline / unknown names end the same way for the user
        raise CalibrationError(
            f"could not load dataset {dataset!r} ({exc}); offline? pass local texts instead."
        ) from exc
    return [t for t in ds["text"] if t]


def describe_source(dataset: str | list[str] | None) -> str:
    """A short description of a calibration source for logs."""
    if dataset is None or dataset == "builtin":
        return "builtin offline text (pydoc topics, stdlib docstrings and source)"
    if isinstance(dataset, (list, tuple)):
        return f"{len(dataset)} user texts"
    return f"{dataset!r}"


def calibration_batches(
    dataset: str | list[str] | None, tokenizer, num_samples: int, seq_len: int, seed: int
) -> torch.Tensor:
    """``(num_samples, seq_len)`` token windows drawn deterministically from the source."""
    docs = [d for d in load_documents(dataset) if d and d.strip()]
    if not docs:
        raise CalibrationError(f"calibration source {describe_source(dataset)} is empty.")
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for d in docs:
        ids.extend(tokenizer(d, add_special_tokens=False)["input_ids"])
        ids.extend(sep)
    if len(ids) < seq_len:
        raise CalibrationError(
            f"calibration data has {len(ids)} tokens; need at least seq_len={seq_len} "
            f"(add text or lower MCConfig.seq_len)."
        )
    if len(ids) < num_samples * seq_len:
        logger.warning(
            "calibration data has %d tokens for %d x %d windows: windows will overlap", len(ids), num_samples, seq_len
        )
    tokens = torch.tensor(ids, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len + 1, (num_samples,), generator=g)
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])
