"""Text batches for both stages and the perplexity eval, from a `python -m train.prepare_data` directory.

Rows are packed across documents and given to the models without segment ids: a LoLCATs mixer cannot reset its
window and state at a document boundary inside a row (LoLCATs itself trains on concatenated text), and the teacher
is run the same way so that both see the same context. Labels that start a new document stay ignored.
"""

from __future__ import annotations

import dataclasses

import jax

from train.config import DataConfig, TextDataConfig, TrainConfig
from train.data import Data, build_data


def text_data(text: TextDataConfig, batch_size: int, seed: int, vocab_size: int) -> Data:
  """train/data's packed text loader without segment ids (ConfigError naming data.text.* when the directory does
  not fit)."""
  text = dataclasses.replace(text, segment_ids=False)
  config = TrainConfig(data=DataConfig(kind="text", seed=seed, text=text), batch_size=batch_size)
  return build_data(config, vocab_size)


def device_batch(host: dict) -> dict:
  """inputs and labels [B, T] int32 committed to the first device, as every array of the stages' steps is."""
  return jax.device_put(host, jax.devices()[0])
