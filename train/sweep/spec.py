"""Sweep files: a base training config plus a grid, validated and expanded into named runs before anything runs.

  name: figure2_zoology                 # runs go to runs/<name>/ (runs/<name>-<budget>/ under --budget)
  base: ../mqar/zoology_based.yaml      # the training config every run starts from (relative to this file)
  set: {log.progress: plain}            # dotted overrides for every run
  data:                                 # named data settings: one axis of the grid
    L64_kv4: {data.mqar.train: [{seq_len: 64, num_kv_pairs: 4, num_examples: 100000}], batch_size: 512}
  architectures:                        # named architectures: fixed settings and their own option grid
    attention:
      set: {model.num_layers: 2, model.mixers: attention}
      grid: {model.d_model: [64, 128]}  # every combination of the listed values (or a list of points)
      lr: [1.0e-3]                      # optional: this architecture's own learning rates
  lr: {logspace: [-4, -2, 4]}           # optim.lr axis: a list, or numpy.logspace(start, stop, num)
  seeds: [0]                            # optional: `seed` axis
  budgets:                              # optional, chosen with --budget NAME: a cheaper schedule
    reduced:
      set: {epochs: 8}                  # applied after everything above
      lr: [4.6e-4, 2.2e-3]              # replaces the lr axis (architectures' own lr too)
      data: [L64_kv4]                   # keep only these data settings
      architectures: {attention: {lr: [1.0e-3], grid: {model.d_model: [64]}}}  # per-architecture lr/grid

A run is one point of data x architecture (x its grid) x lr x seed, named `<arch>-<data>-<options>-lr<lr>[-s<seed>]`
(`based-L64_kv4-d64-f8-lr1.0e-03`). Every run's config goes through `train.config.load_config` and its model
through `ModelConfig`, so a bad key fails here, named with where it came from in the sweep file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any

import yaml

from train.config import ConfigError, TrainConfig, load_config

TOP_KEYS = ("name", "base", "set", "data", "architectures", "lr", "seeds", "budgets")
ARCH_KEYS = ("set", "grid", "lr")
BUDGET_KEYS = ("set", "lr", "data", "architectures")
BUDGET_ARCH_KEYS = ("grid", "lr")
# Short labels of option keys in run names (the last part of the dotted key otherwise).
LABELS = {"d_model": "d", "feature_dim": "f", "window": "w", "state_dim": "n", "num_layers": "l",
          "kernel_size": "k", "num_heads": "h"}
_NAME = re.compile(r"[A-Za-z0-9_.]+")
_RUN_NAME = re.compile(r"[A-Za-z0-9_.+-]+")


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of a sweep: where it sits in the grid and its resolved config."""
  name: str
  arch: str
  data: str
  options: dict[str, Any]  # grid key -> value (the architecture's grid)
  lr: float | None  # None: no lr axis (the base config's)
  seed: int | None
  config: TrainConfig
  state_size: int  # numbers per sequence at the longest test length (jaxlm.models.state_size)
  state_len: int  # that length


@dataclasses.dataclass(frozen=True)
class Sweep:
  name: str
  path: str
  out_dir: str
  budget: str | None
  runs: tuple[Run, ...]


def _check_mapping(value: Any, where: str, allowed: tuple[str, ...] | None = None) -> dict:
  if not isinstance(value, dict):
    raise ConfigError(f"{where}: expected a mapping, got {value!r}")
  for key in value:
    if not isinstance(key, str):
      raise ConfigError(f"{where}: keys must be strings, got {key!r}")
    if allowed is not None and key not in allowed:
      raise ConfigError(f"{where}.{key}: unknown key (known: {', '.join(allowed)})" if where else
                        f"{key}: unknown key (known: {', '.join(allowed)})")
  return value


def _check_names(names: Any, where: str) -> None:
  for name in names:
    if not _NAME.fullmatch(str(name)):
      raise ConfigError(f"{where}.{name}: names may hold letters, digits, '_' and '.' only")


def _values(value: Any, where: str) -> list:
  """A non-empty list of grid values."""
  if not isinstance(value, list):
    raise ConfigError(f"{where}: expected a list of values, got {value!r}")
  if not value:
    raise ConfigError(f"{where}: empty grid")
  return value


def _learning_rates(value: Any, where: str) -> list[float]:
  """A list of positive numbers, or {logspace: [start, stop, num]} (numpy.logspace: 10**start ... 10**stop)."""
  if isinstance(value, dict):
    _check_mapping(value, where, ("logspace",))
    spec = value.get("logspace")
    if (not isinstance(spec, list) or len(spec) != 3 or not all(isinstance(v, (int, float)) for v in spec)
        or not isinstance(spec[2], int) or spec[2] < 1):
      raise ConfigError(f"{where}.logspace: expected [start, stop, num] with an integer num >= 1, got {spec!r}")
    start, stop, num = spec
    return [10.0 ** (start + (stop - start) * i / (num - 1)) if num > 1 else 10.0 ** start for i in range(num)]
  values = _values(value, where)
  for i, v in enumerate(values):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or not math.isfinite(v):
      raise ConfigError(f"{where}[{i}]: expected a positive number, got {v!r}")
  return [float(v) for v in values]


def _overrides(mapping: Any, where: str) -> list[tuple[str, str]]:
  """(origin, 'key=value') for load_config from a mapping of dotted keys (values as JSON, which YAML reads)."""
  _check_mapping(mapping, where)
  return [(f"{where}.{key}", f"{key}={json.dumps(value)}") for key, value in mapping.items()]


def _grid(grid: Any, where: str) -> list[dict[str, Any]]:
  """The grid's points: every combination of a mapping's values, in file order (the last key varies fastest),
  or a list of points as given (for options tied to each other, e.g. H3's state_dim = d_model / 4)."""
  if isinstance(grid, list):
    for i, point in enumerate(_values(grid, where)):
      if not _check_mapping(point, f"{where}[{i}]"):
        raise ConfigError(f"{where}[{i}]: empty grid point")
    return [dict(point) for point in grid]
  _check_mapping(grid, where)
  points: list[dict[str, Any]] = [{}]
  for key, values in grid.items():
    points = [{**p, key: v} for p in points for v in _values(values, f"{where}.{key}")]
  return points


def _label(key: str, value: Any) -> str:
  last = key.rsplit(".", 1)[-1]
  text = f"{value:g}" if isinstance(value, float) else str(value)
  return f"{LABELS.get(last, last)}{text}"


def _origin_of(message: str, tagged: list[tuple[str, str]]) -> str | None:
  """The sweep-file key whose override a config error names (the last one that set that key or a parent)."""
  match = re.match(r"[A-Za-z0-9_.\[\]]+", message)
  key = re.sub(r"\[\d+\]", "", match[0] if match else "")
  for origin, override in reversed(tagged):
    set_key = override.split("=", 1)[0]
    if key == set_key or key.startswith(set_key + ".") or set_key.startswith(key + "."):
      return origin
  return None


def _resolve(base: str, tagged: list[tuple[str, str]], run_name: str) -> TrainConfig:
  try:
    return load_config(base, [override for _, override in tagged])
  except ConfigError as e:
    origin = _origin_of(str(e), tagged)
    raise ConfigError(f"{origin or run_name}: {e}" if origin else f"{run_name}: {e}") from None


def _state(config: TrainConfig, tagged: list[tuple[str, str]], run_name: str, cache: dict) -> tuple[int, int]:
  """(state size, length) of the run's model at its longest test sequence (Zoology's convention); building the
  ModelConfig is also where the model section is validated. `cache` holds models already seen (runs that differ
  only in learning rate or seed share one)."""
  from jaxlm.models.config import ModelConfig
  from jaxlm.models.state_size import model_state_size
  from train.models import model_fields

  model_dict = model_fields(config)
  length = max((s.seq_len for s in config.data.mqar.test), default=0) if config.data.kind == "mqar" else 0
  key = (json.dumps(model_dict, sort_keys=True, default=str), length)
  if key in cache:
    return cache[key]
  try:
    model = ModelConfig.from_dict(model_dict)
    cache[key] = model_state_size(model, length or model.max_length), length or model.max_length
    return cache[key]
  except (TypeError, ValueError) as e:
    if isinstance(e, ConfigError):
      raise
    message = f"model.{e}"
    origin = _origin_of(message, tagged)
    raise ConfigError(f"{origin or run_name}: {message}") from None


def _read(path: str) -> dict[str, Any]:
  if not os.path.isfile(path):
    raise ConfigError(f"--config: no sweep file {path!r}")
  with open(path) as f:
    try:
      data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
      raise ConfigError(f"{path}: not YAML ({str(e).splitlines()[0]})") from None
  return _check_mapping(data, "", TOP_KEYS)


def _apply_budget(data: dict[str, Any], budget: str) -> dict[str, Any]:
  """The sweep file's mapping with budget `budget` folded in."""
  budgets = _check_mapping(data.get("budgets", {}), "budgets")
  if budget not in budgets:
    raise ConfigError(f"--budget: no budget {budget!r} in this sweep (budgets: {', '.join(budgets) or 'none'})")
  where = f"budgets.{budget}"
  spec = _check_mapping(budgets[budget] or {}, where, BUDGET_KEYS)
  data = dict(data)
  data["set"] = {**_check_mapping(data.get("set", {}), "set"), **_check_mapping(spec.get("set", {}), f"{where}.set")}
  archs = {k: dict(v or {}) for k, v in _check_mapping(data.get("architectures", {}), "architectures").items()}
  if "lr" in spec:
    data["lr"] = _learning_rates(spec["lr"], f"{where}.lr")
    for arch in archs.values():
      arch.pop("lr", None)
  if "data" in spec:
    keep = _values(spec["data"], f"{where}.data")
    known = _check_mapping(data.get("data", {}), "data")
    for name in keep:
      if name not in known:
        raise ConfigError(f"{where}.data: no data setting {name!r} (known: {', '.join(known)})")
    data["data"] = {name: known[name] for name in keep}
  for name, changes in _check_mapping(spec.get("architectures", {}), f"{where}.architectures").items():
    if name not in archs:
      raise ConfigError(f"{where}.architectures.{name}: no such architecture (known: {', '.join(archs)})")
    changes = _check_mapping(changes or {}, f"{where}.architectures.{name}", BUDGET_ARCH_KEYS)
    if "grid" in changes:  # a mapping updates a mapping grid key by key; otherwise it replaces the grid
      old, new = archs[name].get("grid", {}), changes["grid"]
      _grid(new, f"{where}.architectures.{name}.grid")
      archs[name]["grid"] = {**old, **new} if isinstance(old, dict) and isinstance(new, dict) else new
    if "lr" in changes:
      archs[name]["lr"] = _learning_rates(changes["lr"], f"{where}.architectures.{name}.lr")
  data["architectures"] = archs
  return data


def load_sweep(path: str, *, budget: str | None = None, out_dir: str | None = None,
               overrides: list[str] | tuple[str, ...] = ()) -> Sweep:
  """The validated sweep in the file at `path`; `overrides` (key=value) apply to every run, last."""
  data = _read(path)
  if budget is not None:
    data = _apply_budget(data, budget)
  name = data.get("name")
  if not isinstance(name, str) or not _NAME.fullmatch(name):
    raise ConfigError(f"name: expected a name of letters, digits, '_' and '.', got {name!r}")
  base = data.get("base")
  if not isinstance(base, str):
    raise ConfigError(f"base: expected the path of a training config, got {base!r}")
  base = os.path.join(os.path.dirname(os.path.abspath(path)), base)
  if not os.path.isfile(base):
    raise ConfigError(f"base: no training config {base!r}")
  out_dir = out_dir or os.path.join("runs", name if budget is None else f"{name}-{budget}")

  common = _overrides(data.get("set", {}), "set")
  datas = _check_mapping(data.get("data", {"": {}}), "data")
  if not datas:
    raise ConfigError("data: empty grid")
  _check_names([d for d in datas if d], "data")
  archs = _check_mapping(data.get("architectures"), "architectures")
  if not archs:
    raise ConfigError("architectures: empty grid")
  _check_names(archs, "architectures")
  lrs = _learning_rates(data["lr"], "lr") if "lr" in data else [None]
  seeds = _values(data["seeds"], "seeds") if "seeds" in data else [None]
  for i, seed in enumerate(seeds):
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
      raise ConfigError(f"seeds[{i}]: expected an integer >= 0, got {seed!r}")
  extra = [("--set", o) for o in overrides]

  runs: list[Run] = []
  models: dict = {}
  for arch_name, arch in archs.items():
    where = f"architectures.{arch_name}"
    arch = _check_mapping(arch or {}, where, ARCH_KEYS)
    arch_set = _overrides(arch.get("set", {}), f"{where}.set")
    options_list = _grid(arch.get("grid", {}), f"{where}.grid")
    arch_lrs = _learning_rates(arch["lr"], f"{where}.lr") if "lr" in arch else lrs
    for data_name, data_set in datas.items():
      data_tagged = _overrides(data_set or {}, f"data.{data_name}")
      for options in options_list:
        for lr in arch_lrs:
          for seed in seeds:
            parts = [arch_name, data_name, *(_label(k, v) for k, v in options.items())]
            parts += [] if lr is None else [f"lr{lr:.1e}"]
            parts += [] if seed is None else [f"s{seed}"]
            run_name = "-".join(p for p in parts if p)
            if not _RUN_NAME.fullmatch(run_name):
              raise ConfigError(f"{where}.grid: run name {run_name!r} would hold other characters than letters, "
                                f"digits and _.-+ (grid values named in runs must be numbers or short names)")
            tagged = common + data_tagged + arch_set
            tagged += [(f"{where}.grid.{k}", f"{k}={json.dumps(v)}") for k, v in options.items()]
            tagged += [] if lr is None else [(f"{where}.lr" if "lr" in arch else "lr", f"optim.lr={lr!r}")]
            tagged += [] if seed is None else [("seeds", f"seed={seed}")]
            tagged += extra + [("name", f"name={json.dumps(run_name)}"),
                               ("--out", f"run_dir={json.dumps(os.path.join(out_dir, run_name))}")]
            config = _resolve(base, tagged, run_name)
            state, length = _state(config, tagged, run_name, models)
            runs.append(Run(run_name, arch_name, data_name, options, lr, seed, config, state, length))
  seen: set[str] = set()
  for run in runs:
    if run.name in seen:
      raise ConfigError(f"architectures.{run.arch}: two runs are both named {run.name!r}; give the grid keys "
                        f"distinct names")
    seen.add(run.name)
  return Sweep(name, os.path.abspath(path), out_dir, budget, tuple(runs))
