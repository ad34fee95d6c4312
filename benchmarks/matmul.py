"""bf16 matrix product through XLA (cuBLAS on the GPU): the device's dense matmul rate measured in the same run,
the yardstick of the attention issue's "non-causal forward >= 75% of an 8192³ matmul" target.

Letters: M, N, K the product's dims (out [M, N] = a [M, K] @ b [K, N]). FLOPs: 2·M·N·K.
"""

from __future__ import annotations

import dataclasses

from benchmarks.harness import Candidate, Suite


@dataclasses.dataclass(frozen=True)
class MatmulShape:
  name: str
  m: int
  n: int
  k: int


def _shape(m: int, n: int, k: int, prefix: str = "") -> MatmulShape:
  return MatmulShape(f"{prefix}M{m}-N{n}-K{k}", m, n, k)


DEFAULT = (_shape(8192, 8192, 8192),)
TINY = (_shape(128, 128, 128, prefix="tiny-"),)
SHAPES = {s.name: s for s in DEFAULT + TINY}
SHAPE_SETS = {"default": tuple(s.name for s in DEFAULT), "tiny": tuple(s.name for s in TINY), "all": tuple(SHAPES)}


def matmul_flops(shape: MatmulShape, mode: str, itemsize: int = 2) -> float:
  del mode, itemsize
  return 2.0 * shape.m * shape.n * shape.k


def array_shapes(shape: MatmulShape):
  return ((shape.m, shape.k), (shape.k, shape.n)), (shape.m, shape.n)


def peer_candidates() -> list[Candidate]:
  import jax.numpy as jnp

  return [Candidate("xla:dot", "jax", lambda shape: lambda a, b: jnp.dot(a, b, preferred_element_type=a.dtype))]


SUITE = Suite(
    op="matmul",
    shapes=SHAPES,
    shape_sets=SHAPE_SETS,
    unit="TFLOP/s",
    work=matmul_flops,
    array_shapes=array_shapes,
    ours=lambda names: [],  # a yardstick: no implementations of ours
    peers=peer_candidates,
    ratio_peers=("xla:dot",),
    modes=("fwd",),
)
