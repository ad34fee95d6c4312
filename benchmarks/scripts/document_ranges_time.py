"""Time of the packed-document block ranges alone (documents.kernel_ranges: what a segmented Hopper attention call
computes with XLA before its kernels, once for the forward and twice for the backward) at the documents
benchmark's shape: with one document per row it is about all that the call costs over no segment ids.
Measured on the H100 (2026-12-07): 0.095 ms with the binary search as jnp.searchsorted's while loop, 0.097 ms
unrolled (method="scan_unrolled"). The searches are now counts of comparisons (documents._positions); the
searchsorted form is timed beside them in the same run, as the baseline. Calls back to back can be bound by the
host's dispatch when the device work is this small, so each line also gives the device time alone (the kernels'
sum in a jax.profiler trace, benchmarks/kernel_profile.py; none on a CPU).

  PYTHONPATH=. python benchmarks/scripts/document_ranges_time.py
"""
import functools

import jax
import jax.numpy as jnp

from benchmarks import kernel_profile
from benchmarks.harness import median_ms
from pallas_kernels.attention import documents


def main():
  batch, length, documents_per_row = 4, 8192, 8
  ids = (jnp.arange(length) * documents_per_row // length + 1).astype(jnp.int32)
  ids_BT = jnp.broadcast_to(ids, (batch, length))
  ranges = functools.partial(documents.kernel_ranges, own_block=128, other_block=128, num_own_blocks=length // 128)
  # The baseline: the two searches as binary searches (the form before the counts), nothing else.
  search = jax.vmap(lambda ids_M, keys_J, side: jnp.searchsorted(ids_M, keys_J, side=side), in_axes=(0, 0, None))
  blocks_BJ = ids_BT[:, ::128]
  searches = lambda ids, keys: (search(ids, keys, "left"), search(ids, keys, "right"))
  for name, fn in (("kernel_ranges (counts)", ranges), ("two jnp.searchsorted (baseline)", searches)):
    jitted, args = jax.jit(fn), (ids_BT, ids_BT if fn is ranges else blocks_BJ)
    ms = median_ms(lambda a: jitted(*a), jax.block_until_ready, [args], repeats=20)[0]
    calls = 10
    kernels = kernel_profile.trace(lambda: jax.block_until_ready([jitted(*args) for _ in range(calls)]), calls)
    device = (f"{sum(k.us for k in kernels) / 1e3:.3f} ms in {sum(k.launches for k in kernels):.0f} kernels"
              if kernels else "not traced (no GPU)")
    print(f"{name} B{batch} S{length} {documents_per_row} documents, {jax.devices()[0].device_kind}: "
          f"{ms:.3f} ms (median of 20 samples, calls back to back); device time per call {device}")


if __name__ == "__main__":
  main()
