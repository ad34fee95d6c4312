"""`log.profile_steps`: which kernels a training step spends its device time in, for an MFU that misses its target.

From step `log.every` on (compiled and warm), that many steps run under jax.profiler; then the run's log gets each
kernel's device time per step (benchmarks/kernel_profile.py: GPU stream events, longest first) and how busy the
device was over the traced steps' wall time. The traced steps count in no throughput window (the tracer costs
time), so tokens/s and MFU stay the untraced steps'. On a CPU the trace holds no device kernels and says so.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax


class StepProfile:
  """Traces steps [first, first + steps) of a run; `active` between `begin` and `finish`."""

  def __init__(self, first: int, steps: int):
    self.first, self.steps = first, steps
    self._folder: tempfile.TemporaryDirectory | None = None
    self._began = 0.0

  @property
  def active(self) -> bool:
    return self._folder is not None

  def due(self, step: int) -> bool:
    """Whether tracing starts before step `step` runs (call with the device idle)."""
    return self.steps > 0 and step == self.first and not self.active

  def begin(self) -> None:
    self._folder = tempfile.TemporaryDirectory()
    jax.profiler.start_trace(self._folder.name)
    self._began = time.perf_counter()

  def close(self) -> None:
    """Stops a trace that a break left open, without a breakdown."""
    if self.active:
      jax.profiler.stop_trace()
      self._folder.cleanup()
      self._folder = None

  def finish(self, step: int, state: Any, last: bool, print_fn: Callable[[str], None]) -> bool:
    """After step `step` ran: once the traced steps are done (or the run's `last` step), waits for `state`, stops
    the trace and prints the breakdown; returns whether it did (the device is then idle)."""
    if not self.active or not (last or step >= self.first + self.steps):
      return False
    from benchmarks import kernel_profile

    jax.block_until_ready(state)
    seconds = time.perf_counter() - self._began
    jax.profiler.stop_trace()
    steps = step - self.first
    try:
      kernels = kernel_profile.read_trace(self._folder.name, steps)
    finally:
      self._folder.cleanup()
      self._folder = None
    per_step_ms = 1e3 * seconds / steps
    busy = f", device busy {sum(k.us for k in kernels) / (1e3 * per_step_ms):.0%}" if kernels else ""
    print_fn(f"kernels of steps {self.first + 1}-{step} under the profiler, per step ({per_step_ms:.1f} ms per "
             f"step traced{busy}):")
    print_fn(kernel_profile.format_breakdown(kernels, top=20))
    return True
