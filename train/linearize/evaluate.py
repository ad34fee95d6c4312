"""Held-out perplexity of a run directory's model (teacher, either stage, or any jaxlm LM):

  python -m train.linearize eval --run DIR --data DATA_DIR [--seq-len 1024] [--batch-size 8] [--batches 0]

exp(mean token cross-entropy) over the eval split of a prepared data directory, packed rows without segment ids
(train/linearize/data.py), so teacher and linearized models are scored on the same context. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from collections.abc import Sequence

import jax
from flax import nnx

from train.config import ConfigError, TextDataConfig
from train.data import EvalSet
from train.linearize.data import device_batch, text_data
from train.linearize.finetune import token_loss
from train.linearize.models import load_run


@functools.lru_cache(maxsize=8)
def _loss_sums(graph: nnx.GraphDef, loss_chunk: int):
  """The jitted (state, batch) -> (summed loss, tokens), one per model structure: the stages' models share it."""
  return jax.jit(lambda state, batch: token_loss(nnx.merge(graph, state), batch["inputs"], batch["labels"],
                                                 loss_chunk))


def perplexity(model, eval_set: EvalSet, batch_size: int, batches: int = 0, loss_chunk: int = 0) -> dict:
  """loss (mean nats per labelled token), perplexity and the token count over the first `batches` batches (0: all)."""
  graph, state = nnx.split(model)
  state = jax.device_put(state, jax.devices()[0])  # committed, as the batches are
  sums = _loss_sums(graph, loss_chunk)
  total, tokens = 0.0, 0.0
  for _, host in eval_set.batches(batch_size, batches):
    loss_sum, count = sums(state, device_batch(host))
    total, tokens = total + float(loss_sum), tokens + float(count)
  loss = total / max(tokens, 1.0)
  return dict(loss=loss, perplexity=math.exp(min(loss, 50.0)), tokens=int(tokens))


def eval_run(run_dir: str, text: TextDataConfig, batch_size: int, batches: int, compute_dtype: str = "float32"
             ) -> dict:
  model = load_run(run_dir, compute_dtype)
  data = text_data(text, batch_size, 0, model.config.vocab_size)
  if not data.evals:
    raise ConfigError(f"--data {text.path}: no eval split (prepare it with --eval-fraction > 0)")
  return perplexity(model, data.evals[0], batch_size, batches)


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m train.linearize eval", description=__doc__.split("\n\n")[0])
  p.add_argument("--run", required=True, help="a run directory (model.yaml + checkpoints)")
  p.add_argument("--data", required=True, help="a python -m train.prepare_data directory with an eval split")
  p.add_argument("--seq-len", type=int, default=1024)
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--batches", type=int, default=0, help="at most this many batches; 0 = the whole eval split")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
  args = p.parse_args(argv)
  try:
    result = eval_run(args.run, TextDataConfig(args.data, args.seq_len), args.batch_size, args.batches, args.dtype)
  except (ConfigError, FileNotFoundError, ValueError) as e:
    print(f"linearize eval: {e}", file=sys.stderr)
    return 2
  print(json.dumps(dict(run=args.run, **result)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
