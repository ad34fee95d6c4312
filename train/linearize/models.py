"""Teacher and student: the imported Transformer, and the same model with every attention layer a LoLCATs mixer.

The student's config is the teacher's with `mixers: lolcats` and the attention's heads, head dim, RoPE and biases
carried over, so its q/k/v/out projections have the names and shapes of the teacher's and every teacher parameter
loads into it as it is; the student's own parameters are only `TRANSFER_PARAMS` (the feature maps and the
window factor of each layer). A teacher whose attention LoLCATs cannot mirror (RoPE scaling, q/k/v-only biases,
Monarch projections, a soft-cap, learned positions) is refused naming the key.

Both models keep float32 parameters (the adapters and feature maps train in float32) and compute in the recipe's
`compute_dtype`.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Any

import jax
import yaml
from flax import nnx

from jaxlm.checkpoint import load_params, save_params
from jaxlm.models.config import ModelConfig, load_model_config
from jaxlm.models.lm import LM
from train.config import ConfigError

TRANSFER_PARAMS = ("feature_q_HDF", "feature_k_HDF", "window_factor_H")
ATTENTIONS = ("attention", "sliding_window")


def is_transfer_param(path: tuple[Any, ...], _variable: Any) -> bool:
  """nnx filter: what attention transfer trains (the parameters a LoLCATs mixer has and Attention lacks)."""
  return bool(path) and path[-1] in TRANSFER_PARAMS


def load_teacher(run_dir: str, compute_dtype: str) -> LM:
  """The run directory's model (model.yaml and its latest checkpoint), float32 parameters."""
  path = os.path.join(run_dir, "model.yaml")
  if not os.path.isfile(path):
    raise ConfigError(f"teacher: {run_dir} is not a run directory (no model.yaml; make one with python -m "
                      f"train.convert hf-import --out DIR)")
  config = dataclasses.replace(load_model_config(path), dtype=compute_dtype, param_dtype="float32")
  model = LM(config, rngs=nnx.Rngs(0))
  load_params(model, run_dir)
  return model


def student_config(teacher: ModelConfig, lolcats: dict[str, Any]) -> ModelConfig:
  """The teacher's config with every attention layer a LoLCATs mixer of the same projections (module docstring)."""
  kinds = sorted(set(teacher.mixers))
  if any(kind not in ATTENTIONS for kind in kinds):
    raise ConfigError(f"teacher: mixers {kinds}: only models whose every layer is attention linearize")
  if teacher.position_embedding != "none":
    raise ConfigError(f"teacher: position_embedding={teacher.position_embedding!r}: LoLCATs needs RoPE models")
  options: dict[str, Any] = {}
  for kind in kinds:
    attention = teacher.mixer_configs()[kind]
    for key, bad in (("rope_scaling", attention.rope_scaling is not None), ("projection",
                     attention.projection != "dense"), ("softcap", attention.softcap is not None),
                     ("qkv_bias", attention.qkv_bias not in (None, attention.use_bias))):
      if bad:
        raise ConfigError(f"teacher: mixer_options.{kind}.{key}={getattr(attention, key)!r} has no LoLCATs "
                          f"counterpart")
    mirrored = dict(num_heads=attention.num_heads, num_kv_heads=attention.kv_heads(),
                    head_dim=attention.resolved_head_dim(), rotary_dim=attention.resolved_rotary_dim(),
                    rope_base=attention.rope_base, use_bias=attention.use_bias)
    if options and options != mirrored:
      raise ConfigError(f"teacher: its attention layers differ ({kinds}); one LoLCATs mixer cannot mirror them")
    options = mirrored
  fields = teacher.to_dict()
  fields.update(mixers="lolcats", mixer_options={"lolcats": {**options, **lolcats}},
                implementation={k: v for k, v in fields["implementation"].items() if not k.startswith("attention")})
  try:
    return ModelConfig.from_dict(fields)
  except ValueError as e:
    raise ConfigError(f"lolcats: {e}") from None


def student_from_teacher(teacher: LM, lolcats: dict[str, Any], seed: int) -> LM:
  """The student with every teacher parameter copied in; only TRANSFER_PARAMS are its own (at their init)."""
  student = LM(student_config(teacher.config, lolcats), rngs=nnx.Rngs(seed))
  _, own, _ = nnx.split(student, is_transfer_param, ...)
  teacher_params = nnx.state(teacher, nnx.Param)
  nnx.update(student, teacher_params)  # same paths and shapes: the student's projections are the teacher's
  nnx.update(student, own)
  return student


def copy_tokenizer(src_run: str, dst_run: str) -> None:
  path = os.path.join(src_run, "tokenizer.json")
  if os.path.isfile(path):
    shutil.copyfile(path, os.path.join(dst_run, "tokenizer.json"))


def save_run(model: LM, run_dir: str, step: int, tokenizer_from: str) -> None:
  """A run directory `python -m jaxlm.generate --run` and `python -m train.linearize eval` load: model.yaml, the
  parameters at checkpoints/<step>, the teacher's tokenizer.json. Refuses a directory that holds checkpoints."""
  checkpoints = os.path.join(run_dir, "checkpoints")
  if os.path.isdir(checkpoints) and os.listdir(checkpoints):
    raise ConfigError(f"out: {run_dir} already holds checkpoints; choose a new directory")
  os.makedirs(run_dir, exist_ok=True)
  save_params(model, checkpoints, step=step)
  with open(os.path.join(run_dir, "model.yaml"), "w") as f:
    yaml.safe_dump(model.config.to_dict(), f, sort_keys=False)
  copy_tokenizer(tokenizer_from, run_dir)


def load_run(run_dir: str, compute_dtype: str) -> LM:
  """A saved run directory's model (the teacher's or a stage's), float32 parameters."""
  return load_teacher(run_dir, compute_dtype)


def num_params(state: Any) -> int:
  return sum(x.size for x in jax.tree.leaves(state))
