"""Text batches for both stages and the perplexity eval, from a `python -m train.prepare_data` directory.

Rows are packed across documents and given to the models without segment ids: a LoLCATs mixer cannot reset its
window and state at a document boundary inside a row (LoLCATs itself trains on concatenated text), and the teacher
is run the same way so that both see the same context. Labels that start a new document stay ignored.
"""

from __future__ import annotations

import jax

from train.config import DataConfig, TextDataConfig, TrainConfig
from train.data import Data, build_data


def text_data(text: TextDataConfig, batch_size: int, seed: int, vocab_size: int) -> Data:
  """train/data's packed text loader (ConfigError naming data.text.* when the directory does not fit)."""
  config = TrainConfig(data=DataConfig(kind="text", seed=seed, text=text), batch_size=batch_size)
  return build_data(config, vocab_size)


def device_batch(host: dict) -> dict:
  """inputs and labels [B, T] int32 committed to the first device, as every array of the stages' steps is (segment
  ids dropped: module docstring)."""
  return jax.device_put({k: host[k] for k in ("inputs", "labels")}, jax.devices()[0])
