"""Forward and forward+backward time of the portable Monarch kernel (Triton on a GPU) over block sizes, against the
XLA form (auto's) in the same run, on the up projection of the headline MLP (16k tokens, 2048 -> 8192, bf16): which
tiles let the fused kernel's products reach the tensor cores. Its defaults (block_t 16-32 at these widths) ran the
MLP at 0.36-0.64x the XLA form on the H100 (2026-12-07, docs/benchmarks.md).

  PYTHONPATH=. python benchmarks/scripts/monarch_blocks_time.py [--tokens 16384] [--nblocks 4 8]
"""
import argparse
import dataclasses

import jax
import jax.numpy as jnp

from benchmarks.harness import median_ms
from pallas_kernels.monarch import monarch_init, monarch_linear
from pallas_kernels.monarch.pallas import BlockSizes

IN_FEATURES, OUT_FEATURES = 2048, 8192
# (block_t, block_x, block_y, num_warps, num_stages): wider token tiles with more warps, deeper pipelines.
VARIANTS = ((32, 64, 64, 4, 2), (64, 64, 64, 8, 2), (64, 64, 128, 8, 3), (128, 64, 64, 8, 2), (128, 32, 64, 8, 3),
            (128, 64, 128, 8, 2))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--tokens", type=int, default=16384)
  parser.add_argument("--nblocks", type=int, nargs="+", default=[4, 8])
  args = parser.parse_args()
  x = jax.random.normal(jax.random.key(0), (args.tokens, IN_FEATURES), jnp.bfloat16)
  dy = jax.random.normal(jax.random.key(1), (args.tokens, OUT_FEATURES), jnp.bfloat16)
  for nblocks in args.nblocks:
    w1, w2 = monarch_init(jax.random.key(2), IN_FEATURES, OUT_FEATURES, nblocks, dtype=jnp.bfloat16)
    default = BlockSizes()
    rows = [("xla (auto's)", "xla", None)] + [
        (f"pallas t{t} x{bx} y{by} w{w} s{s}", "pallas",
         dataclasses.replace(default, block_t=t, block_x=bx, block_y=by, num_warps=w, num_stages=s))
        for t, bx, by, w, s in VARIANTS]
    for name, impl, blocks in rows:
      fwd = jax.jit(lambda x, w1, w2: monarch_linear(x, w1, w2, implementation=impl, block_sizes=blocks))
      fwd_bwd = jax.jit(lambda x, w1, w2: jax.vjp(fwd, x, w1, w2)[1](dy))
      for mode, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
        try:
          ms = median_ms(lambda a: fn(*a), jax.block_until_ready, [(x, w1, w2)], repeats=10)[0]
          print(f"T{args.tokens} {IN_FEATURES}->{OUT_FEATURES} nb{nblocks} {mode:7s} {name:30s} {ms:8.3f} ms",
                flush=True)
        except Exception as error:  # a variant Triton refuses (resources) is a row, not the end of the run
          print(f"T{args.tokens} {IN_FEATURES}->{OUT_FEATURES} nb{nblocks} {mode:7s} {name:30s} failed: "
                f"{type(error).__name__}: {str(error)[:120]}")


if __name__ == "__main__":
  main()
