"""Tokenized text on disk and the packing loader over it.

A prepared directory (`python -m train.prepare_data`) holds, per split (`train`, `eval`):
  <split>.bin        all documents' tokens back to back, uint16 (vocab <= 65536) or uint32, memory-mapped
  <split>.docs.npy   int64 [num_docs + 1] document start offsets into <split>.bin (last = total tokens)
and `meta.json` (dtype, vocab size, tokenizer spec), plus `tokenizer.json` for BPE tokenizers.

Packing: row r of length T covers tokens [r·T, r·T + T + 1) of the stream (inputs = first T, labels = last T),
so no token is padding. `segment_ids` number the documents inside a row from 1, letting attention and the
recurrent mixers reset at boundaries, and a label whose token starts a new document is ignored (nothing before it
in its own document predicts it).
"""

from __future__ import annotations

import json
import os

import numpy as np

from jaxlm.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer
from train.step import IGNORE


def load_prepared_tokenizer(directory: str) -> Tokenizer:
  """The tokenizer a prepared directory was made with."""
  meta = read_meta(directory)
  if meta["tokenizer"] == "byte":
    return ByteTokenizer()
  return load_tokenizer(os.path.join(directory, "tokenizer.json"))


def read_meta(directory: str) -> dict:
  path = os.path.join(directory, "meta.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: not a prepared data directory (run python -m train.prepare_data)")
  with open(path) as f:
    return json.load(f)


class TokenFile:
  """One split: the memory-mapped token stream and its document offsets."""

  def __init__(self, directory: str, split: str):
    meta = read_meta(directory)
    self.vocab_size = meta["vocab_size"]
    self._max_token = meta.get("splits", {}).get(split, {}).get("max_token")  # absent in older directories
    self.tokens = np.memmap(os.path.join(directory, f"{split}.bin"), dtype=meta["dtype"], mode="r")
    self.doc_starts = np.load(os.path.join(directory, f"{split}.docs.npy"))

  def document(self, i: int) -> np.ndarray:
    return np.asarray(self.tokens[self.doc_starts[i]:self.doc_starts[i + 1]])

  @property
  def num_docs(self) -> int:
    return len(self.doc_starts) - 1

  @property
  def num_tokens(self) -> int:
    return int(self.doc_starts[-1])  # the .bin holds one dummy token when a split is empty

  def max_token(self) -> int:
    """The largest token id (-1 when empty): from meta.json, or for directories prepared before it was recorded,
    read in slices so that a large file never sits in memory whole."""
    if self._max_token is not None:
      return self._max_token
    chunk, largest = 1 << 24, -1
    for start in range(0, self.num_tokens, chunk):
      largest = max(largest, int(self.tokens[start:min(start + chunk, self.num_tokens)].max()))
    return largest


class PackedRows:
  """Fixed-length rows over a `TokenFile`; `read(rows)` returns inputs, labels and (if `segment_ids`)
  segment_ids [n, T] int32."""

  def __init__(self, data: TokenFile, seq_len: int, segment_ids: bool = True):
    self.data, self.seq_len, self.segment_ids = data, seq_len, segment_ids
    self.num_rows = max((data.num_tokens - 1) // seq_len, 0)

  def read(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    t = self.seq_len
    offsets = rows[:, None] * t + np.arange(t + 1)
    tokens = np.stack([np.asarray(self.data.tokens[r * t:r * t + t + 1]) for r in rows]).astype(np.int32)
    doc = np.searchsorted(self.data.doc_starts, offsets, side="right")
    labels = np.where(doc[:, 1:] == doc[:, :-1], tokens[:, 1:], IGNORE)
    batch = dict(inputs=tokens[:, :-1], labels=labels.astype(np.int32))
    if self.segment_ids:
      batch["segment_ids"] = (doc[:, :-1] - doc[:, :1] + 1).astype(np.int32)
    return batch
