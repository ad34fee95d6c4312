"""Training configuration: frozen dataclasses loaded from YAML, with dotted `key=value` overrides.

Loading is strict: an unknown key or a value of the wrong type raises `ConfigError` naming the dotted key
(`optim.lr: expected float, got 'fast'`). The model section stays a plain mapping here and is validated by
`jaxlm.models.config.ModelConfig.from_dict`; it may also be a path to a model YAML, read and inlined so that
the resolved config written next to a run holds everything needed to repeat it.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any

import yaml

from jaxlm.paths import PRESETS_DIR  # model presets, nameable as `model: transformer-360m`


class ConfigError(ValueError):
  """A config key is unknown, missing or of the wrong type; the message starts with the dotted key."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  data: int = -1  # pure data parallelism; -1 = the devices left over by the other axes
  fsdp: int = 1  # parameters and optimizer state sharded over this axis, batch too
  tensor: int = 1  # heads / mlp / vocab split over this axis
  distributed: bool = False  # call jax.distributed.initialize (also done when JAX_COORDINATOR_ADDRESS is set)
  devices: int = 0  # use only the first N devices (e.g. a 1-device baseline); 0 = all


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  lr: float = 1e-3  # peak learning rate
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1  # decoupled (AdamW); norms, biases, SSM parameters excluded
  warmup_steps: int = 0  # linear warmup from 0, then cosine
  min_lr_ratio: float = 0.0  # cosine ends at lr * min_lr_ratio
  clip_norm: float = 1.0  # global gradient-norm clip; 0 = off


@dataclasses.dataclass(frozen=True)
class MQARSetting:
  seq_len: int = 64  # input_seq_len in Zoology
  num_kv_pairs: int = 4
  num_examples: int = 1000


@dataclasses.dataclass(frozen=True)
class MQARDataConfig:
  vocab_size: int = 8192  # keys from [1, V/2), values from [V/2, V)
  train: tuple[MQARSetting, ...] = (MQARSetting(64, 4, 100_000),)
  test: tuple[MQARSetting, ...] = (MQARSetting(64, 4, 3_000),)
  power_a: float = 0.01  # query-gap power law exponent
  random_non_queries: bool = True  # fill non-query slots with random tokens instead of 0

  def __post_init__(self):
    # Tuples, so that a config is hashable (the built data is cached per config: train/data/mqar.py).
    object.__setattr__(self, "train", tuple(self.train))
    object.__setattr__(self, "test", tuple(self.test))


@dataclasses.dataclass(frozen=True)
class TextDataConfig:
  path: str = ""  # output directory of `python -m train.prepare_data`
  seq_len: int = 1024  # packed row length
  # False: rows carry no segment ids, so every token sees the earlier documents of its row (for mixers that cannot
  # reset inside a row, e.g. lolcats, and as LoLCATs trains); labels that start a document stay ignored either way.
  segment_ids: bool = True


@dataclasses.dataclass(frozen=True)
class DataConfig:
  kind: str = "mqar"  # mqar | text | synthetic (uniform random tokens, for throughput runs)
  seed: int = 0  # data generation and shuffling; independent of the model seed
  mqar: MQARDataConfig = MQARDataConfig()
  text: TextDataConfig = TextDataConfig()
  synthetic_seq_len: int = 2048  # row length for kind=synthetic


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every: int = 0  # save every this many steps; 0 = only at the end and on SIGTERM/SIGINT
  keep: int = 3  # keep the last N checkpoints
  async_save: bool = True  # write in the background while training continues
  resume: bool = True  # resume from the latest checkpoint in the run directory
  resume_step: int = -1  # resume from this step instead of the latest; -1 = latest
  enabled: bool = True  # False: no checkpoints at all (quick experiments)


@dataclasses.dataclass(frozen=True)
class LogConfig:
  every: int = 10  # steps between metric lines
  progress: str = "auto"  # auto (bar on a terminal), bar, plain, none
  tensorboard: bool = True  # TensorBoard event files in the run directory (needs tensorboardX)
  peak_tflops: float = 0.0  # per-device peak for MFU; 0 = looked up from the device kind
  # > 0: trace that many steps from step `every` on with jax.profiler and print each kernel's device time per step
  # (train/step_profile.py); the traced steps count in no throughput window. 0 = off.
  profile_steps: int = 0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  name: str = "run"
  run_dir: str = ""  # outputs (config, metrics, checkpoints); "" = runs/<name>
  seed: int = 0  # parameter init and the per-step RNG
  model: dict[str, Any] = dataclasses.field(default_factory=dict)  # ModelConfig fields, or `model: path.yaml`
  data: DataConfig = DataConfig()
  optim: OptimConfig = OptimConfig()
  mesh: MeshConfig = MeshConfig()
  checkpoint: CheckpointConfig = CheckpointConfig()
  log: LogConfig = LogConfig()
  batch_size: int = 64  # global batch (rows) per optimizer step
  micro_batches: int = 1  # gradient accumulation: the batch is split into this many micro-batches
  steps: int = 0  # optimizer steps; 0 = epochs * steps per epoch (finite datasets)
  epochs: int = 0  # passes over a finite training set (MQAR); used when steps = 0
  compute_dtype: str = "bfloat16"  # the model's dtype (activations, matmuls); params and optimizer state: float32
  remat: str = "none"  # per-layer remat policy: none | full | dots | names:mixer_out,mlp_out
  eval_every: int = 0  # steps between evaluations; 0 = only at the end
  eval_batch_size: int = 0  # 0 = batch_size
  eval_batches: int = 0  # cap on eval batches (text); 0 = the whole eval split
  early_stop_accuracy: float = 0.0  # stop once eval accuracy >= this (Zoology uses 0.99); 0 = never
  # Stop with an error after this many consecutive steps with a non-finite loss or gradient (each is skipped:
  # parameters untouched); checked whenever metrics are fetched (every log.every steps). 0 = never stop.
  max_nonfinite_steps: int = 10
  # Positions per chunk of the loss: > 0 computes logits, cross-entropy and its gradient that many positions at a
  # time (train/loss.py, no recomputation in the backward), never [B, T, V] float32 at once; 0 = the whole logits.
  loss_chunk: int = 0

  def resolved_run_dir(self) -> str:
    return self.run_dir or os.path.join("runs", self.name)


def _type_name(tp: Any) -> str:
  return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
  """`value` checked against (and where lossless converted to) the annotation `tp`."""
  origin = typing.get_origin(tp)
  if dataclasses.is_dataclass(tp):
    if isinstance(value, tp):
      return value
    if not isinstance(value, dict):
      raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
    return from_dict(tp, value, prefix=key)
  if origin is tuple:
    item_tp = typing.get_args(tp)[0]
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f"{key}: expected a list, got {value!r}")
    return tuple(_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
  if origin is dict or tp is dict:
    if not isinstance(value, dict):
      raise ConfigError(f"{key}: expected a mapping, got {value!r}")
    return dict(value)
  if origin in (typing.Union, types.UnionType):
    for option in typing.get_args(tp):
      try:
        return _convert(value, option, key)
      except ConfigError:
        pass
    raise ConfigError(f"{key}: {value!r} matches none of {typing.get_args(tp)}")
  if tp is bool:
    if isinstance(value, bool):
      return value
  elif tp is int:
    if isinstance(value, int) and not isinstance(value, bool):
      return value
  elif tp is float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
  elif tp is str:
    if isinstance(value, str):
      return value
  elif tp is Any:
    return value
  raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


# Keys whose value must be one of a few names (the model section is checked by ModelConfig).
CHOICES = {"data.kind": ("mqar", "text", "synthetic"), "log.progress": ("auto", "bar", "plain", "none")}


# Numeric keys and their allowed closed range [low, high] (None: unbounded); `*` is every item of a list. The
# mesh sizes (-1 allowed) are checked with the device count in train/mesh.py.
RANGES: dict[str, tuple[float | None, float | None]] = {
    "batch_size": (1, None), "micro_batches": (1, None), "steps": (0, None), "epochs": (0, None),
    "eval_every": (0, None), "eval_batch_size": (0, None), "eval_batches": (0, None),
    "early_stop_accuracy": (0.0, 1.0), "max_nonfinite_steps": (0, None), "loss_chunk": (0, None),
    "optim.lr": (0.0, None), "optim.b1": (0.0, 1.0), "optim.b2": (0.0, 1.0), "optim.eps": (0.0, None),
    "optim.weight_decay": (0.0, None), "optim.warmup_steps": (0, None), "optim.min_lr_ratio": (0.0, 1.0),
    "optim.clip_norm": (0.0, None),
    "data.mqar.vocab_size": (2, None), "data.mqar.power_a": (0.0, None),
    "data.mqar.train.*.seq_len": (2, None), "data.mqar.train.*.num_kv_pairs": (1, None),
    "data.mqar.train.*.num_examples": (1, None), "data.mqar.test.*.seq_len": (2, None),
    "data.mqar.test.*.num_kv_pairs": (1, None), "data.mqar.test.*.num_examples": (1, None),
    "data.text.seq_len": (1, None), "data.synthetic_seq_len": (1, None),
    "checkpoint.every": (0, None), "checkpoint.keep": (1, None), "checkpoint.resume_step": (-1, None),
    "log.every": (1, None), "log.peak_tflops": (0.0, None), "log.profile_steps": (0, None),
    "mesh.devices": (0, None),
}


def _values(config: Any, key: str, prefix: str = "") -> list[tuple[str, Any]]:
  """(dotted key, value) pairs of `key` in `config`, a `*` part standing for every item of a tuple."""
  head, _, rest = key.partition(".")
  if head == "*":
    items = [(f"{prefix}[{i}]", item) for i, item in enumerate(config)]
  else:
    items = [(f"{prefix}.{head}" if prefix else head, getattr(config, head))]
  if not rest:
    return items
  return [pair for name, item in items for pair in _values(item, rest, name)]


def check_values(config: TrainConfig) -> None:
  """Choices and numeric ranges; ConfigError naming the first bad key and its value."""
  for key, allowed in CHOICES.items():
    for name, value in _values(config, key):
      if value not in allowed:
        raise ConfigError(f"{name}: {value!r} is not one of {allowed}")
  for key, (low, high) in RANGES.items():
    for name, value in _values(config, key):
      if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(f"{name}: must be {bounds}, got {value}")


def from_dict(cls: type, data: dict[str, Any], *, prefix: str = "") -> Any:
  """An instance of the dataclass `cls` from a mapping; unknown keys and wrong types raise `ConfigError`."""
  hints = typing.get_type_hints(cls)
  fields = {f.name: f for f in dataclasses.fields(cls)}
  kwargs = {}
  for name, value in data.items():
    key = f"{prefix}.{name}" if prefix else str(name)
    if name not in fields:
      raise ConfigError(f"{key}: unknown key (known: {', '.join(sorted(fields))})")
    kwargs[name] = _convert(value, hints[name], key)
  return cls(**kwargs)


def to_dict(config: Any) -> Any:
  """Plain YAML-able data of a config dataclass (tuples become lists)."""
  if dataclasses.is_dataclass(config):
    return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
  if isinstance(config, (list, tuple)):
    return [to_dict(v) for v in config]
  if isinstance(config, dict):
    return {k: to_dict(v) for k, v in config.items()}
  return config


def apply_override(data: dict[str, Any], override: str) -> None:
  """Set `a.b.c=value` in the nested mapping `data`; the value is parsed as YAML (`1e-3`, `true`, `[1, 2]`)."""
  if "=" not in override:
    raise ConfigError(f"{override}: overrides are key=value")
  key, raw = override.split("=", 1)
  value = yaml.safe_load(raw) if raw else ""
  if isinstance(value, str) and _looks_numeric(value):
    value = float(value)  # YAML 1.1 reads "1e-3" as a string
  parts = key.strip().split(".")
  node = data
  for i, part in enumerate(parts[:-1]):
    child = node.get(part)
    if child is None:
      child = node[part] = {}
    if not isinstance(child, dict):
      raise ConfigError(f"{'.'.join(parts[:i + 1])}: is not a mapping, cannot set {key}")
    node = child
  node[parts[-1]] = value


def _looks_numeric(text: str) -> bool:
  try:
    float(text)
  except ValueError:
    return False
  return True


def _read_yaml(path: str) -> dict[str, Any]:
  with open(path) as f:
    data = yaml.safe_load(f) or {}
  if not isinstance(data, dict):
    raise ConfigError(f"{path}: the top level must be a mapping")
  return data


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
  """`update` over `base`: mappings merge key by key, anything else is replaced."""
  out = dict(base)
  for key, value in update.items():
    out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
  return out


def _read_config(path: str) -> dict[str, Any]:
  """A config YAML with its `base:` chain (paths relative to the file) merged underneath it."""
  data = _read_yaml(path)
  base = data.pop("base", None)
  if base is None:
    return data
  if not isinstance(base, str):
    raise ConfigError(f"base: expected a path to another config, got {base!r}")
  base_path = os.path.join(os.path.dirname(path), base)
  if not os.path.exists(base_path):
    raise ConfigError(f"base: no config file {base_path!r}")
  return _merge(_read_config(base_path), data)


def _inline_model(data: dict[str, Any], config_path: str | None) -> None:
  """Replaces `model: <file or preset name>` by the mapping in that YAML."""
  model = data.get("model")
  if not isinstance(model, str):
    return
  candidates = [model, os.path.join(os.path.dirname(config_path or "."), model),
                os.path.join(PRESETS_DIR, f"{model}.yaml")]
  found = next((c for c in candidates if os.path.isfile(c)), None)
  if found is None:
    raise ConfigError(f"model: no model config file or preset {model!r} (presets are in {PRESETS_DIR})")
  data["model"] = _read_yaml(found)


def load_config(path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
  """The `TrainConfig` in the YAML at `path` (None = defaults) with dotted overrides applied in order.

  A config may start from another with `base: other.yaml` and change only some keys.
  """
  data = _read_config(path) if path else {}
  _inline_model(data, path)
  for override in overrides:
    apply_override(data, override)
    if override.split("=", 1)[0].strip() == "model":
      _inline_model(data, path)
  config = from_dict(TrainConfig, data)
  check_values(config)
  return config


def save_config(config: TrainConfig, path: str) -> None:
  """The resolved config as YAML (loadable again with `load_config`)."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    yaml.safe_dump(to_dict(config), f, sort_keys=False)
