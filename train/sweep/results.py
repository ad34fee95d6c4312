"""The results file of a sweep: `<out>/results.jsonl`, one JSON line per finished run, appended as runs finish.

A line holds the run's place in the grid, its accuracy (final and best over the evals in its metrics.jsonl,
overall and per MQAR setting), steps, wall time, state size, parameter count and its resolved config. A run with
a line is finished: the runner skips it, and refuses to when the line's config differs from the sweep's.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from train.config import ConfigError, TrainConfig, to_dict
from train.data.mqar import setting_name

RESULTS = "results.jsonl"
# Settings (dotted keys and everything under them) that do not change what a run computes: a finished run is still
# valid when only these differ. Which kernel runs an op changes speed, not results (every implementation is tested
# against the reference), so a sweep may move its tiny models to a faster path and keep the runs it finished.
UNCOMPARED = ("name", "run_dir", "log", "checkpoint", "mesh", "model.implementation")
_EVAL_KEY = re.compile(r"^eval/([^/]+)/accuracy(?:/(.+))?$")


def _lines(path: str) -> list[dict[str, Any]]:
  """JSON lines of a file; a last line cut short by a kill is ignored."""
  if not os.path.isfile(path):
    return []
  out = []
  with open(path) as f:
    for line in f:
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return out


def read_results(out_dir: str) -> list[dict[str, Any]]:
  """The lines of `<out_dir>/results.jsonl` (the last one per run name, in file order)."""
  by_name = {line["name"]: line for line in _lines(os.path.join(out_dir, RESULTS)) if "name" in line}
  return list(by_name.values())


def append_result(out_dir: str, line: dict[str, Any]) -> None:
  """Appends one line with a single write to a file opened O_APPEND, so that shards of a sweep running at once
  (--shard) never interleave their lines."""
  os.makedirs(out_dir, exist_ok=True)
  fd = os.open(os.path.join(out_dir, RESULTS), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
  try:
    os.write(fd, (json.dumps(line) + "\n").encode())
    os.fsync(fd)
  finally:
    os.close(fd)


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(data, dict):
    out: dict[str, Any] = {}
    for key, value in data.items():
      out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out
  return {prefix: data}


def _uncompared(key: str) -> bool:
  return any(key == name or key.startswith(name + ".") for name in UNCOMPARED)


def check_same_config(line: dict[str, Any], config: TrainConfig) -> None:
  """ConfigError naming the keys when a finished run's line was made with other settings than `config`."""
  old = _flat(line.get("config", {}))
  new = _flat(json.loads(json.dumps(to_dict(config))))
  # A key one side lacks (a setting added to TrainConfig after the line was written) counts as its default,
  # which is what the older run used.
  defaults = _flat(json.loads(json.dumps(to_dict(TrainConfig()))))
  value = lambda side, k: side.get(k, defaults.get(k, "(unset)"))
  changed = [f"{k}: {value(old, k)!r} -> {value(new, k)!r}" for k in sorted(set(old) | set(new))
             if value(old, k) != value(new, k) and not _uncompared(k)]
  if changed:
    raise ConfigError(f"{line['name']}: finished in {RESULTS} with other settings ({'; '.join(changed[:3])}); "
                      f"write this sweep elsewhere (--out, --budget) or remove the run's line")


def summary_of(run_dir: str) -> dict[str, Any] | None:
  """The run's summary.json, if one was written."""
  path = os.path.join(run_dir, "summary.json")
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError:
    return None


def is_finished(summary: dict[str, Any] | None) -> bool:
  """The summary of a run that ended (its last step or an early stop), not one interrupted or failed."""
  if not summary or summary.get("interrupted") or summary.get("error"):
    return False
  return bool(summary.get("early_stopped")) or summary.get("step") == summary.get("total_steps")


def _accuracies(records: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
  """metric ('' = overall, else the MQAR setting) -> [(step, accuracy)] of the first eval set's records."""
  series: dict[str, list[tuple[int, float]]] = {}
  eval_set = None
  for record in records:
    for key, value in record.items():
      match = _EVAL_KEY.match(key)
      if not match or not isinstance(value, (int, float)):
        continue
      eval_set = eval_set or match[1]
      if match[1] == eval_set:
        series.setdefault(match[2] or "", []).append((int(record.get("step", -1)), float(value)))
  return series


def accuracy_fields(summary: dict[str, Any], run_dir: str) -> dict[str, Any]:
  """Final and best accuracy, overall and per MQAR setting, from the summary and the run's eval history."""
  history = _accuracies([r for r in _lines(os.path.join(run_dir, "metrics.jsonl")) if "step" in r])
  final = _accuracies([summary])
  fields: dict[str, Any] = {"accuracy": None, "best_accuracy": None, "best_step": None, "per_setting": {}}
  for metric in dict.fromkeys([*final, *history]):  # the eval's order: the test settings' order
    points = history.get(metric, []) + [(summary.get("step", -1), v) for _, v in final.get(metric, [])]
    step, best = max(points, key=lambda p: (p[1], -p[0]))
    last = final[metric][0][1] if metric in final else None
    if metric == "":
      fields.update(accuracy=last, best_accuracy=best, best_step=step)
    else:
      fields["per_setting"][metric] = {"final": last, "best": best}
  return fields


def result_line(run: Any, summary: dict[str, Any], wall_s: float | None = None) -> dict[str, Any]:
  """The results.jsonl line of a run of the sweep (`spec.Run`) that ended with `summary`."""
  config = run.config
  model = config.model
  line = dict(
      name=run.name, arch=run.arch, data=run.data, options=run.options, lr=run.lr, seed=run.seed,
      d_model=model.get("d_model"), num_layers=model.get("num_layers"), mixers=model.get("mixers"),
      train_settings=[setting_name(s) for s in config.data.mqar.train],
      test_settings=[setting_name(s) for s in config.data.mqar.test],
      state_size=run.state_size, state_len=run.state_len, num_params=summary.get("num_params"),
      **accuracy_fields(summary, config.resolved_run_dir()),
      steps=summary.get("step"), total_steps=summary.get("total_steps"),
      early_stopped=bool(summary.get("early_stopped")), error=summary.get("error"),
      wall_s=summary.get("wall_s") if wall_s is None else wall_s, train_s=summary.get("train_s"),
      compile_s=summary.get("compile_s"), tokens_per_s=summary.get("tokens_per_s"),
      config=to_dict(config))
  return json.loads(json.dumps(line, default=str))
