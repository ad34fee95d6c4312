"""What a benchmark run leaves behind: a markdown table on stdout and one JSON line per row, appended to
<out>/<op>-<UTC date>.jsonl together with the device, library versions, command line and time of the run."""

from __future__ import annotations

import dataclasses
import datetime
import json
import pathlib
import platform
import shlex
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from benchmarks.harness import Row

NOTE_WIDTH = 72


def environment(argv: Sequence[str]) -> dict[str, Any]:
  """Where and how this run happened (the fields every JSON line repeats)."""
  import jax

  device = jax.devices()[0]
  env = {
      "device": getattr(device, "device_kind", str(device)),
      "device_count": jax.device_count(),
      "backend": jax.default_backend(),
      "jax_version": jax.__version__,
      "python": platform.python_version(),
      "command": shlex.join(["python", "-m", "benchmarks", *argv]),
      "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }
  if "torch" in sys.modules:  # only when a torch peer was loaded: importing torch just to report it is slow
    env["torch_version"] = sys.modules["torch"].__version__
  return env


def write_jsonl(rows: Sequence[Row], *, op: str, out_dir: str, env: Mapping[str, Any], unit: str,
                dtype: str, repeats: int, ratio_peer: str | None, shapes: Mapping[str, Any],
                skipped: Mapping[str, str]) -> pathlib.Path:
  """Appends one JSON object per row; returns the file written."""
  date = env["timestamp"][:10]
  path = pathlib.Path(out_dir) / f"{op}-{date}.jsonl"
  path.parent.mkdir(parents=True, exist_ok=True)
  rate_key = "tflops" if unit == "TFLOP/s" else "gbps"
  with path.open("a") as f:
    for row in rows:
      record = {"op": op, "impl": row.impl, "shape": row.shape, "mode": row.mode, "dtype": dtype,
                "status": row.status, "ms": row.ms, rate_key: row.rate, "ratio": row.ratio,
                "ratio_peer": ratio_peer, "warmup_s": row.warmup_s, "detail": row.detail,
                "repeats": repeats, "shape_params": dataclasses.asdict(shapes[row.shape]),
                "skipped": dict(skipped), **env}
      if row.kernels:
        record["kernels"] = [dataclasses.asdict(k) for k in row.kernels]
      f.write(json.dumps(record) + "\n")
  return path


def _number(value: float | None, digits: int) -> str:
  if value is None:
    return "-"
  # CPU smoke runs give rates like 0.002 TFLOP/s: keep three significant digits there instead of "0.0".
  return f"{value:.{digits}f}" if value >= 1 else f"{value:.3g}"


def format_table(rows: Sequence[Row], *, unit: str, ratio_peer: str | None) -> str:
  """A markdown table (pastes into docs/benchmarks.md as is)."""
  header = ["implementation", "shape", "mode", "ms", unit, f"vs {ratio_peer or 'peer'}", "note"]
  body = [[r.impl, r.shape, r.mode, _number(r.ms, 3), _number(r.rate, 1),
           "-" if r.ratio is None else f"{r.ratio:.2f}x", r.status if r.status != "ok" else ""]
          for r in rows]
  for line, row in zip(body, rows):
    if row.detail:  # the JSON line keeps the longer message
      line[-1] = f"{row.status}: {row.detail}"[:NOTE_WIDTH]
  widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
  numeric = {3, 4, 5}

  def render(cells):
    return "| " + " | ".join(c.rjust(w) if i in numeric else c.ljust(w)
                             for i, (c, w) in enumerate(zip(cells, widths))) + " |"

  rule = "|" + "|".join("-" * (w + 1) + (":" if i in numeric else "-") for i, w in enumerate(widths)) + "|"
  return "\n".join([render(header), rule, *(render(line) for line in body)])
