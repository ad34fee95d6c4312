"""Attention decode benchmark: one query token per row against a full KV cache, in GB/s against the device's copy
rate measured in the same run (the step is memory-bound: every cached key and value is read once).

Letters: B batch, S cache length (every row full), H query heads, K kv heads, D head dim.

Bytes counted: the cache read once, 2·B·S·K·D·itemsize, plus q in and the output out (2·B·H·D·itemsize). The
`xla:copy` peer copies the key cache (read B·S·K·D, write as much): the same bytes as the cache read, so the
ratio column is the fraction of the copy bandwidth a kernel reaches (the issue's target: >= 0.70).
"""

from __future__ import annotations

import dataclasses
import functools

from benchmarks import harness
from benchmarks.harness import Candidate, Skipped, Suite, copy_peer


@dataclasses.dataclass(frozen=True)
class DecodeShape:
  name: str
  batch: int
  cache_len: int
  num_heads: int
  num_kv_heads: int
  head_dim: int


def _shape(batch, cache_len, heads, kv_heads, head_dim, prefix="") -> DecodeShape:
  name = f"{prefix}B{batch}-S{cache_len}-H{heads}-K{kv_heads}-D{head_dim}"
  return DecodeShape(name, batch, cache_len, heads, kv_heads, head_dim)


DEFAULT = (
    _shape(64, 8192, 16, 4, 128),  # the acceptance shape
    _shape(1, 8192, 16, 4, 128),
    _shape(16, 32768, 32, 8, 128),
)
TINY = (_shape(2, 256, 4, 2, 64, prefix="tiny-"),)
SHAPES = {s.name: s for s in DEFAULT + TINY}
SHAPE_SETS = {"default": tuple(s.name for s in DEFAULT), "tiny": tuple(s.name for s in TINY), "all": tuple(SHAPES)}


def decode_bytes(shape: DecodeShape, mode: str, itemsize: int = 2) -> float:
  del mode  # forward only
  cache = 2 * shape.batch * shape.cache_len * shape.num_kv_heads * shape.head_dim
  return float((cache + 2 * shape.batch * shape.num_heads * shape.head_dim) * itemsize)


def array_shapes(shape: DecodeShape):
  """((q, k_cache, v_cache) shapes, output shape)."""
  q = (shape.batch, shape.num_heads, shape.head_dim)
  cache = (shape.batch, shape.cache_len, shape.num_kv_heads, shape.head_dim)
  return (q, cache, cache), q


def our_candidates(names) -> list[Candidate | Skipped]:
  def make(api, name: str, shape: DecodeShape):
    import jax.numpy as jnp
    lengths = jnp.full((shape.batch,), shape.cache_len, jnp.int32)  # every row's cache full
    return functools.partial(api.attention_decode, lengths=lengths, implementation=name)
  return harness.our_candidates(names, "pallas_kernels.attention.api", make)


def peer_candidates() -> list[Candidate | Skipped]:
  return [copy_peer(lambda inputs: inputs[1:2])]  # the key cache: as many bytes as the whole cache read


SUITE = Suite(
    op="attention_decode",
    shapes=SHAPES,
    shape_sets=SHAPE_SETS,
    unit="GB/s",
    work=decode_bytes,
    array_shapes=array_shapes,
    ours=our_candidates,
    peers=peer_candidates,
    ratio_peers=("xla:copy",),
    modes=("fwd",),
)
