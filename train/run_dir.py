"""What a run directory holds besides checkpoints and logs, so that it describes itself:

  config.yaml     the resolved training config (`python -m train --config runs/<name>/config.yaml` repeats it)
  model.yaml      the model's ModelConfig fields (`python -m jaxlm.generate --config runs/<name>/model.yaml`)
  tokenizer.json  the tokenizer of text data prepared with one (absent: byte tokens)

They are written only once the run has been built and its checkpoint (if any) restored, so a run that cannot
start leaves an existing directory untouched. Resuming with settings that change what the checkpoint means (the
model, the data, the optimizer, the seed, the batch) is refused before anything is built, naming the keys.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import yaml

from train.config import ConfigError, TrainConfig, load_config, save_config, to_dict
from train.models import model_fields

# Top-level keys that may differ when a run resumes: how long and how it is logged, evaluated, saved, laid out.
RESUME_MAY_CHANGE = ("name", "run_dir", "steps", "epochs", "eval_every", "eval_batch_size", "eval_batches",
                     "early_stop_accuracy", "max_nonfinite_steps", "micro_batches", "remat", "loss_chunk", "log",
                     "checkpoint", "mesh")


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(data, dict):
    out = {}
    for key, value in data.items():
      out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out
  return {prefix: data}


def changed_keys(old: TrainConfig, new: TrainConfig) -> list[str]:
  """'key: old -> new' for every setting that differs and may not change on resume."""
  a = {k: v for k, v in to_dict(old).items() if k not in RESUME_MAY_CHANGE}
  b = {k: v for k, v in to_dict(new).items() if k not in RESUME_MAY_CHANGE}
  a, b = _flat(a), _flat(b)
  keys = sorted(set(a) | set(b), key=lambda k: (k.count("."), k))  # the broadest settings first
  return [f"{k}: {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}" for k in keys if a.get(k) != b.get(k)]


def _has_checkpoints(run_dir: str) -> bool:
  directory = os.path.join(run_dir, "checkpoints")
  return os.path.isdir(directory) and any(d.isdigit() for d in os.listdir(directory))


def check_resumable(config: TrainConfig) -> None:
  """ConfigError naming the differing keys when `config` would resume a run made with other settings."""
  run_dir = config.resolved_run_dir()
  saved = os.path.join(run_dir, "config.yaml")
  if not (config.checkpoint.enabled and config.checkpoint.resume and os.path.isfile(saved)
          and _has_checkpoints(run_dir)):
    return
  try:
    old = load_config(saved)
  except ConfigError as e:
    raise ConfigError(f"{saved} (the run being resumed) is no longer a valid config: {e}") from None
  changes = changed_keys(old, config)
  if changes:
    shown = "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
    raise ConfigError(f"run_dir: {run_dir} holds a run with other settings, so its checkpoint cannot be resumed "
                      f"with these: {shown}. Use the same settings, another name or run_dir, or "
                      f"checkpoint.resume=false. Nothing in {run_dir} was changed")


def record_run(config: TrainConfig, run_dir: str, describes_model: bool = True) -> None:
  """config.yaml, model.yaml (when `config.model` describes the model) and the data's tokenizer.json."""
  save_config(config, os.path.join(run_dir, "config.yaml"))
  if describes_model:
    with open(os.path.join(run_dir, "model.yaml"), "w") as f:
      yaml.safe_dump(model_fields(config), f, sort_keys=False)
  if config.data.kind == "text":
    tokenizer = os.path.join(config.data.text.path, "tokenizer.json")
    if os.path.isfile(tokenizer):
      shutil.copyfile(tokenizer, os.path.join(run_dir, "tokenizer.json"))
