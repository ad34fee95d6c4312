"""`python -m train.convert hf-import --hf DIR --out RUN_DIR [--dtype float32|bfloat16|float16]`: a local Hugging
Face Llama/Mistral/Qwen2 directory (config.json + safetensors shards, tokenizer.json) -> a jaxlm run directory:

  RUN_DIR/model.yaml               our ModelConfig fields (hf_config.py)
  RUN_DIR/checkpoints/0/params     the parameters, as jaxlm/checkpoint.py's save_params writes and load_params reads
  RUN_DIR/tokenizer.json           copied from DIR when there is one
  RUN_DIR/hf_config.json           DIR's config.json as it was (hf-export carries its token ids over)

so `python -m jaxlm.generate --run RUN_DIR --prompt ...` samples from it. `--mesh data,fsdp,tensor` places each
parameter on that mesh as it is read (never a whole copy on one device); the checkpoint is written from there.

With `--train-config CONFIG [key=value ...]` the run directory is instead a training run at step 0, ready to
fine-tune: RUN_DIR/config.yaml is CONFIG with the imported model (and run_dir = RUN_DIR), and the checkpoint
holds the whole train state (the imported parameters, fresh optimizer state, step 0) on CONFIG's mesh, so
`python -m train --config RUN_DIR/config.yaml` resumes from it. Its data must be tokenized with the model's
tokenizer (prepare_data --tokenizer DIR/tokenizer.json); a run whose data brings another tokenizer.json is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import filecmp
import json
import os
import shutil
import sys
from collections.abc import Sequence

import yaml

from train.convert import ConvertError
from train.convert.hf_config import DTYPES, model_fields_from_hf, read_hf_config


def _write_train_state(params, config, out_dir: str, mesh) -> None:
  """A step-0 train checkpoint of `params` for the training config `config`, as train/run.py saves and resumes."""
  import jax
  from flax import nnx

  from train.checkpoint import Checkpointer
  from train.models import build_model
  from train.optimizer import decay_mask, make_optimizer
  from train.state import abstract_model, create_state

  spec = build_model(config)
  abs_params = nnx.split(abstract_model(spec.model_fn), nnx.Param, ...)[1]
  # The optimizer's state does not depend on the schedule's length, so any step count builds the same state.
  optimizer = make_optimizer(config.optim, 1, decay_mask(abs_params))
  state, _ = create_state(spec.model_fn, optimizer, mesh, config.seed)
  for leaf in jax.tree.leaves(state["params"]):
    leaf.delete()  # the random init's parameters: free them before the checkpoint is written
  state["params"] = nnx.to_pure_dict(params)  # the same shardings: both follow train/mesh.py's rules
  checkpointer = Checkpointer(dataclasses.replace(config.checkpoint, async_save=False), out_dir)
  try:
    checkpointer.save(0, state, {"step": 0, "seed": config.data.seed, "kind": config.data.kind, "finished": False},
                      wait=True)
  finally:
    checkpointer.close()


def import_hf(hf_dir: str, out_dir: str, *, dtype: str | None = None, mesh=None, train_config=None):
  """Converts `hf_dir` into the run directory `out_dir` (module docstring); returns the LM, its parameters on
  `mesh` (or the default device; with `train_config`, its mesh). Refuses an `out_dir` that already holds a
  checkpoint."""
  from flax import nnx

  from jaxlm.checkpoint import save_params
  from jaxlm.models.config import ModelConfig
  from train.convert.hf_weights import abstract_params, read_hf_params

  hf = read_hf_config(hf_dir)
  fields = model_fields_from_hf(hf, dtype=dtype, where=os.path.join(hf_dir, "config.json"))
  config = ModelConfig.from_dict(fields)
  checkpoints = os.path.join(out_dir, "checkpoints")
  if os.path.isdir(checkpoints) and os.listdir(checkpoints):
    raise ConvertError(f"--out {out_dir}: already holds checkpoints; choose a new directory")
  tokenizer, run_tokenizer = os.path.join(hf_dir, "tokenizer.json"), os.path.join(out_dir, "tokenizer.json")
  if train_config is not None:
    from train.mesh import make_mesh
    from train.run_dir import record_run
    train_config = dataclasses.replace(train_config, model=fields, run_dir=out_dir)
    data_tokenizer = os.path.join(train_config.data.text.path, "tokenizer.json")
    if (train_config.data.kind == "text" and os.path.isfile(data_tokenizer) and os.path.isfile(tokenizer)
        and not filecmp.cmp(data_tokenizer, tokenizer, shallow=False)):
      raise ConvertError(f"data.text.path: {data_tokenizer} is not the model's tokenizer {tokenizer}; prepare the "
                         f"data with --tokenizer {tokenizer}")
    mesh = make_mesh(train_config.mesh) if mesh is None else mesh
  graphdef, _, rest = abstract_params(config)
  params = read_hf_params(hf_dir, config, mesh)
  model = nnx.merge(graphdef, params, rest)
  os.makedirs(out_dir, exist_ok=True)
  if train_config is None:
    save_params(model, checkpoints, step=0)
    with open(os.path.join(out_dir, "model.yaml"), "w") as f:
      yaml.safe_dump(fields, f, sort_keys=False)
  else:
    _write_train_state(params, train_config, out_dir, mesh)
    record_run(train_config, out_dir)  # config.yaml, model.yaml, and the data's tokenizer.json if any
  with open(os.path.join(out_dir, "hf_config.json"), "w") as f:
    json.dump(hf, f, indent=2)
  if os.path.isfile(tokenizer) and not os.path.isfile(run_tokenizer):
    shutil.copyfile(tokenizer, run_tokenizer)
  return model


def _mesh(text: str | None):
  if not text:
    return None
  from train.config import ConfigError, MeshConfig
  from train.mesh import make_mesh
  try:
    data, fsdp, tensor = (int(x) for x in text.split(","))
    return make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor))
  except (ValueError, ConfigError) as e:
    raise ConvertError(f"--mesh {text}: expected data,fsdp,tensor sizes whose product is the device count ({e})"
                       ) from None


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m train.convert hf-import", description=__doc__.split("\n\n")[0])
  p.add_argument("--hf", required=True, help="a Hugging Face model directory (config.json, *.safetensors)")
  p.add_argument("--out", required=True, help="the run directory to write")
  p.add_argument("--dtype", choices=sorted(DTYPES), help="parameter and compute dtype; default: the checkpoint's")
  p.add_argument("--mesh", help="data,fsdp,tensor: place parameters sharded on this mesh while reading")
  p.add_argument("--train-config", help="a training config: write a step-0 training run of it (module docstring)")
  p.add_argument("overrides", nargs="*", help="dotted key=value overrides of --train-config")
  args = p.parse_args(argv)
  if args.overrides and not args.train_config:
    p.error(f"key=value overrides {args.overrides} need --train-config")
  try:
    train_config = None
    if args.train_config:
      from train.config import ConfigError, load_config
      try:
        train_config = load_config(args.train_config, args.overrides)
      except ConfigError as e:
        raise ConvertError(f"--train-config {args.train_config}: {e}") from None
    model = import_hf(args.hf, args.out, dtype=args.dtype, mesh=_mesh(args.mesh), train_config=train_config)
  except ConvertError as e:
    print(f"hf-import: {e}", file=sys.stderr)
    return 2
  config = model.config
  print(f"imported {args.hf} -> {args.out}: {config.num_layers} layers, d_model {config.d_model}, vocab "
        f"{config.vocab_size}, {config.param_dtype}")
  return 0
