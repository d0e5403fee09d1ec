"""Calibration data: sources (builtin / texts / file / folder / datasets name), windows, determinism, errors."""

from __future__ import annotations

import logging
import sys
import types
from pathlib import Path

import pytest
import torch
from helpers.tokenizer import MIN_VOCAB_SIZE, make_tiny_tokenizer

from optimum_mc.calibration import calibration_batches, describe_source
from optimum_mc.calibration.data import load_documents, tokenize_documents
from optimum_mc.errors import CalibrationError

REF_TOKENIZER = Path(__file__).resolve().parents[3] / "shared" / "models" / "mc-ref-mixtral"  # ../shared

TEXTS = [
    "Calibration text one: the quick brown fox jumps over the lazy dog, again and again. " * 8,
    "def f(x):\n    return [i * x for i in range(10)]\n" * 8,
    "Third document. Mixture of experts, routers and bits; a few more words to make it longer. " * 8,
]


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


def _stream(texts, tok):
    return tokenize_documents(texts, tok)


def _is_window(row: torch.Tensor, stream: list[int]) -> bool:
    row = row.tolist()
    n = len(row)
    return any(stream[i : i + n] == row for i in range(len(stream) - n + 1))


def test_list_source_shape_dtype_and_windows(tok):
    x = calibration_batches(TEXTS, tok, num_samples=6, seq_len=32, seed=0)
    assert x.shape == (6, 32) and x.dtype == torch.long
    stream = _stream(TEXTS, tok)
    assert all(_is_window(r, stream) for r in x)  # every row is a contiguous slice of the token stream
    # documents are joined with EOS (after each document), no BOS
    assert stream.count(tok.eos_token_id) == len(TEXTS) and stream[-1] == tok.eos_token_id
    assert tok.bos_token_id not in stream


def test_determinism_and_seed(tok):
    a = calibration_batches(TEXTS, tok, 8, 24, seed=123)
    b = calibration_batches(TEXTS, tok, 8, 24, seed=123)
    c = calibration_batches(TEXTS, tok, 8, 24, seed=124)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_global_rng_untouched_and_unused(tok):
    state = torch.get_rng_state()
    torch.manual_seed(1)
    a = calibration_batches(TEXTS, tok, 4, 16, seed=5)
    torch.manual_seed(2)
    before = torch.get_rng_state()
    b = calibration_batches(TEXTS, tok, 4, 16, seed=5)
    assert torch.equal(a, b)
    assert torch.equal(before, torch.get_rng_state())  # the global generator was not advanced
    torch.set_rng_state(state)


def test_file_and_folder_sources(tok, tmp_path):
    f = tmp_path / "one.txt"
    f.write_text(TEXTS[0], encoding="utf-8")
    assert load_documents(str(f)) == [TEXTS[0]]
    assert torch.equal(calibration_batches(str(f), tok, 4, 16, 0), calibration_batches([TEXTS[0]], tok, 4, 16, 0))
    assert torch.equal(calibration_batches(f, tok, 4, 16, 0), calibration_batches([TEXTS[0]], tok, 4, 16, 0))

    d = tmp_path / "corpus"
    d.mkdir()
    for name, text in zip(["b.txt", "a.txt", "c.txt"], TEXTS):
        (d / name).write_text(text, encoding="utf-8")
    (d / "ignored.md").write_text("not a .txt file", encoding="utf-8")
    (d / "sub").mkdir()
    (d / "sub" / "nested.txt").write_text("not read: only the folder's own *.txt files", encoding="utf-8")
    assert load_documents(str(d)) == [TEXTS[1], TEXTS[0], TEXTS[2]]  # a.txt, b.txt, c.txt
    assert torch.equal(
        calibration_batches(str(d), tok, 5, 20, 3), calibration_batches([TEXTS[1], TEXTS[0], TEXTS[2]], tok, 5, 20, 3)
    )
    assert "folder" in describe_source(str(d)) and "3 *.txt" in describe_source(str(d))
    assert "text file" in describe_source(str(f))


def test_utf8_bom_is_dropped(tmp_path):
    f = tmp_path / "bom.txt"
    f.write_bytes("\ufeffhello".encode())
    assert load_documents(f) == ["hello"]


@pytest.mark.parametrize("source", [[], [""], ["   \n\t  "]])
def test_empty_sources_raise(tok, source):
    with pytest.raises(CalibrationError, match=r"has 0 tokens; need at least seq_len=16"):
        calibration_batches(source, tok, 2, 16, 0)


def test_too_short_raises_and_overlap_warns(tok, caplog):
    n = len(_stream(["short text here"], tok))
    with pytest.raises(CalibrationError, match=rf"has {n} tokens; need at least seq_len={n + 1}"):
        calibration_batches(["short text here"], tok, 2, n + 1, 0)
    x = calibration_batches(["short text here"], tok, 3, n, 0)  # exactly seq_len tokens: every window is the same
    assert x.shape == (3, n) and (x == x[0]).all()
    with caplog.at_level(logging.WARNING, logger="optimum_mc.calibration.data"):
        calibration_batches(TEXTS, tok, 64, 64, 0)
    assert any("overlap heavily" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="optimum_mc.calibration.data"):
        calibration_batches(TEXTS, tok, 2, 16, 0)
    assert not caplog.records


def test_unreadable_files_raise_naming_the_file(tok, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    with pytest.raises(CalibrationError, match="latin1.txt.*not UTF-8"):
        calibration_batches(str(bad), tok, 1, 4, 0)
    binary = tmp_path / "weights.bin"
    binary.write_bytes(b"\x00\x01\x02abc" * 10)
    with pytest.raises(CalibrationError, match="weights.bin.*binary"):
        load_documents(str(binary))
    d = tmp_path / "mixed"
    d.mkdir()
    (d / "a.txt").write_text("fine", encoding="utf-8")
    (d / "b.txt").write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(CalibrationError, match=r"b\.txt"):
        load_documents(str(d))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(CalibrationError, match=r"no \*\.txt files"):
        load_documents(str(tmp_path / "empty_dir"))
    with pytest.raises(CalibrationError, match="does not exist"):
        load_documents(str(tmp_path / "missing.txt"))
    with pytest.raises(CalibrationError, match="does not exist"):
        load_documents("./no/such/calibration_folder")


def test_bad_arguments_raise(tok):
    with pytest.raises(CalibrationError, match="num_samples"):
        calibration_batches(TEXTS, tok, 0, 16, 0)
    with pytest.raises(CalibrationError, match="seq_len"):
        calibration_batches(TEXTS, tok, 2, -1, 0)
    with pytest.raises(CalibrationError, match="seed"):
        calibration_batches(TEXTS, tok, 2, 16, 0.5)
    with pytest.raises(CalibrationError, match="must be strings"):
        calibration_batches(["ok", 3], tok, 2, 16, 0)
    with pytest.raises(CalibrationError):
        load_documents(42)


def test_unknown_name_without_datasets_raises(tok, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError, installed or not
    with pytest.raises(CalibrationError, match="datasets` library is not installed"):
        calibration_batches("some-org/some-corpus", tok, 2, 16, 0)


def test_datasets_name_uses_train_text_column(tok, monkeypatch):
    calls = []

    class FakeDataset:
        column_names = ["text", "id"]

        def __getitem__(self, key):
            assert key == "text"
            return [TEXTS[0], "", None, TEXTS[1]]

    def load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        if name == "offline/missing":
            raise ConnectionError("no network")
        return FakeDataset()

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert load_documents("org/corpus:clean-v1") == [TEXTS[0], TEXTS[1]]
    assert calls == [("org/corpus", "clean-v1", "train")]
    x = calibration_batches("wikitext", tok, 3, 16, 0)
    assert torch.equal(x, calibration_batches([TEXTS[0], TEXTS[1]], tok, 3, 16, 0))
    assert calls[-1] == ("wikitext", None, "train")
    with pytest.raises(CalibrationError, match="could not be loaded.*no network"):
        load_documents("offline/missing")
    assert "datasets 'wikitext'" in describe_source("wikitext")


def test_tokenizer_without_eos_uses_blank_line(tok):
    class NoEos:
        eos_token_id = None
        sep_token_id = None

        def __call__(self, text, add_special_tokens=False, verbose=False):
            return tok(text, add_special_tokens=add_special_tokens)

    stream = tokenize_documents(["ab", "cd"], NoEos())
    sep = tok("\n\n", add_special_tokens=False)["input_ids"]
    assert stream == tok("ab")["input_ids"] + sep + tok("cd")["input_ids"] + sep


def test_tokenizer_path(tok, tmp_path):
    tok.save_pretrained(tmp_path / "tok")
    assert torch.equal(
        calibration_batches(TEXTS, str(tmp_path / "tok"), 3, 16, 0), calibration_batches(TEXTS, tok, 3, 16, 0)
    )


@pytest.fixture(scope="module")
def builtin_windows(tok):
    """256 x 512 windows of the builtin text, and the warnings logged while drawing them."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    log = logging.getLogger("optimum_mc.calibration.data")
    log.addHandler(handler)
    try:
        x = calibration_batches(None, tok, 256, 512, 0)
    finally:
        log.removeHandler(handler)
    return x, records


def test_builtin_source_is_large_enough_and_deterministic(tok, builtin_windows):
    x, warnings = builtin_windows
    assert x.shape == (256, 512) and x.dtype == torch.long
    assert not warnings  # >= 256 x 512 tokens: 128 x 512 windows (the default) need not overlap
    assert int(x.min()) >= 0 and int(x.max()) < len(tok)
    assert len({tuple(r[:16].tolist()) for r in x}) > 250  # windows spread over the corpus
    assert torch.equal(calibration_batches("builtin", tok, 256, 512, 0), x)
    docs = load_documents(None)
    assert docs == load_documents("builtin")
    text = "\n".join(docs)
    assert "def " in text and "class " in text and "return" in text  # source code
    assert " the " in text and "The " in text  # English prose
    assert describe_source(None).startswith("builtin offline text (Python 3.")


@pytest.mark.shared
@pytest.mark.skipif(not REF_TOKENIZER.is_dir(), reason="needs ../shared/models/mc-ref-mixtral")
def test_builtin_with_reference_tokenizer():
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(REF_TOKENIZER)
    x = calibration_batches(None, ref, 128, 512, 0)
    assert x.shape == (128, 512) and int(x.max()) < len(ref)


def test_tiny_tokenizer_helper():
    a, b = make_tiny_tokenizer(), make_tiny_tokenizer(400)
    assert len(a) == 320 and len(b) == 400
    assert (a.pad_token_id, a.bos_token_id, a.eos_token_id) == (0, 1, 2)
    s = "Grüße, 世界! def f(x):\n    return x ** 2  # 🙂"
    assert a.decode(a(s)["input_ids"]) == s  # byte-level: lossless
    assert a(s)["input_ids"] == make_tiny_tokenizer()(s)["input_ids"]
    with pytest.raises(ValueError):
        make_tiny_tokenizer(MIN_VOCAB_SIZE - 1)


# ------------------------------------------------------------------ datasets sources (a fake `datasets` module)


class _FakeDataset:
    def __init__(self, columns: dict[str, list]):
        self.columns = columns
        self.column_names = list(columns)

    def __getitem__(self, name):
        return self.columns[name]


@pytest.fixture
def fake_datasets(monkeypatch):
    """Replace the `datasets` library by a module whose load_dataset records its arguments (no network)."""
    calls = []

    def load_dataset(path, name=None, split=None, **kw):
        calls.append({"path": path, "name": name, "split": split, **kw})
        if path == "Salesforce/wikitext":
            return _FakeDataset({"text": ["", " = Title = \n", "First paragraph .\n", "", "Second one .\n"]})
        return _FakeDataset({"text": ["row one", "", "row two"], "content": ["c1", "c2"], "n": [1, 2]})

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_gptq_names_map_to_their_datasets(fake_datasets):
    docs = load_documents("wikitext2")
    assert fake_datasets[-1] == {"path": "Salesforce/wikitext", "name": "wikitext-2-raw-v1", "split": "train"}
    assert docs == [" = Title = \n\nFirst paragraph .\n\nSecond one ."]  # rows joined into one document
    assert load_documents("c4") == ["row one", "row two"]  # one document per non-empty row
    c4 = {
        "path": "allenai/c4",
        "name": None,
        "split": "train",
        "data_files": {"train": "en/c4-train.00000-of-01024.json.gz"},
    }
    assert fake_datasets[-1] == c4
    assert load_documents("c4-new") == ["row one", "row two"] and fake_datasets[-1] == c4  # same training shard
    calls = len(fake_datasets)
    for retired in ("ptb", "ptb-new"):
        with pytest.raises(CalibrationError, match="retired.*wikitext2"):
            load_documents(retired)
    assert len(fake_datasets) == calls  # refused before any download


def test_dataset_config_split_and_column(fake_datasets):
    assert load_documents("me/corpus", dataset_config="v2", dataset_split="validation", text_column="content") == [
        "c1",
        "c2",
    ]
    assert fake_datasets[-1] == {"path": "me/corpus", "name": "v2", "split": "validation"}
    load_documents("me/corpus:v3")  # the "name:config" form still works
    assert fake_datasets[-1] == {"path": "me/corpus", "name": "v3", "split": "train"}
    load_documents("wikitext2", dataset_split="test")  # a given option overrides the named source's default
    assert fake_datasets[-1]["split"] == "test" and fake_datasets[-1]["name"] == "wikitext-2-raw-v1"
    with pytest.raises(CalibrationError, match="no 'body' column .*text_column"):
        load_documents("me/corpus", text_column="body")


def test_dataset_options_through_mcconfig_to_calibration(fake_datasets, tok):
    from optimum_mc import MCConfig

    cfg = MCConfig(dataset="me/corpus", dataset_config="v2", text_column="content", seq_len=8)
    out = calibration_batches(cfg.dataset, tok, 2, 2, 0, **cfg.dataset_options())
    assert out.shape == (2, 2)
    assert fake_datasets[-1] == {"path": "me/corpus", "name": "v2", "split": "train"}
    again = MCConfig.from_dict(cfg.to_dict())
    assert again.dataset_options() == {"dataset_config": "v2", "dataset_split": None, "text_column": "content"}
    text = describe_source(again.dataset, **again.dataset_options())
    assert text == "datasets 'me/corpus', config 'v2' (train split, 'content' column)"


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"text_column": "content"}, "only apply to a `datasets` source"),
        ({"dataset": ["a text"], "dataset_split": "test"}, "only apply to a `datasets` source"),
        ({"dataset": "builtin", "dataset_config": "x"}, "only apply to a `datasets` source"),
        ({"dataset": "x/y:cfg", "dataset_config": "other"}, "already names a config"),
        ({"dataset": "x/y", "text_column": ""}, "non-empty string"),
        ({"dataset": "x/y", "dataset_split": 3}, "non-empty string"),
    ],
)
def test_dataset_options_are_validated(kwargs, match):
    from optimum_mc import MCConfig
    from optimum_mc.errors import MCConfigError

    with pytest.raises(MCConfigError, match=match):
        MCConfig(**kwargs)


def test_dataset_options_refused_for_a_local_file(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("hello", encoding="utf-8")
    with pytest.raises(CalibrationError, match="only apply to a `datasets` source"):
        load_documents(str(f), text_column="content")


def test_builtin_default_needs_no_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` fails
    assert len(load_documents(None)) > 10
    with pytest.raises(CalibrationError, match="`datasets` library is not installed"):
        load_documents("wikitext2")
