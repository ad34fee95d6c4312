"""The sweep's figures and table from results.jsonl (matplotlib: `pip install -e '.[plots]'`).

  <name>_width.png   accuracy vs d_model, one panel per data setting (sequence length), one line per architecture,
                     each point the best run at that width (over learning rates and the other grid options):
                     Zoology's Figure 2
  <name>_state.png   accuracy vs state size (log x), one panel per data setting, each point the best run per
                     (architecture, state size), the Pareto frontier over all architectures drawn: BASED's Figure 2
  <name>.md          the same numbers as markdown tables

`metric` is `final` (the accuracy at the end of each run, which the papers plot) or `best` (the best eval).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from train.config import ConfigError
from train.sweep.results import RESULTS, read_results

METRICS = {"final": "accuracy", "best": "best_accuracy"}


def pareto_frontier(points: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
  """The (state size, accuracy) points that no point with smaller or equal state beats, by increasing state."""
  frontier: list[tuple[float, float]] = []
  for state, acc in sorted(points, key=lambda p: (p[0], -p[1])):
    if not frontier or acc > frontier[-1][1]:
      frontier.append((state, acc))
  return frontier


def _best(lines: list[dict[str, Any]], key) -> dict[Any, dict[str, Any]]:
  """key(line) -> the line with the highest value (ties: the first in file order)."""
  out: dict[Any, dict[str, Any]] = {}
  for line in lines:
    k = key(line)
    if k not in out or line["value"] > out[k]["value"]:
      out[k] = line
  return out


def _max_len(settings: list[str]) -> int:
  """The longest sequence among MQAR setting names (`L64_kv4`)."""
  return max((int(name[1:].split("_")[0]) for name in settings if name.startswith("L")), default=0)


def _seq_len(line: dict[str, Any]) -> int:
  return _max_len(line.get("train_settings", []))


def _panels(lines: list[dict[str, Any]]) -> list[str]:
  """Data settings ordered by their longest training sequence."""
  first = {}
  for line in lines:
    first.setdefault(line["data"], line)
  return sorted(first, key=lambda d: (_seq_len(first[d]), d))


def _title(data: str, lines: list[dict[str, Any]]) -> str:
  line = next(l for l in lines if l["data"] == data)
  train, test = line.get("train_settings", []), line.get("test_settings", [])
  if len(train) == 1:
    length, pairs = train[0][1:].split("_kv")
    return f"L={length}, {pairs} pairs" + (f" ({data})" if data and data != train[0] else "")
  mixture = f"{len(train)} train settings up to L={_max_len(train)}, test up to L={_max_len(test)}"
  return f"{data}: {mixture}" if data else mixture


def load(out_dir: str, metric: str = "final") -> list[dict[str, Any]]:
  """The results lines with a `value` (the chosen metric); runs without one (failed before any eval) left out."""
  if metric not in METRICS:
    raise ConfigError(f"--metric: {metric!r} is not one of {tuple(METRICS)}")
  lines = read_results(out_dir)
  if not lines:
    raise ConfigError(f"{out_dir}: no {RESULTS} with finished runs")
  out = []
  for line in lines:
    value = line.get(METRICS[metric])
    if value is None and metric == "final":
      value = line.get("best_accuracy") if line.get("error") else None  # a failed run: its best so far
    if value is not None:
      out.append({**line, "value": float(value)})
  return out


def _archs(lines: list[dict[str, Any]]) -> list[str]:
  return list(dict.fromkeys(line["arch"] for line in lines))


def width_points(lines: list[dict[str, Any]]) -> dict[tuple[str, str], list[tuple[int, dict[str, Any]]]]:
  """(data, arch) -> [(d_model, best line)] by width."""
  best = _best(lines, lambda l: (l["data"], l["arch"], l["d_model"]))
  out: dict[tuple[str, str], list[tuple[int, dict[str, Any]]]] = {}
  for (data, arch, width), line in sorted(best.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
    out.setdefault((data, arch), []).append((width, line))
  return out


def state_points(lines: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
  """data -> the best line per (architecture, state size), by state size."""
  best = _best(lines, lambda l: (l["data"], l["arch"], l["state_size"]))
  out: dict[str, list[dict[str, Any]]] = {}
  for (data, _, _), line in sorted(best.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][1])):
    out.setdefault(data, []).append(line)
  return out


def matplotlib_null_formatter():
  from matplotlib.ticker import NullFormatter
  return NullFormatter()


def _figure(panels: int):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, panels, figsize=(3.6 * panels + 1.6, 3.4), sharey=True, squeeze=False)
  return plt, fig, axes[0]


def plot_width(lines: list[dict[str, Any]], path: str, metric: str) -> None:
  panels, archs, points = _panels(lines), _archs(lines), width_points(lines)
  plt, fig, axes = _figure(len(panels))
  widths = sorted({l["d_model"] for l in lines})
  for ax, data in zip(axes, panels):
    for i, arch in enumerate(archs):
      pts = points.get((data, arch), [])
      if pts:
        ax.plot([w for w, _ in pts], [l["value"] for _, l in pts], "o-", color=f"C{i}", label=arch)
    ax.set_xscale("log", base=2)
    ax.set_xticks(widths, [str(w) for w in widths])
    ax.minorticks_off()
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(_title(data, lines), fontsize=10)
    ax.set_xlabel("model width d_model")
    ax.grid(alpha=0.3)
  _legend_and_save(plt, fig, axes, path, metric, legend_inches=1.4)


def plot_state(lines: list[dict[str, Any]], path: str, metric: str) -> None:
  panels, archs, points = _panels(lines), _archs(lines), state_points(lines)
  plt, fig, axes = _figure(len(panels))
  for ax, data in zip(axes, panels):
    pts = points.get(data, [])
    for i, arch in enumerate(archs):
      mine = [l for l in pts if l["arch"] == arch]
      if mine:
        ax.scatter([l["state_size"] for l in mine], [l["value"] for l in mine], color=f"C{i}", label=arch, s=28,
                   zorder=3)
    frontier = pareto_frontier((l["state_size"], l["value"]) for l in pts)
    if frontier:  # a staircase: the best accuracy reachable with at most that much state
      right = max(l["state_size"] for l in pts)
      ax.step([s for s, _ in frontier] + [right], [a for _, a in frontier] + [frontier[-1][1]], where="post",
              color="k", lw=1, ls="--", alpha=0.7, label="Pareto frontier", zorder=2)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib_null_formatter())
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(_title(data, lines), fontsize=10)
    ax.set_xlabel(f"state size (numbers per sequence, L={pts[0]['state_len'] if pts else '?'})")
    ax.grid(alpha=0.3)
  _legend_and_save(plt, fig, axes, path, metric, legend_inches=1.6)


def _legend_and_save(plt, fig, axes, path: str, metric: str, legend_inches: float) -> None:
  """One legend for every panel's lines (each label once, in order of appearance) right of the panels."""
  axes[0].set_ylabel(f"MQAR accuracy ({metric})")
  handles, labels = [], []
  for ax in axes:
    for h, lab in zip(*ax.get_legend_handles_labels()):
      if lab not in labels:
        handles.append(h)
        labels.append(lab)
  fig.legend(handles, labels, loc="center right", fontsize=9)
  fig.tight_layout(rect=(0, 0, 1 - legend_inches / fig.get_figwidth(), 1))
  fig.savefig(path, dpi=130)
  plt.close(fig)


def _options(line: dict[str, Any]) -> str:
  opts = [f"{k.rsplit('.', 1)[-1]}={v}" for k, v in line.get("options", {}).items() if not k.endswith("d_model")]
  return ", ".join(opts + ([f"lr={line['lr']:.1e}"] if line.get("lr") is not None else []))


def table(lines: list[dict[str, Any]], metric: str, command: str) -> str:
  """Both figures' numbers as markdown."""
  panels, archs = _panels(lines), _archs(lines)
  widths = sorted({l["d_model"] for l in lines})
  points, states = width_points(lines), state_points(lines)
  out = [f"MQAR accuracy ({metric}), best run per point; made by `{command}`.", "",
         "## Accuracy vs model width", ""]
  for data in panels:
    out += [f"**{_title(data, lines)}**", "", "| architecture | " + " | ".join(f"d={w}" for w in widths) + " |",
            "|---|" + "---|" * len(widths)]
    for arch in archs:
      by_width = dict(points.get((data, arch), []))
      if by_width:
        cells = [f"{by_width[w]['value']:.3f} ({_options(by_width[w])})" if w in by_width else "" for w in widths]
        out.append(f"| {arch} | " + " | ".join(cells) + " |")
    out.append("")
  out += ["## Accuracy vs state size", ""]
  for data in panels:
    pts = states.get(data, [])
    front = set(pareto_frontier((l["state_size"], l["value"]) for l in pts))
    out += [f"**{_title(data, lines)}**", "",
            "| architecture | state size | accuracy | d_model | options | frontier | run |", "|---|---|---|---|---|---|---|"]
    for l in pts:
      mark = "yes" if (l["state_size"], l["value"]) in front else ""
      out.append(f"| {l['arch']} | {l['state_size']:,} | {l['value']:.3f} | {l['d_model']} | {_options(l)} | {mark} "
                 f"| {l['name']} |")
    out.append("")
  return "\n".join(out)


def plot_sweep(out_dir: str, *, dest: str | None = None, metric: str = "final") -> list[str]:
  """Writes the table and both figures for the sweep in `out_dir` (into `dest`, default `out_dir`); without
  matplotlib, the table and then ImportError."""
  lines = load(out_dir, metric)
  dest = dest or out_dir
  os.makedirs(dest, exist_ok=True)
  stem = os.path.join(dest, os.path.basename(os.path.normpath(out_dir)))
  command = f"python -m train.sweep plot {out_dir}" + (f" --out {dest}" if dest != out_dir else "") + (
      f" --metric {metric}" if metric != "final" else "")
  paths = [f"{stem}.md", f"{stem}_width.png", f"{stem}_state.png"]
  with open(paths[0], "w") as f:  # first: the table needs no matplotlib
    f.write(table(lines, metric, command) + "\n")
  plot_width(lines, paths[1], metric)
  plot_state(lines, paths[2], metric)
  return paths
