"""Running an op per shard inside a sharded model.

A Pallas kernel is one custom call that XLA cannot partition, so under a mesh the op's kernel implementations run
through `jax.shard_map` on each device's block: batch split over the data-like mesh axes, heads over the tensor
axis, the sequence kept whole (every op here runs along it). Each array argument is described by a layout string
with one letter per dimension (`"BTHD"`, `"BT"`, `"B"`, ...): `B` is batch, `H`/`K` are heads, any other letter
stays whole. An axis is used only when it divides every dimension it would split. `check_vma=False` because
pallas_call carries no varying-manual-axes information.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
from jax.sharding import Mesh, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")  # mesh axes that split the batch (train/mesh.py names them)
HEAD_AXIS = "tensor"  # the mesh axis that splits heads
_HEAD_LETTERS = "HK"


def current_mesh() -> Mesh | jax.sharding.AbstractMesh | None:
  """The mesh set by `jax.set_mesh`/`jax.sharding.use_mesh`, or None outside one."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty else mesh


def per_shard(fn: Callable[..., Any], *, in_specs: Any, out_specs: Any,
              mesh: Mesh | jax.sharding.AbstractMesh | None = None) -> Callable[..., Any]:
  """`fn` run on each shard of its inputs (as laid out by the specs); `fn` itself when there is no mesh."""
  mesh = mesh if mesh is not None else current_mesh()
  if mesh is None:
    return fn
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def heads_spec(batch_axes: str | tuple[str, ...] | None, head_axis: str | None) -> P:
  """PartitionSpec for a [batch, length, heads, dim] array: batch over `batch_axes`, heads over `head_axis`."""
  return P(batch_axes, None, head_axis, None)


def dividing_axes(mesh, sizes: list[int], candidates: tuple[str, ...], taken: tuple[str, ...] = ()
                  ) -> tuple[str, ...]:
  """The candidate mesh axes, in order, that split every size in `sizes`: an axis is dropped when it is absent,
  of size 1, already `taken`, or when its size times the axes chosen before it does not divide every size (the
  one rule for kernels' shard_map specs here and for parameters' shardings in train/mesh.py)."""
  chosen: list[str] = []
  for axis in candidates:
    if axis in mesh.axis_names and axis not in taken and mesh.shape[axis] > 1:
      product = math.prod(mesh.shape[a] for a in (*chosen, axis))
      if all(size % product == 0 for size in sizes):
        chosen.append(axis)
  return tuple(chosen)


def _spec(layout: str, batch_axes: tuple[str, ...], head_axes: tuple[str, ...]) -> P:
  def axes_of(letter: str):
    if letter == "B":
      return batch_axes or None
    if letter in _HEAD_LETTERS and head_axes:
      return head_axes[0]
    return None
  return P(*(axes_of(letter) for letter in layout))


def _layout_tree(value: Any, layout: Any) -> Any:
  """The layout of every leaf of `value`: one string for all leaves, or a pytree of strings shaped like value."""
  if value is None:
    return None
  return jax.tree.map(lambda _: layout, value) if isinstance(layout, str) else layout


def run_per_shard(fn: Callable[..., Any], arrays: Mapping[str, Any], layouts: Mapping[str, Any],
                  out_layouts: Any, static: Mapping[str, Any], positional: tuple[str, ...]) -> Any:
  """fn(*arrays[positional], **other arrays, **static), per shard under the current mesh (directly without one).

  `arrays` maps argument names to arrays or pytrees of arrays (None allowed); `layouts` gives each a layout
  string (used for every leaf) or a pytree of strings shaped like it; `out_layouts` is shaped like fn's output.
  """
  mesh = current_mesh()

  def call(named):
    args = [named[name] for name in positional]
    kwargs = {name: value for name, value in named.items() if name not in positional}
    return fn(*args, **kwargs, **static)

  if mesh is None:
    return call(dict(arrays))
  leaf_layouts = {name: _layout_tree(value, layouts[name]) for name, value in arrays.items()}
  batch_sizes, head_sizes = [], []
  for name, value in arrays.items():
    for leaf, layout in zip(jax.tree.leaves(value), jax.tree.leaves(leaf_layouts[name])):
      batch_sizes += [size for letter, size in zip(layout, leaf.shape) if letter == "B"]
      head_sizes += [size for letter, size in zip(layout, leaf.shape) if letter in _HEAD_LETTERS]
  batch_axes = dividing_axes(mesh, batch_sizes, BATCH_AXES)
  head_axes = dividing_axes(mesh, head_sizes, (HEAD_AXIS,))
  to_spec = lambda layout: _spec(layout, batch_axes, head_axes)
  in_specs = {name: jax.tree.map(to_spec, leaf_layouts[name]) for name in arrays}
  return per_shard(call, mesh=mesh, in_specs=(in_specs,), out_specs=jax.tree.map(to_spec, out_layouts))(
      dict(arrays))
