"""Tokenizers, one module for data preparation (train/prepare_data.py, train/data/text.py) and generation.

A tokenizer is named by a spec string: `byte` (UTF-8 bytes, vocabulary 256, nothing to train or load), a path to
a Hugging Face `tokenizers` tokenizer.json, or `bpe:<vocab>` (a byte-level BPE that `train_bpe` trains locally on
the documents being prepared; nothing is downloaded). A prepared data directory and a run directory record the
spec and keep a copy of tokenizer.json, so generation can use the tokenizer a model was trained with.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

# End-of-text tokens that generation stops at by default, in order of preference.
_EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>")


class ByteTokenizer:
  """UTF-8 bytes as tokens 0..255."""
  vocab_size = 256
  spec = "byte"
  eos_id = None

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids: Sequence[int]) -> str:
    # A model with a larger vocabulary can sample ids >= 256: they are no byte, so they are dropped.
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
  """A `tokenizers` tokenizer (tokenizer.json), e.g. the byte-level BPE that `train_bpe` makes."""

  def __init__(self, tokenizer: Any, spec: str):
    self.tokenizer, self.spec = tokenizer, spec
    self.vocab_size = tokenizer.get_vocab_size()
    self.eos_id = next((tokenizer.token_to_id(t) for t in _EOS_NAMES if tokenizer.token_to_id(t) is not None), None)

  def encode(self, text: str) -> list[int]:
    return self.tokenizer.encode(text).ids

  def decode(self, ids: Sequence[int]) -> str:
    return self.tokenizer.decode([int(i) for i in ids])

  def save(self, path: str) -> None:
    self.tokenizer.save(path)


Tokenizer = ByteTokenizer | HFTokenizer


def train_bpe(texts: Iterable[str], vocab_size: int) -> HFTokenizer:
  """A byte-level BPE trained locally on `texts`; round-trips any text exactly."""
  from tokenizers import Tokenizer as HFTokenizerCore, decoders, models, pre_tokenizers, trainers
  tok = HFTokenizerCore(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                special_tokens=[], show_progress=False)
  tok.train_from_iterator(texts, trainer=trainer)
  return HFTokenizer(tok, f"bpe:{vocab_size}")


def load_tokenizer(spec: str) -> Tokenizer:
  """`byte` or a tokenizer.json path (`bpe:<vocab>` is trained by prepare_data, not loaded); a missing or unreadable
  file raises FileNotFoundError / ValueError naming the path."""
  if spec == "byte":
    return ByteTokenizer()
  if spec.startswith("bpe:"):
    raise ValueError(f"tokenizer {spec!r}: a BPE is trained by python -m train.prepare_data; load its "
                     f"tokenizer.json (in the prepared data or run directory) instead")
  if not os.path.isfile(spec):
    raise FileNotFoundError(f"tokenizer {spec!r}: no such file (expected 'byte' or a path to a tokenizer.json)")
  try:
    from tokenizers import Tokenizer as HFTokenizerCore
  except ImportError:
    raise ValueError(f"tokenizer {spec!r}: reading tokenizer.json needs the `tokenizers` package") from None
  try:
    core = HFTokenizerCore.from_file(spec)
  except Exception as e:  # tokenizers raises a bare Exception for a malformed file
    raise ValueError(f"tokenizer {spec!r}: not a readable tokenizer.json ({e})") from None
  return HFTokenizer(core, spec)
