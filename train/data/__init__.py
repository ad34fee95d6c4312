"""Training data: MQAR (generated), packed text (prepared token files) and synthetic tokens (throughput runs).

`build_data` turns the config into a train `RowLoader` and eval sets; every batch is a function of the step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from train.config import ConfigError, TrainConfig
from train.data import mqar
from train.data.loader import HostBatch, RowLoader
from train.data.text import PackedRows, TokenFile
from train.step import IGNORE



@dataclasses.dataclass
class EvalSet:
  """Rows to evaluate in order; `groups[name]` selects rows for per-setting metrics (MQAR)."""
  name: str
  num_rows: int
  read_rows: Callable[[np.ndarray], HostBatch]
  groups: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

  def batches(self, batch_size: int, limit: int = 0, process_index: int = 0, process_count: int = 1):
    """(rows, this process's part of the batch) in order: the last batch is padded to `batch_size` by repeating
    its last row with labels ignored, and process p reads only rows [p*B/P, (p+1)*B/P) of the padded batch."""
    count = 0
    share = batch_size // process_count
    for start in range(0, self.num_rows, batch_size):
      rows = np.arange(start, min(start + batch_size, self.num_rows))
      padded = np.concatenate([rows, np.repeat(rows[-1:], batch_size - len(rows))])
      batch = self.read_rows(padded[process_index * share:(process_index + 1) * share])
      is_pad = np.arange(process_index * share, (process_index + 1) * share) >= len(rows)
      if is_pad.any():
        batch["labels"][is_pad] = IGNORE
      yield rows, batch
      count += 1
      if limit and count >= limit:
        return


@dataclasses.dataclass
class Data:
  train: RowLoader
  evals: list[EvalSet]
  vocab_size: int
  seq_len: int
  # The most labelled positions of any row, 0 where unbounded: the loss computes logits only there (exact).
  train_labels_per_row: int = 0
  eval_labels_per_row: int = 0


def _most_labels(labels: np.ndarray) -> int:
  return int((labels >= 0).sum(axis=1).max(initial=0))


def _rows_of(arrays: dict[str, np.ndarray]):
  return lambda rows: {k: v[rows] for k, v in arrays.items()}


def _synthetic_rows(vocab_size: int, seq_len: int, seed: int):
  def read(rows: np.ndarray) -> HostBatch:
    tokens = np.stack([np.random.default_rng([seed, int(r)]).integers(0, vocab_size, seq_len + 1) for r in rows])
    return dict(inputs=tokens[:, :-1].astype(np.int32), labels=tokens[:, 1:].astype(np.int32))
  return read


def _text_data(config: TrainConfig, vocab_size: int) -> Data:
  """Packed rows of a prepared directory; ConfigError when its tokens do not fit the model's vocabulary, the
  train split cannot fill a batch, or an eval split exists but is too short for one row."""
  d = config.data
  if not d.text.path:
    raise ConfigError("data.text.path: required for data.kind=text (a python -m train.prepare_data output)")
  try:
    train_file, eval_file = TokenFile(d.text.path, "train"), TokenFile(d.text.path, "eval")
  except FileNotFoundError as e:
    raise ConfigError(f"data.text.path: {e}") from None
  for split, data in (("train", train_file), ("eval", eval_file)):
    largest = data.max_token()
    if largest >= vocab_size:
      raise ConfigError(f"data.text.path: {d.text.path} holds token id {largest} in its {split} split (tokenizer "
                        f"vocabulary {data.vocab_size}), but the model's vocab_size is {vocab_size}")
  train_rows, eval_rows = (PackedRows(f, d.text.seq_len, d.text.segment_ids) for f in (train_file, eval_file))
  if train_rows.num_rows < config.batch_size:
    raise ConfigError(f"data.text.seq_len: the train split of {d.text.path} ({train_file.num_tokens:,} tokens) "
                      f"holds {train_rows.num_rows} rows of {d.text.seq_len} tokens, fewer than batch_size "
                      f"{config.batch_size}")
  evals = []
  if eval_file.num_tokens:  # an empty eval split (--eval-fraction 0) means: no eval
    if not eval_rows.num_rows:
      raise ConfigError(f"data.text.seq_len: the eval split of {d.text.path} has {eval_file.num_tokens} tokens, "
                        f"fewer than one row of {d.text.seq_len} + 1: prepare it with a larger --eval-fraction or "
                        f"train with a shorter data.text.seq_len")
    evals.append(EvalSet("text", eval_rows.num_rows, eval_rows.read))
  return Data(RowLoader(train_rows.num_rows, train_rows.read, config.batch_size, d.seed), evals,
              train_file.vocab_size, d.text.seq_len)


def build_data(config: TrainConfig, vocab_size: int) -> Data:
  """Loaders for `config.data`; `vocab_size` is the model's (tokens must fit in it)."""
  d = config.data
  if d.kind == "mqar":
    if d.mqar.vocab_size > vocab_size:
      raise ConfigError(f"data.mqar.vocab_size: {d.mqar.vocab_size} exceeds the model's vocab_size {vocab_size}")
    train = mqar.build(d.mqar, d.seed, "train")
    test = mqar.build(d.mqar, d.seed, "test")
    groups = {mqar.setting_name(s): np.nonzero(test.setting == i)[0] for i, s in enumerate(test.settings)}
    return Data(
        train=RowLoader(len(train.inputs), _rows_of(dict(inputs=train.inputs, labels=train.labels)),
                        config.batch_size, d.seed),
        evals=[EvalSet("test", len(test.inputs), _rows_of(dict(inputs=test.inputs, labels=test.labels)), groups)],
        vocab_size=d.mqar.vocab_size, seq_len=train.inputs.shape[1],
        train_labels_per_row=_most_labels(train.labels), eval_labels_per_row=_most_labels(test.labels))
  if d.kind == "text":
    return _text_data(config, vocab_size)
  if d.kind == "synthetic":
    read = _synthetic_rows(vocab_size, d.synthetic_seq_len, d.seed)
    return Data(RowLoader(2**62, read, config.batch_size, d.seed, shuffle=False), [], vocab_size,
                d.synthetic_seq_len)
  raise ConfigError(f"data.kind: {d.kind!r} is not one of mqar, text, synthetic")
