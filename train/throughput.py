"""Training throughput measured honestly: time windows that begin and end with the device idle.

Dispatch is asynchronous: a step returns to Python long before the device has run it, so a clock read after
dispatching k steps measures dispatch, not training (right after compilation or an eval that read 100x the real
rate). Here a window starts when the device has nothing queued (after compilation, an eval, a checkpoint save,
or the last window's sync) and ends right after the host has waited for the window's last step (fetching its
metrics). Eval, checkpoint and compile time fall outside every window and are reported on their own.
The run's rate is the median over windows, leaving out the first (it can include one-time start-up costs) when
there are at least three.
"""

from __future__ import annotations

import dataclasses
import statistics
import time


@dataclasses.dataclass(frozen=True)
class Window:
  steps: int
  seconds: float
  tokens_per_s: float


class Throughput:
  """Windows of training steps; call `start` only with the device idle and `end` only right after a sync."""

  def __init__(self, tokens_per_step: int):
    self.tokens_per_step = tokens_per_step
    self.windows: list[Window] = []
    self._start: tuple[float, int] | None = None

  def start(self, step: int) -> None:
    self._start = (time.perf_counter(), step)

  def end(self, step: int) -> Window | None:
    """Closes the open window at `step` (None when no step ran in it)."""
    if self._start is None:
      return None
    began, first = self._start
    self._start = None
    if step <= first:
      return None
    seconds = max(time.perf_counter() - began, 1e-9)
    window = Window(step - first, seconds, (step - first) * self.tokens_per_step / seconds)
    self.windows.append(window)
    return window

  @property
  def train_s(self) -> float:
    return sum(w.seconds for w in self.windows)

  def median_tokens_per_s(self) -> float | None:
    """The steady-state rate: the median window, the first left out when there are three or more."""
    windows = self.windows[1:] if len(self.windows) >= 3 else self.windows
    return statistics.median(w.tokens_per_s for w in windows) if windows else None
