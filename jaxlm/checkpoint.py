"""Loading trained parameters into an LM from an orbax checkpoint.

Two layouts are read: train/'s (a CheckpointManager under `<run_dir>/checkpoints/<step>/` whose item "state" is
{params, opt_state, step, ...}; only its params are read), and a plain item "params" (an nnx Param state as a
pure dict, e.g. saved by `save_params`). `checkpoint_dir` may be the run directory, its checkpoints directory,
or one step's directory.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp
from flax import nnx


def _locate(checkpoint_dir: str, step: int | None) -> tuple[str, int]:
  """(the CheckpointManager directory, the step to read)."""
  path = os.path.abspath(checkpoint_dir)
  if os.path.isdir(os.path.join(path, "checkpoints")):
    path = os.path.join(path, "checkpoints")
  name = os.path.basename(path.rstrip("/"))
  if name.isdigit() and step is None:  # one step's directory
    return os.path.dirname(path), int(name)
  steps = sorted(int(d) for d in os.listdir(path) if d.isdigit() and os.path.isdir(os.path.join(path, d)))
  if not steps:
    raise FileNotFoundError(f"no checkpoint steps under {path}")
  if step is None:
    return path, steps[-1]
  if step not in steps:
    raise FileNotFoundError(f"no checkpoint for step {step} under {path} (steps: {steps})")
  return path, step


def load_params(model: nnx.Module, checkpoint_dir: str, step: int | None = None) -> int:
  """Overwrites `model`'s parameters with those of a checkpoint (the latest step by default); returns the step."""
  directory, step = _locate(checkpoint_dir, step)
  params = nnx.state(model, nnx.Param)
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        nnx.to_pure_dict(params))
  items = os.listdir(os.path.join(directory, str(step)))
  with ocp.CheckpointManager(directory) as manager:
    if "params" in items:
      restored = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))["params"]
    elif "state" in items:
      # train/'s state also holds the optimizer moments; a partial restore reads the params only.
      args = ocp.args.PyTreeRestore(item={"params": target}, partial_restore=True,
                                    restore_args=ocp.checkpoint_utils.construct_restore_args({"params": target}))
      restored = manager.restore(step, args=ocp.args.Composite(state=args))["state"]["params"]
    else:
      raise FileNotFoundError(f"{directory}/{step} holds neither a 'params' nor a 'state' item: {sorted(items)}")
  nnx.replace_by_pure_dict(params, restored)
  nnx.update(model, params)
  return step


def save_params(model: nnx.Module, directory: str, step: int = 0) -> None:
  """Writes `model`'s parameters as item "params" of step `step` under `directory` (read by `load_params`)."""
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  with ocp.CheckpointManager(os.path.abspath(directory), item_names=("params",)) as manager:
    manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))
    manager.wait_until_finished()
