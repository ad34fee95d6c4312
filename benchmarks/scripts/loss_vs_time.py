"""Eval loss against training time for runs trained on the same tokens (issue 19: GPT-2 small with dense and with
Monarch maps on linux-doc), as a PNG and a markdown table.

Training time is the sum of a run's throughput windows (metrics.jsonl `window_s`) up to each eval: the device's
steps only, without compiling, evals or checkpoints, which `python -m train` times apart. The table gives each
run's final eval loss and the training time at which it first reached the baseline's final eval loss (at eval
granularity, no interpolation), over the baseline's own time: the Monarch paper's claim is that ratio < 1 (the
issue's goal, <= 0.6).
Usage: python3 benchmarks/scripts/loss_vs_time.py dense=RUN_DIR monarch=RUN_DIR ... [--baseline dense]
       [--out docs/monarch/gpt2_small_linux_doc.png]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os

EVAL_LOSS = "eval/text/loss"


@dataclasses.dataclass(frozen=True)
class Curve:
  label: str
  seconds: tuple[float, ...]  # training time at each eval
  losses: tuple[float, ...]  # eval loss at each eval
  steps: tuple[int, ...]


def read_curve(label: str, run_dir: str) -> Curve:
  """The (training seconds, eval loss) points of one run's metrics.jsonl."""
  windows, evals = [], []  # (end step, seconds), (step, loss)
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      if "window_s" in record:
        windows.append((record["step"], record["window_s"]))
      if EVAL_LOSS in record:
        evals.append((record["step"], record[EVAL_LOSS]))
  if not evals:
    raise ValueError(f"{run_dir}: no {EVAL_LOSS} in metrics.jsonl (set eval_every)")
  seconds = tuple(sum(s for end, s in windows if end <= step) for step, _ in evals)
  return Curve(label, seconds, tuple(loss for _, loss in evals), tuple(step for step, _ in evals))


def time_to_reach(curve: Curve, target: float) -> float:
  """Training seconds at the first eval with loss <= target; inf if none."""
  return next((s for s, loss in zip(curve.seconds, curve.losses) if loss <= target), math.inf)


def table(curves: list[Curve], baseline: str) -> str:
  base = next(c for c in curves if c.label == baseline)
  target, base_time = base.losses[-1], time_to_reach(base, base.losses[-1])
  lines = [f"| run | steps | training s | final eval loss | s to reach {baseline}'s {target:.4f} | vs {baseline} |",
           "|---|---:|---:|---:|---:|---:|"]
  for c in curves:
    reach = time_to_reach(c, target)
    reached = (f"{reach:.1f} | {reach / base_time:.2f}x" if math.isfinite(reach) else "- | not reached")
    lines.append(f"| {c.label} | {c.steps[-1]} | {c.seconds[-1]:.1f} | {c.losses[-1]:.4f} | {reached} |")
  return "\n".join(lines)


def plot(curves: list[Curve], path: str, title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  for c in curves:
    ax.plot(c.seconds, c.losses, marker="o", markersize=3, label=c.label)
  ax.set_xlabel("training time (s, device steps only)")
  ax.set_ylabel("eval loss (nats per token)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("runs", nargs="+", help="LABEL=RUN_DIR")
  parser.add_argument("--baseline", default=None, help="the label the others are compared with (default: first)")
  parser.add_argument("--out", default=None, help="PNG path (none: the table only)")
  parser.add_argument("--title", default="eval loss vs training time")
  args = parser.parse_args()
  curves = [read_curve(*spec.split("=", 1)) for spec in args.runs]
  print(table(curves, args.baseline or curves[0].label))
  if args.out:
    plot(curves, args.out, args.title)
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
