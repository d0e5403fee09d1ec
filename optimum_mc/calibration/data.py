"""Calibration sources -> token windows.

Sources (``MCConfig.dataset``):

- ``None`` / ``"builtin"``: offline text that ships with every Python installation — the reference documentation
  topics of ``pydoc_data``, docstrings of a fixed list of standard-library modules, and those modules' source
  code, interleaved in a fixed order (English prose + code; no network; not tuned to any evaluation text). The text
  is a function of the Python build only: it is identical on machines running the same Python version (the same
  minor version gives the same text up to the small documentation/source edits of patch releases), whatever else
  has been imported, whatever ``PYTHONHASHSEED``.
- a list of strings: those texts, one document each.
- a path to a text file (one document), or to a folder (every ``*.txt`` directly inside it, sorted by name; one
  document each). Files must be UTF-8 text; anything else raises :class:`CalibrationError` naming the file.
- ``"wikitext2"`` / ``"c4"`` / ``"c4-new"``: the sources GPTQ tooling calls by these names (``NAMED_SOURCES``:
  wikitext-2-raw's train split joined into one document; the first shard of C4's English train split, one
  document per row). ``"ptb"`` / ``"ptb-new"``, retired upstream, raise :class:`CalibrationError` at once.
- any other string: a ``datasets`` name, optionally ``"name:config"`` (e.g. ``"wikitext:wikitext-2-raw-v1"``) —
  the ``text`` column of its ``train`` split unless ``MCConfig(dataset_config=..., dataset_split=...,
  text_column=...)`` say otherwise, when the ``datasets`` library is installed and the dataset is reachable (or
  cached).

Every document is tokenized without special tokens and followed by the tokenizer's EOS token (its SEP token, or
the tokens of a blank line, when it has no EOS); the concatenation is the token stream. ``num_samples`` windows of
``seq_len`` tokens start at offsets drawn uniformly from a local ``torch.Generator`` seeded with ``seed``: the same
source, tokenizer and seed give the same windows, and no global RNG state is read or changed. A stream shorter than
``num_samples * seq_len`` tokens forces windows to overlap (logged as a warning); one shorter than ``seq_len``
raises :class:`CalibrationError`.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import sys
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..errors import CalibrationError

logger = logging.getLogger(__name__)

__all__ = [
    "NAMED_SOURCES",
    "DatasetSource",
    "calibration_batches",
    "dataset_source",
    "describe_source",
    "load_documents",
    "tokenize_documents",
]

# Standard-library modules whose docstrings and source go into the builtin corpus (stable, pure-Python, varied).
_STDLIB_MODULES = (
    "argparse", "ast", "asyncio.events", "base64", "bisect", "calendar", "collections", "configparser",
    "contextlib", "csv", "dataclasses", "datetime", "decimal", "difflib", "email.message", "enum", "fractions",
    "functools", "getopt", "gettext", "heapq", "html.parser", "http.client", "inspect", "ipaddress", "json.decoder",
    "logging", "mailbox", "operator", "optparse", "pathlib", "pickle", "pprint", "queue", "random", "shlex",
    "shutil", "statistics", "string", "subprocess", "tarfile", "textwrap", "threading", "tokenize", "typing",
    "unittest.case", "urllib.parse", "uuid", "warnings", "zipfile",
)  # fmt: skip
_BUILTIN_CHARS = 2_500_000  # enough for 128 x 512 tokens with common tokenizers (~760k tokens with a 4096-entry BPE)
_BUILTIN_NAMES = ("builtin",)


def _is_builtin(dataset) -> bool:
    return dataset is None or (isinstance(dataset, str) and dataset in _BUILTIN_NAMES)


def _docstrings_of(name: str, mod) -> list[str]:
    """The module docstring, then ``"attr: doc"`` of every attribute defined in ``name`` itself, by attribute name."""
    docs = [mod.__doc__] if mod.__doc__ else []
    for attr in sorted(vars(mod)):
        try:
            obj = getattr(mod, attr)
            owner, doc = getattr(obj, "__module__", None), getattr(obj, "__doc__", None)
        except Exception:  # noqa: BLE001 - exotic attributes just contribute nothing
            continue
        # only objects defined by the module itself: attributes other libraries attach at runtime do not count.
        # A non-string __doc__ (a class's member descriptor, e.g. typing._SpecialForm) is kept as its str() for
        # compatibility with earlier corpora, unless that text would hold a memory address.
        if owner == name and doc and (isinstance(doc, str) or " at 0x" not in str(doc)):
            docs.append(f"{attr}: {doc}")
    return docs


@functools.lru_cache(maxsize=1)
def _builtin_corpus() -> tuple[str, ...]:
    docs: list[str] = []
    try:
        from pydoc_data.topics import topics

        docs.extend(topics[k] for k in sorted(topics))
    except ImportError:  # pragma: no cover - stripped Python builds
        logger.warning("pydoc_data is not available: the builtin calibration text has no documentation topics")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in _STDLIB_MODULES:
        try:
            mod = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a missing optional module just contributes nothing
            continue
        docs.extend(_docstrings_of(name, mod))
        src = stdlib / (name.replace(".", os.sep) + ".py")
        if src.is_file():
            docs.append(src.read_text(encoding="utf-8", errors="replace"))
    # interleave prose (first half: topics, docstrings) and code so that any prefix of the corpus is mixed
    half = len(docs) // 2
    mixed = [d for pair in zip(docs[:half], docs[half:]) for d in pair] + docs[2 * half :]
    out, total = [], 0
    for d in mixed:
        out.append(d)
        total += len(d)
        if total >= _BUILTIN_CHARS:
            break
    return tuple(out)


def _builtin_documents() -> list[str]:
    """The builtin offline corpus (built once per process, then cached)."""
    return list(_builtin_corpus())


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CalibrationError(f"cannot read calibration text file {path}: {exc}") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CalibrationError(
            f"calibration file {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); pass UTF-8 text files."
        ) from exc
    if "\x00" in text:
        raise CalibrationError(f"calibration file {path} looks binary (contains NUL bytes); pass UTF-8 text files.")
    return text.removeprefix("\ufeff")


@dataclass(frozen=True)
class DatasetSource:
    """A ``datasets`` source: what ``datasets.load_dataset`` is called with and which column holds the text.

    ``joined``: the rows are consecutive pieces (lines, paragraphs) of longer documents, joined with blank lines into
    one document (wikitext's rows are paragraphs and headings of articles); otherwise each row is a document.
    """

    path: str
    config: str | None = None
    split: str = "train"
    column: str = "text"
    data_files: dict[str, str] | None = None
    joined: bool = False


# The names GPTQ tooling (e.g. optimum's gptq.data.get_dataset) understands, as datasets sources.
NAMED_SOURCES = {
    "wikitext2": DatasetSource("Salesforce/wikitext", "wikitext-2-raw-v1", joined=True),
    "c4": DatasetSource("allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}),
    "c4-new": DatasetSource("allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}),
}
# Names GPTQ tooling once knew and has retired (their Hub loading script no longer runs): a clear error, not a
# failed download.
RETIRED_SOURCES = ("ptb", "ptb-new")


def dataset_source(
    name: str, config: str | None = None, split: str | None = None, column: str | None = None
) -> DatasetSource:
    """The source ``name`` stands for: a known name (``NAMED_SOURCES``) or ``"path"`` / ``"path:config"``; the
    given ``config`` / ``split`` / ``column`` override its defaults."""
    if name in RETIRED_SOURCES:
        raise CalibrationError(
            f"calibration dataset {name!r}: the Penn Treebank loader was retired by the datasets Hub and GPTQ "
            f"tooling (optimum's get_dataset refuses it too); pass 'wikitext2', 'c4', a datasets path, local texts, "
            f"or None for the builtin offline text."
        )
    base = NAMED_SOURCES.get(name)
    if base is None:
        path, _, cfg = name.partition(":")
        base = DatasetSource(path, cfg or None)
    return replace(
        base,
        config=config if config is not None else base.config,
        split=split if split is not None else base.split,
        column=column if column is not None else base.column,
    )


def _load_hf_dataset(src: DatasetSource, name: str) -> list[str]:
    try:
        import datasets
    except ImportError as exc:
        raise CalibrationError(
            f"calibration dataset {name!r} is not an existing file or folder (looked for {Path(name).absolute()}), "
            "and the `datasets` library is not installed to load it by name; pass a list of texts, a local .txt "
            "file or folder, or None for the builtin offline text."
        ) from exc
    kw = {"data_files": dict(src.data_files)} if src.data_files else {}
    try:
        ds = datasets.load_dataset(src.path, src.config, split=src.split, **kw)
    except Exception as exc:  # noqa: BLE001 - offline / unknown names end the same way for the user
        raise CalibrationError(
            f"calibration dataset {name!r} is not a file/folder and could not be loaded with datasets "
            f"({type(exc).__name__}: {exc}); offline? pass local texts or None for the builtin offline text."
        ) from exc
    if src.column not in ds.column_names:
        raise CalibrationError(
            f"dataset {name!r} (split {src.split!r}) has no {src.column!r} column (columns: {ds.column_names}); "
            f"pass text_column=... (--text-column) naming the text column."
        )
    rows = [t for t in ds[src.column] if isinstance(t, str) and t]
    return ["\n\n".join(r.strip("\n") for r in rows)] if src.joined else rows


def load_documents(
    dataset: str | os.PathLike | Sequence[str] | None,
    dataset_config: str | None = None,
    dataset_split: str | None = None,
    text_column: str | None = None,
) -> list[str]:
    """The calibration documents of a source (see the module docstring); the last three apply to datasets only."""
    options = {"dataset_config": dataset_config, "dataset_split": dataset_split, "text_column": text_column}
    given = [k for k, v in options.items() if v is not None]
    if isinstance(dataset, dict):
        raise CalibrationError(
            "this MCConfig holds only the record (count and sha256) of the calibration texts it was made with, "
            "not the texts; pass dataset=... (the texts, a path or a datasets name) to calibrate again."
        )
    if given and not (isinstance(dataset, str) and not _is_builtin(dataset) and not Path(dataset).exists()):
        raise CalibrationError(
            f"{', '.join(given)} only apply to a `datasets` source, not to {describe_source(dataset)}."
        )
    if _is_builtin(dataset):
        return _builtin_documents()
    if isinstance(dataset, (list, tuple)):
        bad = [i for i, t in enumerate(dataset) if not isinstance(t, str)]
        if bad:
            raise CalibrationError(
                f"calibration texts must be strings; item {bad[0]} is {type(dataset[bad[0]]).__name__}."
            )
        return list(dataset)
    if not isinstance(dataset, (str, os.PathLike)):
        raise CalibrationError(
            f"calibration dataset must be None, 'builtin', a list of texts, a path or a datasets name; "
            f"got {type(dataset).__name__}."
        )
    path = Path(dataset).expanduser()
    if path.is_file():
        return [_read_text(path)]
    if path.is_dir():
        files = sorted(p for p in path.glob("*.txt") if p.is_file())
        if not files:
            raise CalibrationError(f"calibration folder {path} has no *.txt files.")
        return [_read_text(f) for f in files]
    if isinstance(dataset, os.PathLike) or path.is_absolute() or str(dataset).startswith(("~", "./", "../")):
        raise CalibrationError(f"calibration file or folder {path} does not exist.")
    return _load_hf_dataset(dataset_source(str(dataset), dataset_config, dataset_split, text_column), str(dataset))


def describe_source(dataset: str | os.PathLike | Sequence[str] | None, **dataset_options: str | None) -> str:
    """A short description of a calibration source for logs (cheap: reads nothing); ``dataset_options`` as for
    :func:`load_documents`."""
    if _is_builtin(dataset):
        version = ".".join(map(str, sys.version_info[:3]))
        return f"builtin offline text (Python {version} pydoc topics, stdlib docstrings and source)"
    if isinstance(dataset, (list, tuple)):
        chars = sum(len(t) for t in dataset if isinstance(t, str))
        return f"{len(dataset)} user text{'s' if len(dataset) != 1 else ''} ({chars} characters)"
    if isinstance(dataset, (str, os.PathLike)):
        path = Path(dataset).expanduser()
        if path.is_file():
            return f"text file {path}"
        if path.is_dir():
            return f"folder {path} ({sum(1 for p in path.glob('*.txt') if p.is_file())} *.txt files)"
        o = dataset_options
        src = dataset_source(str(dataset), o.get("dataset_config"), o.get("dataset_split"), o.get("text_column"))
        cfg = f", config {src.config!r}" if src.config else ""
        return f"datasets {src.path!r}{cfg} ({src.split} split, {src.column!r} column)"
    if isinstance(dataset, dict):
        return f"{dataset.get('texts')} recorded texts (sha256 {str(dataset.get('sha256'))[:12]}...)"
    return repr(dataset)


def _separator_ids(tokenizer) -> list[int]:
    for attr in ("eos_token_id", "sep_token_id"):
        tid = getattr(tokenizer, attr, None)
        if isinstance(tid, int):
            return [tid]
    return list(tokenizer("\n\n", add_special_tokens=False)["input_ids"])


def tokenize_documents(docs: Sequence[str], tokenizer) -> list[int]:
    """One token stream: each non-blank document's tokens (no special tokens), each followed by the separator."""
    docs = [d for d in docs if d and d.strip()]
    if not docs:
        return []
    sep = _separator_ids(tokenizer)
    # verbose=False: long documents are fine here (they are cut into windows), no "longer than max length" warning
    encoded = tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]
    ids: list[int] = []
    for d in encoded:
        ids.extend(d)
        ids.extend(sep)
    return ids


def token_stream(docs: Sequence[str], tokenizer, chunk: int = 32) -> torch.Tensor:
    """:func:`tokenize_documents` as an int64 tensor, built ``chunk`` documents at a time (a Python list of every
    token would cost ~36 bytes a token at the peak; the tensor costs 8)."""
    parts = [
        torch.tensor(tokenize_documents(docs[i : i + chunk], tokenizer), dtype=torch.long)
        for i in range(0, len(docs), chunk)
    ]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CalibrationError(f"{name} must be a positive integer, got {value!r}.")
    return value


def calibration_batches(
    dataset: str | os.PathLike | Sequence[str] | None,
    tokenizer,
    num_samples: int,
    seq_len: int,
    seed: int,
    **dataset_options: str | None,
) -> torch.Tensor:
    """``(num_samples, seq_len)`` int64 token windows drawn deterministically (from ``seed``) from the source.

    ``tokenizer`` is a transformers tokenizer (or a path/name for ``AutoTokenizer.from_pretrained``);
    ``dataset_options``: ``dataset_config`` / ``dataset_split`` / ``text_column`` (see :func:`load_documents`).
    """
    _positive_int("num_samples", num_samples)
    _positive_int("seq_len", seq_len)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise CalibrationError(f"seed must be an integer, got {seed!r}.")
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    ids = token_stream(load_documents(dataset, **dataset_options), tokenizer)
    if len(ids) < seq_len:
        raise CalibrationError(
            f"calibration data has {len(ids)} tokens; need at least seq_len={seq_len} "
            f"(source: {describe_source(dataset)}; add text or lower MCConfig.seq_len)."
        )
    needed = num_samples * seq_len
    if len(ids) < needed:
        logger.warning(
            "calibration data has %d tokens for %d windows of %d (%d tokens): windows overlap%s",
            len(ids),
            num_samples,
            seq_len,
            needed,
            " heavily; add calibration text or lower num_samples" if 2 * len(ids) < needed else "",
        )
    tokens = ids
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len + 1, (num_samples,), generator=g)
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])


def resolve_tokenizer(model: torch.nn.Module, tok=None):
    """The tokenizer for calibration: ``tok`` (object or path) or the model's own."""
    from transformers import AutoTokenizer

    if tok is not None and not isinstance(tok, str):
        return tok
    path = tok or getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - any failure means the same fix for the user
        raise CalibrationError(
            f"could not load a tokenizer for calibration from {path!r} ({exc}); pass MCConfig(tokenizer=...)."
        ) from exc
