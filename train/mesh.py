"""The device mesh (`data`, `fsdp`, `tensor`) and the logical-axis rules that place parameters and batches on it.

Parameters carry logical axis names (`nnx.with_partitioning`: "vocab", "embed", "heads", ...). `RULES` maps each
onto mesh axes: the model width over `fsdp` (ZeRO-3 style: each fsdp shard owns a slice of every weight and its
optimizer state), heads / mlp / vocab over `tensor` (Megatron style). A mesh axis that does not divide a dimension
is dropped for that array (a 1-head mixer stays whole), so every preset runs on every mesh.
Batches split over `data` x `fsdp`; the sequence stays whole.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pallas_kernels.common.sharding import BATCH_AXES, dividing_axes
from train import distributed
from train.config import ConfigError, MeshConfig

AXES = ("data", "fsdp", "tensor")

# logical axis name -> mesh axes (None: replicated). Activation names are included for models that constrain them.
RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("ssm_state", None),
    ("conv", None),
    ("layers", None),
    ("length", None),
    ("act_embed", None),
)


def maybe_initialize_distributed(config: MeshConfig) -> None:
  """Joins the other processes (train/distributed.py) when the config asks or the environment names a
  coordinator or a process count; a no-op once joined (`python -m train` joins first, from its flags)."""
  distributed.initialize(distributed.cluster_from(), force=config.distributed)


def mesh_shape(config: MeshConfig, num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) sizes with at most one -1 filled in by the devices left over."""
  sizes = [config.data, config.fsdp, config.tensor]
  if sizes.count(-1) > 1:
    raise ConfigError(f"mesh: at most one axis may be -1, got {dict(zip(AXES, sizes))}")
  known = math.prod(s for s in sizes if s != -1)
  for name, size in zip(AXES, sizes):
    if size == 0 or size < -1:
      raise ConfigError(f"mesh.{name}: must be positive or -1, got {size}")
  if -1 in sizes:
    if num_devices % known:
      raise ConfigError(f"mesh: {num_devices} devices do not divide into {dict(zip(AXES, sizes))}")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ConfigError(f"mesh: {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices, have {num_devices}")
  return tuple(sizes)


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The (data, fsdp, tensor) mesh over `devices` (default: all), laid out for the interconnect."""
  devices = list(jax.devices() if devices is None else devices)
  if config.devices:
    if config.devices > len(devices):
      raise ConfigError(f"mesh.devices: {config.devices} requested, {len(devices)} available")
    devices = devices[:config.devices]
  shape = mesh_shape(config, len(devices))
  # Auto axes: jit places what the shardings leave open; shard_map (per_shard) takes over inside kernels.
  return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES), devices=devices)


def _as_tuple(axes: Any) -> tuple[str, ...]:
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_spec(names: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = RULES) -> P:
  """The PartitionSpec for an array of `shape` whose dimensions carry logical `names`.

  Mesh axes that do not divide their dimension, or that an earlier dimension already uses, are dropped.
  """
  if not names:
    return P()
  table = dict(rules)
  used: tuple[str, ...] = ()
  spec = []
  for name, dim in zip(names, shape):
    keep = dividing_axes(mesh, [dim], _as_tuple(table.get(name) if name is not None else None), taken=used)
    used += keep
    spec.append(None if not keep else keep[0] if len(keep) == 1 else keep)
  return P(*spec)


def logical_names(variable: nnx.Variable) -> tuple[str | None, ...] | None:
  """The logical axis names an `nnx.with_partitioning` initializer attached to a variable."""
  metadata = variable.get_metadata()
  names = metadata.get("out_sharding") or metadata.get("sharding_names") or metadata.get("sharding")
  return tuple(names) if names else None


def state_shardings(abstract_state: nnx.State, mesh: Mesh) -> dict:
  """NamedShardings (a pure dict shaped like `abstract_state.to_pure_dict()`) from the variables' axis names."""
  def one(variable):
    return NamedSharding(mesh, logical_to_spec(logical_names(variable), variable.shape, mesh))
  specs = jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.to_pure_dict(specs)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_axis_size(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]
