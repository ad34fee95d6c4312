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


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  """'a/b/c' -> shape for every leaf of a params tree (keys as strings, so saved and built trees compare)."""
  name = lambda path: "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)  # noqa: E731
  return {name(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _saved_shapes(item_dir: str, has_state: bool) -> dict[str, tuple[int, ...]] | None:
  """The parameter shapes a checkpoint item holds, from its metadata (None when orbax cannot say)."""
  try:
    metadata = ocp.PyTreeCheckpointer().metadata(item_dir)
    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    return _shapes(tree["params"] if has_state else tree)
  except Exception:  # noqa: BLE001 - metadata layouts differ between orbax versions: fall back to restoring
    return None


def check_shapes(expected: dict[str, tuple[int, ...]], saved: dict[str, tuple[int, ...]], where: str) -> None:
  """ValueError in one line naming the first parameter whose shape (or presence) differs."""
  differing = [k for k in sorted(set(expected) | set(saved)) if expected.get(k) != saved.get(k)]
  differing.sort(key=lambda k: (k not in expected or k not in saved))  # a shape mismatch says most: first
  for key in differing[:1]:
      raise ValueError(f"checkpoint {where} does not fit the model config: parameter {key} is "
                       f"{saved.get(key, 'absent')} there but {expected.get(key, 'absent')} in the model (is it "
                       f"another model's checkpoint, or the wrong --config?)")


def load_params(model: nnx.Module, checkpoint_dir: str, step: int | None = None) -> int:
  """Overwrites `model`'s parameters with those of a checkpoint (the latest step by default); returns the step.
  A checkpoint of other shapes raises ValueError naming the first differing parameter and both shapes."""
  directory, step = _locate(checkpoint_dir, step)
  params = nnx.state(model, nnx.Param)
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        nnx.to_pure_dict(params))
  items = os.listdir(os.path.join(directory, str(step)))
  item = "params" if "params" in items else "state"
  saved = _saved_shapes(os.path.join(directory, str(step), item), item == "state") if item in items else None
  if saved is not None:
    check_shapes(_shapes(target), saved, f"{directory}/{step}")
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
