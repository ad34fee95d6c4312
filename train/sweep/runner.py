"""Runs a sweep's runs one after another in this process, skipping finished ones, appending results.

For each run, in the sweep file's order:
  - a line in results.jsonl: finished, skipped (after checking it was made with the same settings);
  - a summary.json that says the run ended (killed before its line was written): the line is written from it;
  - otherwise `train.run.train(config)`, which resumes from the run's last checkpoint if it has one.
A run stopped by SIGTERM/SIGINT saves a checkpoint (train's own handling) and ends the sweep with 128 + signal;
the next invocation resumes it. A run that cannot go on (train's TrainingError, e.g. a learning rate that
diverges) is recorded with its error and best accuracy so far, and the sweep moves on.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import time
import zlib
from collections.abc import Callable
from typing import TextIO

from train.config import ConfigError, load_config, to_dict
from train.sweep import results as results_lib
from train.sweep.spec import Run, Sweep

EXIT_TIME_LIMIT = 3  # stopped at --time-limit with runs left: run the same command again to go on


def select(runs: tuple[Run, ...], only: str | None, shard: tuple[int, int] = (0, 1)) -> list[Run]:
  """The runs whose name matches the regular expression `only` (all for None), then those of shard (i, n): n
  processes, on one GPU or several, share a sweep without sharing a run. A run's shard is a hash of its name, not
  its position, so that a shard does not get every run of one learning rate (and so all the slow ones)."""
  if only:
    try:
      pattern = re.compile(only)
    except re.error as e:
      raise ConfigError(f"--only: {only!r} is not a regular expression ({e})") from None
    runs = tuple(run for run in runs if pattern.search(run.name))
  index, count = shard
  return [run for run in runs if count == 1 or zlib.crc32(run.name.encode()) % count == index]


def parse_shard(text: str) -> tuple[int, int]:
  """'i/n' -> (i, n), 0 <= i < n."""
  match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
  if not match or not int(match[1]) < int(match[2]):
    raise ConfigError(f"--shard: expected I/N with 0 <= I < N (e.g. 0/4), got {text!r}")
  return int(match[1]), int(match[2])


def planned_steps(run: Run) -> int:
  """Optimizer steps the run is set up for (fewer if it stops early)."""
  config = run.config
  if config.steps:
    return config.steps
  rows = sum(s.num_examples for s in config.data.mqar.train) if config.data.kind == "mqar" else 0
  return config.epochs * (rows // config.batch_size)


def _describe(run: Run) -> str:
  return (f"{planned_steps(run)} steps of {run.config.batch_size} rows, state {run.state_size:,} at "
          f"L={run.state_len}")


def run_sweep(sweep: Sweep, *, only: str | None = None, shard: tuple[int, int] = (0, 1), dry_run: bool = False,
              time_limit: float = 0.0, keep_checkpoints: bool = False,
              on_step: Callable[[str, int], None] | None = None, stream: TextIO = sys.stdout) -> int:
  """Runs the sweep's selected runs; returns the exit status (0: all finished, 128+n: signal n, 3: time limit).

  A finished run's checkpoints are deleted once its line is written, unless `keep_checkpoints`: hundreds of runs
  would otherwise keep gigabytes that no result needs. `on_step(run name, step)` is called after every training
  step (tests use it to interrupt a run).
  """
  def say(line: str) -> None:
    stream.write(line + "\n")
    stream.flush()

  runs = select(sweep.runs, only, shard)
  if not runs:
    say(f"{sweep.name}: no run matches {only!r}" + (f" in shard {shard[0]}/{shard[1]}" if shard[1] > 1 else ""))
    return 0
  finished = {line["name"]: line for line in results_lib.read_results(sweep.out_dir)}
  say(f"{sweep.name}: {len(runs)} runs ({sum(r.name in finished for r in runs)} finished) -> {sweep.out_dir}")
  start = time.monotonic()
  deadline = start + time_limit if time_limit > 0 else None
  sent_stop = False

  def hook(name: str):
    def step_hook(step: int) -> None:
      nonlocal sent_stop
      if on_step:
        on_step(name, step)
      if deadline and not sent_stop and time.monotonic() > deadline:
        sent_stop = True
        os.kill(os.getpid(), signal.SIGTERM)  # train() saves a checkpoint and returns, as on a real SIGTERM
    return step_hook

  for i, run in enumerate(runs):
    head = f"[{i + 1}/{len(runs)}] {run.name}"
    if run.name in finished:
      results_lib.check_same_config(finished[run.name], run.config)
      say(f"{head}: finished, skipped")
      continue
    if dry_run:
      say(f"{head}: {_describe(run)}")
      continue
    if deadline and time.monotonic() > deadline:
      left = sum(r.name not in finished for r in runs[i:])
      say(f"time limit of {time_limit:.0f}s reached: {left} runs left; run the same command again to go on")
      return EXIT_TIME_LIMIT
    run_dir = run.config.resolved_run_dir()
    summary = results_lib.summary_of(run_dir)
    t0 = time.perf_counter()
    if results_lib.is_finished(summary):
      saved = os.path.join(run_dir, "config.yaml")
      if os.path.isfile(saved):  # the summary must belong to this run's settings
        results_lib.check_same_config({"name": run.name, "config": to_dict(load_config(saved))}, run.config)
      say(f"{head}: ended before its result was recorded; recording it")
      wall = None
    else:
      # jax is imported only once the sweep is known to be valid; a TrainingError (the run cannot go on, e.g. a
      # learning rate that diverges) is the one failure recorded instead of raised.
      from train.run import TrainingError, train
      say(f"{head}: {_describe(run)}")
      try:
        summary = train(run.config, on_step=hook(run.name))
      except TrainingError as e:
        summary = results_lib.summary_of(run_dir) or {}
        summary["error"] = summary.get("error") or str(e)
        say(f"{head}: failed ({e}); recorded with its best accuracy so far")
      wall = time.perf_counter() - t0
      if summary.get("interrupted"):
        say(f"{head}: stopped by {summary.get('signal')} at step {summary.get('step')}; its checkpoint is saved, "
            f"run the same command again to resume")
        if sent_stop:
          return EXIT_TIME_LIMIT
        return 128 + int(getattr(signal, str(summary.get("signal")), signal.SIGTERM))
    line = results_lib.result_line(run, summary, wall)
    results_lib.append_result(sweep.out_dir, line)
    finished[run.name] = line
    if not keep_checkpoints:
      shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)
    acc, best = (f"{v:.4f}" if v is not None else "none" for v in (line["accuracy"], line["best_accuracy"]))
    say(f"{head}: accuracy {acc} (best {best}) after {line['steps']} steps, {line['wall_s'] or 0:.0f}s")
  done = sum(r.name in finished for r in runs)
  say(f"{sweep.name}: {done}/{len(runs)} runs finished" + ("" if dry_run else f" -> {sweep.out_dir}/results.jsonl"))
  return 0
