"""Time of the packed-document block ranges alone (documents.kernel_ranges, what every segmented Hopper attention
call computes before its kernels: once for the forward, twice for the backward), against the same search with
jnp.searchsorted's default method (a while loop), at the documents benchmark's shape.

  PYTHONPATH=. python benchmarks/scripts/document_ranges_time.py
"""
import functools
import time
from unittest import mock

import jax
import jax.numpy as jnp

from pallas_kernels.attention import documents


def _time(fn, *args, repeats: int = 50) -> float:
  """Median milliseconds of a jitted call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * sorted(times)[len(times) // 2]


def main():
  batch, length, documents_per_row = 4, 8192, 8
  ids = (jnp.arange(length) * documents_per_row // length + 1).astype(jnp.int32)
  ids_BT = jnp.broadcast_to(ids, (batch, length))
  ranges = functools.partial(documents.kernel_ranges, own_block=128, other_block=128, num_own_blocks=length // 128)
  unrolled = _time(jax.jit(ranges), ids_BT, ids_BT)
  default_search = functools.partial(jnp.searchsorted, method="scan")
  with mock.patch.object(documents.jnp, "searchsorted",
                         lambda a, v, side="left", method=None: default_search(a, v, side=side)):
    looped = _time(jax.jit(ranges), ids_BT, ids_BT)
  print(f"kernel_ranges B{batch} S{length} {documents_per_row} documents, {jax.devices()[0].device_kind}: "
        f"unrolled search {unrolled:.3f} ms, while-loop search {looped:.3f} ms (median of 50, dispatch included)")


if __name__ == "__main__":
  main()
