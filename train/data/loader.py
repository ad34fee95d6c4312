"""Batches as a pure function of the step: resumable by saving one integer, identical on every mesh.

Step s of an epoch-based loader reads rows `perm_e[i*B:(i+1)*B]`, where e, i = divmod(s, steps_per_epoch) and
`perm_e` is a permutation seeded by (seed, e). Each host materialises only its share of a batch's rows
(`process_index`-th slice) and `jax.make_array_from_process_local_data` assembles the global array, rows split
over the mesh's `data` x `fsdp` axes; micro-batches are a leading axis [M, B/M, T], so the scan over them in the
train step keeps every micro-batch split over all devices.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from train.mesh import BATCH_AXES

HostBatch = dict[str, np.ndarray]


class RowLoader:
  """Epochs over N rows (shuffled per epoch) read through `read_rows(indices) -> HostBatch`."""

  def __init__(self, num_rows: int, read_rows: Callable[[np.ndarray], HostBatch], batch_size: int, seed: int,
               shuffle: bool = True):
    if num_rows < batch_size:
      raise ValueError(f"{num_rows=} rows cannot fill one batch of {batch_size=}")
    self.num_rows, self.read_rows, self.batch_size = num_rows, read_rows, batch_size
    self.seed, self.shuffle = seed, shuffle
    self.steps_per_epoch = num_rows // batch_size  # the ragged tail is dropped, as drop_last
    self._perm_epoch, self._perm = -1, None

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch != self._perm_epoch:
      self._perm_epoch = epoch
      self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
    return self._perm

  def rows(self, step: int) -> np.ndarray:
    """Global row indices of the batch at `step`."""
    epoch, i = divmod(step, self.steps_per_epoch)
    if not self.shuffle:
      return np.arange(i * self.batch_size, (i + 1) * self.batch_size)
    return self._permutation(epoch)[i * self.batch_size:(i + 1) * self.batch_size]

  def host_batch(self, step: int, process_index: int = 0, process_count: int = 1) -> HostBatch:
    """This host's slice of the batch at `step` (process p reads rows [p*B/P, (p+1)*B/P))."""
    rows = self.rows(step)
    share = len(rows) // process_count
    return self.read_rows(np.sort(rows[process_index * share:(process_index + 1) * share]))


def process_rows(mesh: Mesh, batch_size: int) -> tuple[int, int] | None:
  """[start, stop) of a batch's rows that this process's devices hold (the rows it must supply), None if they
  are not one block. `host_batch` reads the process_index-th equal share, which is right when the mesh gives each
  process one block of the batch axes (jax.make_mesh does, while `tensor` stays within a process)."""
  indices = NamedSharding(mesh, P(BATCH_AXES)).addressable_devices_indices_map((batch_size,)).values()
  rows = sorted({r for (s,) in indices for r in range(*s.indices(batch_size))})
  return (rows[0], rows[-1] + 1) if rows == list(range(rows[0], rows[-1] + 1)) else None


def batch_spec(ndim: int, micro: bool) -> P:
  return P(None, BATCH_AXES, *([None] * (ndim - 1))) if micro else P(BATCH_AXES, *([None] * (ndim - 1)))


def to_global(host: HostBatch, mesh: Mesh, micro_batches: int = 0) -> dict[str, jax.Array]:
  """Device arrays from this host's rows; `micro_batches` > 0 adds the leading micro-batch axis."""
  out = {}
  for name, x in host.items():
    if micro_batches:
      # row r goes to micro-batch r % M so every host contributes equally to each micro-batch
      x = x.reshape(x.shape[0] // micro_batches, micro_batches, *x.shape[1:]).swapaxes(0, 1)
    sharding = NamedSharding(mesh, batch_spec(x.ndim - (1 if micro_batches else 0), bool(micro_batches)))
    out[name] = jax.make_array_from_process_local_data(sharding, x)
  return out
