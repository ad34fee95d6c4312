"""Multi-query associative recall (MQAR), generated exactly as Zoology's `multiquery_ar` defines it.

One example of length L with k key/value pairs (Arora, Eyuboglu et al., "Zoology", 2023):

    inputs:  k1 v1 k2 v2 ... kk vk | . . k2 . . . . k1 . . ...
    labels:  -100 everywhere except at each query position, where the label is that key's value

- keys are k distinct tokens from [1, V/2), values k distinct tokens from [V/2, V);
- the region after the 2k context tokens has `space = (L - 2k) / 2` even slots; the k queries take distinct slots
  drawn without replacement with probability p(i) ∝ a·i^(a-1), i = 1..space (a = power_a = 0.01: short gaps are
  far more likely), and query j repeats key j;
- with `random_non_queries`, every remaining 0 in the inputs becomes a uniform token from [0, V).

Sampling without replacement uses Gumbel top-k (log p + Gumbel noise, keep the k largest), which draws from the
same distribution as numpy's sequential `choice(replace=False, p=p)` that Zoology calls, but vectorised.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from train.config import MQARDataConfig, MQARSetting
from train.step import IGNORE

_CHUNK = 4096  # rows per vectorised draw (bounds the [rows, V/2] noise array)


@dataclasses.dataclass(frozen=True)
class MQARData:
  inputs: np.ndarray  # [N, L] int32, right-padded with 0 to the longest setting
  labels: np.ndarray  # [N, L] int32, IGNORE outside query positions
  setting: np.ndarray  # [N] int32, index into `settings`
  settings: tuple[MQARSetting, ...]


def _top_k_in_order(scores: np.ndarray, k: int) -> np.ndarray:
  """Indices of the k largest scores per row, largest first (= the order of sequential draws)."""
  top = np.argpartition(scores, -k, axis=1)[:, -k:]
  order = np.argsort(-np.take_along_axis(scores, top, 1), axis=1)
  return np.take_along_axis(top, order, 1)


def _distinct(rng: np.random.Generator, low: int, high: int, rows: int, k: int) -> np.ndarray:
  """[rows, k] distinct uniform draws from [low, high) per row, in random order."""
  if k * k > 4 * (high - low):  # dense draw: top-k of uniform noise is a random ordered subset
    return np.concatenate([_top_k_in_order(rng.random((min(_CHUNK, rows - s), high - low)), k) + low
                           for s in range(0, rows, _CHUNK)])
  # sparse draw: rows with a repeat are drawn again (uniform over ordered distinct tuples)
  out = rng.integers(low, high, size=(rows, k))
  while True:
    ordered = np.sort(out, axis=1)
    redo = np.nonzero((ordered[:, 1:] == ordered[:, :-1]).any(axis=1))[0]
    if redo.size == 0:
      return out
    out[redo] = rng.integers(low, high, size=(redo.size, k))


def query_gap_probs(space: int, power_a: float) -> np.ndarray:
  """p(gap slot i) ∝ a·i^(a-1), i = 1..space."""
  p = power_a * np.arange(1, space + 1, dtype=np.float64) ** (power_a - 1)
  return p / p.sum()


def multiquery_ar(vocab_size: int, num_examples: int, seq_len: int, num_kv_pairs: int, seed: int | list[int],
                  power_a: float = 0.01, random_non_queries: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """(inputs, labels), each [num_examples, seq_len] int32, as Zoology's `multiquery_ar`."""
  if seq_len % 2:
    raise ValueError(f"{seq_len=} must be even")
  if vocab_size <= seq_len:
    raise ValueError(f"{vocab_size=} must exceed {seq_len=}")
  if 4 * num_kv_pairs > seq_len:
    raise ValueError(f"{num_kv_pairs=} needs seq_len >= {4 * num_kv_pairs}, got {seq_len=}")
  rng = np.random.default_rng(seed)
  n, k = num_examples, num_kv_pairs
  context = 2 * k
  half = vocab_size // 2
  keys = _distinct(rng, 1, half, n, k)
  values = _distinct(rng, half, vocab_size, n, k)

  space = (seq_len - context) // 2
  scores = np.log(query_gap_probs(space, power_a)) - np.log(-np.log(rng.random((n, space))))
  gaps = _top_k_in_order(scores, k)  # query j gets the j-th draw, as in the sequential draw

  examples = np.zeros((n, seq_len + 1), np.int64)
  examples[:, 0:context:2] = keys
  examples[:, 1:context:2] = values
  rows = np.arange(n)[:, None]
  examples[rows, context + 2 * gaps] = keys
  labels = np.full((n, seq_len + 1), IGNORE, np.int64)
  labels[rows, context + 2 * gaps + 1] = values
  inputs, labels = examples[:, :-1], labels[:, 1:]
  if random_non_queries:
    fill = rng.integers(0, vocab_size, size=inputs.shape)
    inputs = np.where(inputs == 0, fill, inputs)
  return inputs.astype(np.int32), labels.astype(np.int32)


@functools.lru_cache(maxsize=4)
def build(config: MQARDataConfig, seed: int, split: str) -> MQARData:
  """The train or test mixture: every setting generated with its own seed, padded to the longest length.
  Kept for the next call with the same arguments (read-only arrays): a sweep's runs share their data, which
  takes seconds to draw, as long as compiling their step."""
  settings = config.train if split == "train" else config.test
  if not settings:
    raise ValueError(f"data.mqar.{split}: no settings")
  length = max(s.seq_len for s in settings)
  inputs, labels, which = [], [], []
  for i, s in enumerate(settings):
    x, y = multiquery_ar(config.vocab_size, s.num_examples, s.seq_len, s.num_kv_pairs,
                         seed=[seed, 0 if split == "train" else 1, i], power_a=config.power_a,
                         random_non_queries=config.random_non_queries)
    pad = length - s.seq_len
    inputs.append(np.pad(x, ((0, 0), (0, pad))))
    labels.append(np.pad(y, ((0, 0), (0, pad)), constant_values=IGNORE))
    which.append(np.full(s.num_examples, i, np.int32))
  arrays = [np.concatenate(inputs), np.concatenate(labels), np.concatenate(which)]
  for a in arrays:
    a.flags.writeable = False
  return MQARData(*arrays, tuple(settings))


def setting_name(s: MQARSetting) -> str:
  return f"L{s.seq_len}_kv{s.num_kv_pairs}"
