"""`python -m train.convert monarch --run DIR --out OUT [--nblocks 4] [--attention]`: a trained model with dense
GELU MLPs -> the same model with Monarch MLPs (the Monarch paper's dense-to-sparse step, Dao et al. 2022 §3.4).

Each dense map W [out, in] (nnx.Linear's kernel is Wᵀ) is replaced by the Monarch factors closest to it in
Frobenius norm: every [out/nb, in/nb] sub-block by its truncated SVD of rank Q/nb, the width MonarchLinear's
factors have (pallas_kernels/monarch/reference.py, dense_to_monarch). Biases, norms, embeddings and every other
parameter are copied; with --attention the q/k/v/out projections are projected too. The relative Frobenius error
‖W − Monarch‖ / ‖W‖ of every map and layer is printed and written to OUT/monarch_errors.json.

OUT gets model.yaml (DIR's with `mlp: monarch`, `mlp_nblocks`), checkpoints/0/params (jaxlm.checkpoint's
save_params: what `python -m jaxlm.generate --run OUT` loads) and DIR's tokenizer.json.

With `--train-config CONFIG [key=value ...]` OUT is instead a training run at step 0 (train/convert/train_run.py,
as hf-import writes): config.yaml is CONFIG with the Monarch model, and checkpoints/0 the whole train state (the
projected parameters, fresh optimizer state), so `python -m train --config OUT/config.yaml` fine-tunes the Monarch
model from the projection, the paper's dense-to-sparse fine-tuning.

SwiGLU MLPs are refused: jaxlm's Monarch MLP (jaxlm/layers/mlp.py) is the ungated GELU one, so a gated model has no
Monarch counterpart to project onto.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from train.convert import ConvertError, train_run

_MLP_MAPS = ("fc1", "fc2")
_ATTENTION_MAPS = ("q_proj", "k_proj", "v_proj", "out_proj")


def monarch_fields(fields: dict[str, Any], nblocks: int, attention: bool) -> dict[str, Any]:
  """The model fields of the Monarch model: the GELU MLP's maps (and the attention projections) Monarch."""
  if fields.get("mlp") != "gelu":
    raise ConvertError(f"mlp={fields.get('mlp')!r}: only GELU MLPs convert (the Monarch MLP is GPT-2's GELU MLP "
                       f"with Monarch maps; there is no gated Monarch MLP for a SwiGLU one)")
  out = dict(fields, mlp="monarch", mlp_nblocks=nblocks)
  if attention:
    options = dict(out.get("mixer_options") or {})
    attn = dict(options.get("attention") or {})
    if attn.get("projection", "dense") != "dense":
      raise ConvertError(f"mixer_options.attention.projection={attn['projection']!r} is not dense")
    options["attention"] = dict(attn, projection="monarch", nblocks=nblocks)
    out["mixer_options"] = options
  return out


def project_map(kernel_IO: jax.Array, w1_shape: tuple[int, ...], w2_shape: tuple[int, ...]
                ) -> tuple[jax.Array, jax.Array, np.ndarray]:
  """(w1, w2, relative error) of the dense kernel [..., in, out] (leading axes: stacked layers), the factors
  shaped as MonarchLinear's (w1 [..., K, Q, P], w2 [..., L, S, R])."""
  from pallas_kernels.monarch import reference

  nblocks, block_mid = w1_shape[-3], w1_shape[-2]
  if block_mid % nblocks:
    raise ConvertError(f"Monarch factors {w1_shape}: block width {block_mid} is not a multiple of {nblocks=}, so "
                       f"no sub-block rank gives these shapes")
  rank = block_mid // nblocks
  dense_MN = jnp.swapaxes(kernel_IO, -1, -2).astype(jnp.float32)
  project = lambda d: reference.dense_to_monarch(d, nblocks, rank)  # noqa: E731
  flat = dense_MN.reshape(-1, *dense_MN.shape[-2:])
  w1, w2 = jax.vmap(project)(flat)
  back = jax.vmap(reference.monarch_to_dense)(w1, w2)
  error = jnp.linalg.norm(flat - back, axis=(-2, -1)) / jnp.maximum(jnp.linalg.norm(flat, axis=(-2, -1)), 1e-30)
  lead = dense_MN.shape[:-2]
  w1, w2 = w1.reshape(*lead, *w1.shape[1:]), w2.reshape(*lead, *w2.shape[1:])
  if w1.shape != tuple(w1_shape) or w2.shape != tuple(w2_shape):
    raise ConvertError(f"projected factors {w1.shape}, {w2.shape} do not fit the model's {w1_shape}, {w2_shape}")
  return w1.astype(kernel_IO.dtype), w2.astype(kernel_IO.dtype), np.asarray(error).reshape(lead)


def convert_params(dense: dict, target: dict, maps: Sequence[str]) -> tuple[dict, dict[str, list[float]]]:
  """The Monarch model's params (pure dicts, `target` giving its shapes) from the dense model's, and the relative
  error of every projected map by path (one value per stacked layer)."""
  errors: dict[str, list[float]] = {}

  def walk(src: Any, tgt: Any, path: tuple) -> Any:
    if isinstance(tgt, dict):
      if "w1" in tgt and "w2" in tgt and path and path[-1] in maps:
        if not isinstance(src, dict) or "kernel" not in src:
          raise ConvertError(f"{'/'.join(map(str, path))}: the dense model has no kernel here")
        w1, w2, error = project_map(src["kernel"], tgt["w1"].shape, tgt["w2"].shape)
        errors["/".join(map(str, path))] = [float(e) for e in np.ravel(error)]
        out = {"w1": w1, "w2": w2}
        if "bias" in tgt:
          out["bias"] = src["bias"]
        return out
      if not isinstance(src, dict) or set(src) != set(tgt):
        raise ConvertError(f"{'/'.join(map(str, path)) or 'params'}: dense keys {sorted(src)} != Monarch keys "
                           f"{sorted(tgt)}")
      return {k: walk(src[k], tgt[k], (*path, k)) for k in tgt}
    if tuple(src.shape) != tuple(tgt.shape):
      raise ConvertError(f"{'/'.join(map(str, path))}: dense shape {src.shape} != Monarch shape {tgt.shape}")
    return src

  return walk(dense, target, ()), errors


def _model(fields: dict[str, Any], *, abstract: bool = False):
  """The LM of `fields`; `abstract`: shapes only (nnx.eval_shape), for a model whose every parameter is replaced."""
  from flax import nnx

  from jaxlm.models.config import ModelConfig
  from jaxlm.models.lm import LM
  build = lambda: LM(ModelConfig.from_dict(fields), rngs=nnx.Rngs(0))  # noqa: E731
  with nnx.use_eager_sharding(False):
    return nnx.eval_shape(build) if abstract else build()


def convert_run(run_dir: str, out_dir: str, *, nblocks: int = 4, attention: bool = False,
                train_config=None) -> dict[str, list[float]]:
  """Writes OUT (module docstring; a step-0 training run of `train_config` when given) from the run directory's
  latest checkpoint; returns the errors by map."""
  from flax import nnx

  from jaxlm.checkpoint import load_params, save_params

  fields_path = os.path.join(run_dir, "model.yaml")
  if not os.path.isfile(fields_path):
    raise ConvertError(f"--run {run_dir}: no model.yaml")
  with open(fields_path) as f:
    fields = yaml.safe_load(f)
  checkpoints = os.path.join(out_dir, "checkpoints")
  if os.path.isdir(checkpoints) and os.listdir(checkpoints):
    raise ConvertError(f"--out {out_dir}: already holds checkpoints; choose a new directory")
  new_fields = monarch_fields(fields, nblocks, attention)
  tokenizer = os.path.join(run_dir, "tokenizer.json")
  if train_config is not None:  # refused before any conversion work when its data has another tokenizer
    train_config = train_run.train_config_for(train_config, new_fields, out_dir, tokenizer)
  dense_model = _model(fields)
  step = load_params(dense_model, run_dir)
  monarch_model = _model(new_fields, abstract=True)  # the random init would be overwritten: skip it
  maps = _MLP_MAPS + (_ATTENTION_MAPS if attention else ())
  params = nnx.state(monarch_model, nnx.Param)
  converted, errors = convert_params(nnx.to_pure_dict(nnx.state(dense_model, nnx.Param)), nnx.to_pure_dict(params),
                                     maps)
  os.makedirs(out_dir, exist_ok=True)
  if train_config is None:
    nnx.replace_by_pure_dict(params, converted)
    nnx.update(monarch_model, params)
    save_params(monarch_model, checkpoints, step=0)
    with open(os.path.join(out_dir, "model.yaml"), "w") as f:
      yaml.safe_dump(new_fields, f, sort_keys=False)
  else:
    train_run.write_train_run(converted, train_config, out_dir)
  with open(os.path.join(out_dir, "monarch_errors.json"), "w") as f:
    json.dump({"run": os.path.abspath(run_dir), "step": step, "nblocks": nblocks, "relative_error": errors}, f,
              indent=2)
  run_tokenizer = os.path.join(out_dir, "tokenizer.json")
  if os.path.isfile(tokenizer) and not os.path.isfile(run_tokenizer):  # record_run may have copied the data's
    shutil.copyfile(tokenizer, run_tokenizer)
  return errors


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m train.convert monarch", description=__doc__.split("\n\n")[0])
  p.add_argument("--run", required=True, help="a run directory with dense GELU MLPs (model.yaml, checkpoints)")
  p.add_argument("--out", required=True, help="the run directory to write")
  p.add_argument("--nblocks", type=int, default=4, help="Monarch blocks per factor")
  p.add_argument("--attention", action="store_true", help="also project the attention q/k/v/out projections")
  train_run.add_arguments(p)
  args = p.parse_args(argv)
  try:
    errors = convert_run(args.run, args.out, nblocks=args.nblocks, attention=args.attention,
                         train_config=train_run.config_from_arguments(args, p))
  except (ConvertError, ValueError, FileNotFoundError) as e:
    print(f"monarch: {e}", file=sys.stderr)
    return 2
  print("relative Frobenius error ‖W − Monarch(W)‖ / ‖W‖ per map (one value per layer):")
  for path, values in errors.items():
    print(f"  {path}: " + " ".join(f"{v:.4f}" for v in values))
  if args.train_config:
    print(f"wrote {args.out}: a step-0 training run; continue it with "
          f"`python -m train --config {os.path.join(args.out, 'config.yaml')}`")
  else:
    print(f"wrote {args.out} (model.yaml, checkpoints/0/params, monarch_errors.json)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
