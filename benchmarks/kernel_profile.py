"""What a benchmark row's milliseconds are made of: the device time of each kernel one call launches, read from a
jax.profiler trace (CUPTI's activity records on a GPU, whichever framework launched the kernels).

`python -m benchmarks <op> --profile` prints, under the table, each row's kernels: device µs per call, launches per
call, share of the call's device time, and the name (XLA's fusions, our Pallas kernels by their names, cuDNN's,
torch's). The sum can be below the row's milliseconds (gaps between launches: what a launch-bound call loses) and
the names say which part of an op is slow. Only the trace's GPU planes ("/device:GPU:N") count, and on them the
CUDA stream lines ("Stream #N(...)"), since the derived lines ("XLA Ops", "XLA Modules", ...) repeat the same
time; a CPU trace has no device plane, so its breakdown is empty.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import os
import tempfile
from collections.abc import Callable, Sequence

DEVICE_PLANE_PREFIX = "/device:GPU"
STREAM_LINE_PREFIX = "Stream"


@dataclasses.dataclass(frozen=True)
class KernelTime:
  name: str
  launches: float  # per call
  us: float  # device microseconds per call


def breakdown(data, calls: int) -> list[KernelTime]:
  """Per kernel name, the launches and device µs per call over `calls` calls in `data` (a
  jax.profiler.ProfileData), longest first."""
  if calls < 1:
    raise ValueError(f"calls={calls} must be positive")
  total_us: dict[str, float] = collections.defaultdict(float)
  launches: collections.Counter[str] = collections.Counter()
  for plane in data.planes:
    if not plane.name.startswith(DEVICE_PLANE_PREFIX):
      continue
    for line in plane.lines:
      if not line.name.startswith(STREAM_LINE_PREFIX):
        continue
      for event in line.events:
        total_us[event.name] += event.duration_ns / 1e3
        launches[event.name] += 1
  kernels = [KernelTime(name, launches[name] / calls, us / calls) for name, us in total_us.items()]
  return sorted(kernels, key=lambda k: (-k.us, k.name))


def read_trace(folder: str, calls: int) -> list[KernelTime]:
  """The breakdown of the trace jax.profiler wrote under `folder` ([] if it wrote none)."""
  from jax.profiler import ProfileData

  paths = glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True)
  return breakdown(ProfileData.from_file(paths[0]), calls) if paths else []


def trace(run: Callable[[], None], calls: int) -> list[KernelTime]:
  """The breakdown of `run()`, which makes `calls` calls and waits for the device."""
  import jax

  with tempfile.TemporaryDirectory() as folder:
    jax.profiler.start_trace(folder)
    try:
      run()
    finally:
      jax.profiler.stop_trace()
    return read_trace(folder, calls)


def format_breakdown(kernels: Sequence[KernelTime], top: int = 10) -> str:
  """The `top` longest kernels, one per line, and the rest summed; a note where there are none."""
  if not kernels:
    return "    (no device kernels in the trace: a CPU run, or the profiler saw no GPU)"
  total = sum(k.us for k in kernels)
  lines = [f"    {'us/call':>9} {'launches':>8} {'share':>6}  kernel"]
  for k in kernels[:top]:
    lines.append(f"    {k.us:9.1f} {k.launches:8.2f} {k.us / total:6.1%}  {k.name[:90]}")
  rest = kernels[top:]
  if rest:
    us = sum(k.us for k in rest)
    lines.append(f"    {us:9.1f} {sum(k.launches for k in rest):8.2f} {us / total:6.1%}  ({len(rest)} more)")
  lines.append(f"    {total:9.1f} {sum(k.launches for k in kernels):8.2f} {1:6.1%}  device time per call")
  return "\n".join(lines)
