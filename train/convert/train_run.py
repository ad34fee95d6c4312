"""A converted model as a training run at step 0: what `--train-config CONFIG [key=value ...]` makes of hf-import's
and monarch's output, the one way a converter hands parameters to `python -m train`.

  OUT/config.yaml        CONFIG with the converted model's fields as `model` and run_dir = OUT
  OUT/model.yaml         those fields as the run builds its model (train/run_dir.py's record_run)
  OUT/checkpoints/0      the whole train state as train/run.py saves it: the converted parameters, the optimizer's
                         fresh state (what it would start from), step 0, data position 0

`python -m train --config OUT/config.yaml` then resumes at step 0 with the converted weights (fine-tuning), and
`python -m jaxlm.generate --run OUT` samples from it as from any run. The data must be tokenized with the model's
tokenizer: text data that brings another tokenizer.json is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import filecmp
import os
from typing import Any

from train.convert import ConvertError


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """--train-config CONFIG and its key=value overrides."""
  parser.add_argument("--train-config", help="a training config: write a step-0 training run of it, which "
                                             "`python -m train --config OUT/config.yaml` continues")
  parser.add_argument("overrides", nargs="*", help="dotted key=value overrides of --train-config")


def config_from_arguments(args: argparse.Namespace, parser: argparse.ArgumentParser):
  """The TrainConfig that --train-config and its overrides name, or None without --train-config."""
  if args.overrides and not args.train_config:
    parser.error(f"key=value overrides {args.overrides} need --train-config")
  if not args.train_config:
    return None
  from train.config import ConfigError, load_config
  try:
    return load_config(args.train_config, args.overrides)
  except ConfigError as e:
    raise ConvertError(f"--train-config {args.train_config}: {e}") from None


def train_config_for(train_config, fields: dict[str, Any], out_dir: str, tokenizer: str | None):
  """`train_config` training the converted model (`fields`) in `out_dir`; refuses text data tokenized with a
  tokenizer other than the model's (`tokenizer`, its tokenizer.json if any)."""
  config = dataclasses.replace(train_config, model=dict(fields), run_dir=out_dir)
  data_tokenizer = os.path.join(config.data.text.path, "tokenizer.json")
  if (config.data.kind == "text" and tokenizer and os.path.isfile(data_tokenizer) and os.path.isfile(tokenizer)
      and not filecmp.cmp(data_tokenizer, tokenizer, shallow=False)):
    raise ConvertError(f"data.text.path: {data_tokenizer} is not the model's tokenizer {tokenizer}; prepare the "
                       f"data with --tokenizer {tokenizer}")
  return config


def _leaves(tree: Any) -> dict[str, Any]:
  import jax
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {"/".join(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in flat}


def check_params_fit(params: dict, abstract: dict) -> None:
  """ConvertError naming the first parameter whose path, shape or dtype is not the training model's."""
  got, want = _leaves(params), _leaves(abstract)
  if set(got) != set(want):
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    raise ConvertError(f"converted parameters do not fit the training model: missing {missing[:4]}, "
                       f"extra {extra[:4]}")
  for path, w in want.items():
    g = got[path]
    if tuple(g.shape) != tuple(w.shape) or g.dtype != w.dtype:
      raise ConvertError(f"{path}: converted {g.dtype}{list(g.shape)} != the training model's "
                         f"{w.dtype}{list(w.shape)}")


def write_train_run(params: dict, config, out_dir: str, mesh=None) -> None:
  """OUT (module docstring) from the converted parameters (a pure dict, on any devices) and `config`, as returned
  by train_config_for; the state is placed on `mesh` (default: the config's)."""
  import jax
  from flax import nnx

  from train.checkpoint import Checkpointer
  from train.mesh import make_mesh
  from train.models import build_model
  from train.optimizer import decay_mask, make_optimizer
  from train.run_dir import record_run
  from train.state import abstract_model, create_state

  spec = build_model(config)
  abs_params = nnx.split(abstract_model(spec.model_fn), nnx.Param, ...)[1]
  check_params_fit(params, nnx.to_pure_dict(abs_params))
  mesh = make_mesh(config.mesh) if mesh is None else mesh
  # The optimizer's state does not depend on the schedule's length, so any step count builds the same state.
  optimizer = make_optimizer(config.optim, 1, decay_mask(abs_params))
  state, setup = create_state(spec.model_fn, optimizer, mesh, config.seed)
  for leaf in jax.tree.leaves(state["params"]):
    leaf.delete()  # the random init's parameters: free them before the converted ones are placed
  # Where the training state keeps each parameter (a no-op for parameters already read onto this mesh).
  state["params"] = jax.device_put(params, setup.shardings["params"])
  os.makedirs(out_dir, exist_ok=True)
  checkpointer = Checkpointer(dataclasses.replace(config.checkpoint, async_save=False), out_dir)
  try:
    checkpointer.save(0, state, {"step": 0, "seed": config.data.seed, "kind": config.data.kind, "finished": False},
                      wait=True)
  finally:
    checkpointer.close()
  if jax.process_index() == 0:
    record_run(config, out_dir)  # config.yaml, model.yaml, and the data's tokenizer.json if any
