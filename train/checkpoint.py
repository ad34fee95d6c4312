"""Checkpoints with orbax's CheckpointManager: periodic async saves, the last N kept, resume with data position.

A checkpoint holds the whole train state (params, optimizer state, step, RNG, skipped-step count; every array
restored straight into its sharding) and the loader's position as JSON. Orbax writes into a temporary folder and
renames it when complete, so a save cut short by a kill is never listed as a step. A finished checkpoint that
fails to restore (a truncated or deleted file) raises `CheckpointError` naming it and the older steps, and nothing
is deleted: older checkpoints are only removed by `keep` after a newer save succeeded.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp

from train.config import CheckpointConfig


class CheckpointError(RuntimeError):
  """A checkpoint is missing or unreadable; the message names it and what else is there."""


class Checkpointer:
  """Saves and restores {state, data} under `<run_dir>/checkpoints/<step>`."""

  def __init__(self, config: CheckpointConfig, run_dir: str):
    self.config = config
    self.directory = os.path.abspath(os.path.join(run_dir, "checkpoints"))
    options = ocp.CheckpointManagerOptions(max_to_keep=config.keep, enable_async_checkpointing=config.async_save,
                                           create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: dict, data_state: dict[str, Any], *, wait: bool = False) -> None:
    """Starts (async) or does a save of `state` at `step`; `wait` blocks until it is on disk."""
    if step in self.manager.all_steps():
      return
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     data=ocp.args.JsonSave(data_state)), force=True)
    if wait:
      self.manager.wait_until_finished()

  def restore(self, abstract_state: dict, step: int | None = None) -> tuple[int, dict, dict[str, Any]] | None:
    """(step, state, data_state) of `step` (None = the latest), or None when there is no checkpoint at all."""
    available = self.steps()
    if step is None:
      if not available:
        return None
      step = available[-1]
    elif step not in available:
      raise CheckpointError(f"no checkpoint for step {step} in {self.directory} (steps there: {available})")
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types for a damaged folder
      older = [s for s in available if s < step]
      # The first line of orbax's error is the fact; the rest is a TensorStore spec hundreds of lines long.
      reason = (str(e).strip().splitlines() or [""])[0][:300]
      raise CheckpointError(
          f"checkpoint step {step} in {self.directory} cannot be restored ({type(e).__name__}: {reason}). "
          f"Nothing was deleted; older checkpoints: {older}. Resume from one with checkpoint.resume_step=N, move "
          f"the damaged folder away, or start a new run (another name or run_dir).") from None
    return step, restored["state"], dict(restored["data"])

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
