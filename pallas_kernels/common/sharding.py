"""Running an op per shard inside a sharded model.

Kernels see only their local block, so a sharded model calls them through `per_shard`: batch-like axes split
over the data axes, heads over the tensor axis, the sequence kept whole (every op here is causal along it).
`check_vma=False` because pallas_call does not carry varying-manual-axes information.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import Mesh, PartitionSpec as P


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
