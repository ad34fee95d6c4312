"""`python -m train.convert hf-export --run RUN_DIR --out HF_DIR [--dtype ...]`: a jaxlm run directory whose model
is a Llama/Mistral/Qwen2-shaped Transformer -> a Hugging Face directory that transformers'
`AutoModelForCausalLM.from_pretrained(HF_DIR)` loads: config.json, safetensors shards (2 GiB each at most, with
model.safetensors.index.json when there are several), tokenizer.json when the run has one.

The run's latest checkpoint is read (a training checkpoint's params, or an imported one); tensors are fetched to
the host one at a time as their shard is written. A model these families cannot express (another mixer, a
LayerNorm, a GELU MLP, Monarch projections) is refused naming the field.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Sequence

from train.convert import ConvertError
from train.convert.hf_config import DTYPES, hf_config_from_model

# Carried over from the imported model's config.json: what generation in transformers needs to stop and pad.
TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def export_hf(run_dir: str, out_dir: str, *, dtype: str | None = None, step: int | None = None) -> dict:
  """Writes `out_dir` from the run directory `run_dir` (module docstring); returns the config.json written."""
  import jax
  import numpy as np
  from flax import nnx
  from jax import numpy as jnp

  from jaxlm.checkpoint import load_params
  from jaxlm.generate.cli import UsageError, run_model_config
  from train.convert.hf_weights import abstract_params, hf_tensors, write_safetensors

  if not os.path.isdir(run_dir):
    raise ConvertError(f"--run {run_dir}: no such directory")
  try:
    config = run_model_config(run_dir)
  except (UsageError, ValueError, OSError) as e:
    raise ConvertError(f"--run {run_dir}: {e}") from None
  dtype = dtype or config.param_dtype
  if dtype not in DTYPES:
    raise ConvertError(f"--dtype {dtype!r} not in {sorted(DTYPES)}")
  hf = hf_config_from_model(config, dtype=dtype)
  # The restore target: zeros, not a random init, whose compiled program alone takes seconds.
  graphdef, params, rest = abstract_params(config)
  model = nnx.merge(graphdef, jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), params), rest)
  try:
    load_params(model, run_dir, step)
  except (FileNotFoundError, ValueError) as e:
    raise ConvertError(f"--run {run_dir}: {e}") from None
  source = os.path.join(run_dir, "hf_config.json")
  if os.path.isfile(source):
    with open(source) as f:
      original = json.load(f)
    hf.update({k: original[k] for k in TOKEN_KEYS if k in original})
  os.makedirs(out_dir, exist_ok=True)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  write_safetensors(list(hf_tensors(config, params, np.dtype(jnp.dtype(dtype)))), out_dir, jnp.dtype(dtype))
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hf, f, indent=2)
  tokenizer = os.path.join(run_dir, "tokenizer.json")
  if os.path.isfile(tokenizer):
    shutil.copyfile(tokenizer, os.path.join(out_dir, "tokenizer.json"))
  return hf


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m train.convert hf-export", description=__doc__.split("\n\n")[0])
  p.add_argument("--run", required=True, help="a run directory (model.yaml or config.yaml, checkpoints/)")
  p.add_argument("--out", required=True, help="the Hugging Face directory to write")
  p.add_argument("--dtype", choices=sorted(DTYPES), help="dtype of the saved weights; default: the parameters'")
  p.add_argument("--step", type=int, help="the checkpoint step to export; default: the latest")
  args = p.parse_args(argv)
  try:
    hf = export_hf(args.run, args.out, dtype=args.dtype, step=args.step)
  except ConvertError as e:
    print(f"hf-export: {e}", file=sys.stderr)
    return 2
  print(f"exported {args.run} -> {args.out} ({hf['model_type']}, {hf['torch_dtype']})")
  return 0
