"""Forward time of the portable long_conv kernel (Triton on a GPU) over block sizes, against XLA's FFT path in the
same run: which (channels per program, warps) keeps a program's complex tile out of local memory. The defaults
(16 channels, 8 warps) ran at 9-120 GB/s on the H100 (2026-12-06), spilling an [N, 16] complex float32 tile.

  PYTHONPATH=. python benchmarks/scripts/long_conv_blocks_time.py [--shapes 64x1024 4x16384]
"""
import argparse
import dataclasses
import functools

import jax
import jax.numpy as jnp

from benchmarks.harness import median_ms
from pallas_kernels.common.target import Target
from pallas_kernels.long_conv import long_conv
from pallas_kernels.long_conv.pallas import BlockSizes

CHANNELS = 768
VARIANTS = ((16, 8), (8, 8), (8, 16), (4, 8), (4, 4), (2, 4))  # (block_d, num_warps)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--shapes", nargs="+", default=["64x1024", "4x16384"], help="BATCHxLENGTH, 768 channels")
  args = parser.parse_args()
  keys = jax.random.split(jax.random.key(0), 5)
  for spec in args.shapes:
    batch, length = map(int, spec.split("x"))
    u, ig, og = (jax.random.normal(k, (batch, length, CHANNELS), jnp.bfloat16) for k in keys[:3])
    k = jax.random.normal(keys[3], (length, CHANNELS), jnp.float32) / length
    skip = jax.random.normal(keys[4], (CHANNELS,), jnp.float32)
    signal_gb = 4 * u.size * u.dtype.itemsize / 1e9
    call = lambda impl, blocks: jax.jit(functools.partial(long_conv, skip=skip, in_gate=ig, out_gate=og,
                                                          implementation=impl, block_sizes=blocks))
    rows = [("reference", None)]
    default = BlockSizes.for_shape(length=length, channels=CHANNELS, dtype=u.dtype, target=Target.current())
    rows += [(f"pallas block_d={d} num_warps={w}", dataclasses.replace(default, block_d=d, num_warps=w))
             for d, w in VARIANTS]
    for name, blocks in rows:
      try:
        fn = call("reference" if blocks is None else "pallas", blocks)
        ms = median_ms(lambda args: fn(*args), jax.block_until_ready, [(u, k)], repeats=10)[0]
        print(f"B{batch} L{length} D{CHANNELS} fwd {name:34s} {ms:8.3f} ms {signal_gb / ms * 1e3:8.1f} GB/s",
              flush=True)
      except Exception as error:  # a variant Triton refuses (resources) is a row, not the end of the run
        print(f"B{batch} L{length} D{CHANNELS} fwd {name:34s} failed: {type(error).__name__}: {str(error)[:120]}")


if __name__ == "__main__":
  main()
