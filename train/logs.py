"""Run logs: a progress bar on a terminal (plain lines otherwise), JSON-lines metrics, TensorBoard event files.

Only process 0 writes. `metrics.jsonl` holds one object per logged step ({"step", "loss", ...}) and one per eval
({"step", "eval/..."}); TensorBoard files go to `<run_dir>/tb` when tensorboardX is installed.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import jax

from train.config import LogConfig


def _fmt_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60}:{rem % 60:02d}"


class RunLog:
  """Writes metrics to the terminal, metrics.jsonl and TensorBoard."""

  def __init__(self, config: LogConfig, run_dir: str, total_steps: int, stream=None):
    self.config, self.total_steps = config, total_steps
    self.stream = stream or sys.stdout
    self.active = jax.process_index() == 0
    mode = config.progress
    if mode == "auto":
      mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "plain"
    self.mode = mode
    self._bar_shown = False
    self._jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a") if self.active else None
    self._tb = None
    if self.active and config.tensorboard:
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(run_dir, "tb"))
      except ImportError:
        self.print("tensorboardX is not installed: no TensorBoard files (pip install tensorboardX)")
    self._start_time = None
    self._start_step = 0

  def print(self, line: str) -> None:
    """A message line (above the bar, if one is drawn)."""
    if not self.active:
      return
    if self._bar_shown:
      self.stream.write("\r\033[K")
      self._bar_shown = False
    self.stream.write(line + "\n")
    self.stream.flush()

  def start(self, step: int) -> None:
    """Marks the first timed step (after compilation), for tokens/s and ETA."""
    self._start_time, self._start_step = time.perf_counter(), step

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    """Records metrics for `step` (JSON-lines, TensorBoard)."""
    if not self.active:
      return
    record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in record.items():
        if k != "step" and isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, int(step))

  def progress(self, step: int, metrics: dict[str, Any]) -> None:
    """The bar (or a plain line): step, loss, tokens/s, MFU, ETA."""
    if not self.active or self.mode == "none":
      return
    elapsed = time.perf_counter() - (self._start_time or time.perf_counter())
    done = step - self._start_step
    eta = elapsed / done * (self.total_steps - step) if done > 0 else float("nan")
    parts = [f"step {step}/{self.total_steps}", f"loss {metrics.get('loss', float('nan')):.4f}"]
    if "accuracy" in metrics:
      parts.append(f"acc {metrics['accuracy']:.3f}")
    if metrics.get("skipped"):
      parts.append(f"skipped {int(metrics['skipped'])}")
    if "tokens_per_s" in metrics:
      parts.append(f"{metrics['tokens_per_s']:,.0f} tok/s")
    if metrics.get("mfu") is not None:
      parts.append(f"MFU {100 * metrics['mfu']:.1f}%")
    parts.append(f"ETA {_fmt_duration(eta)}")
    line = " | ".join(parts)
    if self.mode == "bar":
      width = 20
      filled = int(width * step / max(self.total_steps, 1))
      self.stream.write(f"\r\033[K[{'#' * filled}{'.' * (width - filled)}] {line}")
      self._bar_shown = True
      self.stream.flush()
    else:
      self.print(line)

  def close(self) -> None:
    if self._bar_shown:
      self.stream.write("\n")
      self._bar_shown = False
    if self._jsonl:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def _plain(v: Any) -> Any:
  if hasattr(v, "item"):
    v = v.item()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)
  return v


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
  """The records of a run's metrics.jsonl, in order."""
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]
