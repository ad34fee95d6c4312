"""Sweeps: a grid of training runs from one file, run one after another, resumable, with results and figures.

  spec.py     the sweep file: validation and expansion into named runs (`load_sweep`)
  runner.py   runs them through `train.run.train`, skipping finished runs (`run_sweep`)
  results.py  results.jsonl: one line per finished run (accuracy final and best, per MQAR setting, state size)
  plot.py     accuracy vs width and vs state size (with the Pareto frontier), and a markdown table

`python -m train.sweep --help` and docs/zoology.md tell how to run one.
"""

from train.sweep.spec import Run, Sweep, load_sweep

__all__ = ["Run", "Sweep", "load_sweep"]
