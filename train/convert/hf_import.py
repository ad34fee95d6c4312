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
`python -m train --config RUN_DIR/config.yaml` resumes from it (train/convert/train_run.py, shared with monarch).
Its data must be tokenized with the model's tokenizer (prepare_data --tokenizer DIR/tokenizer.json); a run whose
data brings another tokenizer.json is refused.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Sequence

import yaml

from train.convert import ConvertError, train_run
from train.convert.hf_config import DTYPES, model_fields_from_hf, read_hf_config


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
    train_config = train_run.train_config_for(train_config, fields, out_dir, tokenizer)
    mesh = make_mesh(train_config.mesh) if mesh is None else mesh  # read each parameter onto the run's mesh
  graphdef, _, rest = abstract_params(config)
  params = read_hf_params(hf_dir, config, mesh)
  model = nnx.merge(graphdef, params, rest)
  os.makedirs(out_dir, exist_ok=True)
  if train_config is None:
    save_params(model, checkpoints, step=0)
    with open(os.path.join(out_dir, "model.yaml"), "w") as f:
      yaml.safe_dump(fields, f, sort_keys=False)
  else:
    train_run.write_train_run(nnx.to_pure_dict(params), train_config, out_dir, mesh)
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
  train_run.add_arguments(p)
  args = p.parse_args(argv)
  try:
    train_config = train_run.config_from_arguments(args, p)
    model = import_hf(args.hf, args.out, dtype=args.dtype, mesh=_mesh(args.mesh), train_config=train_config)
  except ConvertError as e:
    print(f"hf-import: {e}", file=sys.stderr)
    return 2
  config = model.config
  print(f"imported {args.hf} -> {args.out}: {config.num_layers} layers, d_model {config.d_model}, vocab "
        f"{config.vocab_size}, {config.param_dtype}")
  return 0
