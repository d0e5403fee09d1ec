"""A tiny byte-level BPE tokenizer built offline, in memory (no Hub, no files), for tests and tiny models.

Special tokens: ``<pad>`` = 0, ``<s>`` (BOS) = 1, ``</s>`` (EOS) = 2 — the ids the tiny test model configs use.
Byte-level: any text round-trips through encode/decode. Training is deterministic (same vocabulary in every
process, whatever ``PYTHONHASHSEED``).
"""

from __future__ import annotations

import functools

# Original sentences (prose and code) to learn merges from; written for these tests.
TRAINING_TEXT = (
    "The river runs past the old mill, and the miller counts the sacks of grain before the sun goes down.\n",
    "A small lamp burns in the window while the rain keeps tapping on the roof all night long.\n",
    "Experts in a mixture share the work: a router sends every token to the two that fit it best.\n",
    "Fewer bits per weight save memory; careful rounding keeps the answers close to the original ones.\n",
    "She planted beans in April, watered them each morning, and picked the first pods in early July.\n",
    "Numbers such as 3, 14, 159 and 2026 appear in tables, dates, prices and page counts.\n",
    "def mean(values):\n    total = sum(values)\n    return total / len(values) if values else 0.0\n",
    "for index, item in enumerate(items):\n    if item is None:\n        continue\n    print(index, item)\n",
    "class Counter:\n    def __init__(self):\n        self.count = 0\n\n"
    "    def step(self, n=1):\n        self.count += n\n",
    "import json\nwith open('data.json') as handle:\n    data = json.load(handle)\nprint(data['name'])\n",
    'Questions, answers, lists; quotes "like these" and (brackets) [too] {all} <here> - fine!\n',
)

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # the byte alphabet plus the special tokens


@functools.lru_cache(maxsize=8)
def _tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(TRAINING_TEXT) * 4, trainer)
    return tok.to_str()


def make_tiny_tokenizer(vocab_size: int = 320):
    """A fresh ``PreTrainedTokenizerFast`` (byte-level BPE, ``len(tok) <= vocab_size``).

    ``len(tok) == vocab_size`` for ``vocab_size`` up to about 600 (the merges the training text allows). Saves and
    loads with ``save_pretrained`` / ``AutoTokenizer.from_pretrained`` and pushes to a (mock) Hub like any
    tokenizer. Raises ``ValueError`` below ``MIN_VOCAB_SIZE`` (256 bytes + 3 special tokens).
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be at least {MIN_VOCAB_SIZE} (byte alphabet + specials), got {vocab_size}")
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size)),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
