"""Gated long convolution benchmark (H3 / Hyena's mixing step): y = og ⊙ causal_conv(ig ⊙ u, k) + skip ⊙ u, our
Pallas kernel against XLA's FFT (the reference) and the direct O(L²) form, in GB/s against the device's copy rate
measured in the same run.

Letters: B batch, L length, D channels (FlashFFTConv's and the issue's H). Inputs u, in_gate, out_gate [B, L, D] in
--dtype; the filter k [L, D] and skip [D] in float32, as the layers pass their parameters.

The op is memory-bound (a few hundred FLOPs per element against 8 bytes of bf16 IO), so the unit is GB/s of the
signal bytes a call must move, S = B·L·D·itemsize each:
  fwd      u, ig, og in, y out                        4·S
  fwd_bwd  u, ig, og and the cotangent in, du, d_ig,   7·S   (the gradient alone: its forward output is not
           d_og out                                          needed, and the kernels recompute what they need)
The filter (L·D float32, read once; its gradient written once) and skip are left out of the count: 1/(2B) of the
forward's bytes in bf16, negligible but at B = 1. `xla:copy` copies u and ig (reads 2·S, writes 2·S: the forward's
bytes), so its fwd row is the copy rate and `GB/s` of any row over it is the fraction of the copy bandwidth; it has
no gradient (its fwd_bwd row says so). The ratio column is against `reference`, XLA's FFT path (the issue's
acceptance: >= 5x forward, >= 4x forward+backward at B64 L1024). `direct` materialises the [L, L, D] Toeplitz
matrix, so it is timed up to L = 4096.
"""

from __future__ import annotations

import dataclasses

from benchmarks import harness
from benchmarks.harness import Candidate, Skipped, Suite

DIRECT_MAX_LENGTH = 4096


@dataclasses.dataclass(frozen=True)
class LongConvShape:
  name: str
  batch: int
  seq_len: int
  channels: int


def _shape(batch, seq_len, channels=768, prefix="") -> LongConvShape:
  return LongConvShape(f"{prefix}B{batch}-D{channels}-L{seq_len}", batch, seq_len, channels)


DEFAULT = (
    _shape(64, 1024),  # FlashFFTConv's headline setting
    _shape(16, 4096),
    _shape(4, 16384),
    _shape(1, 65536),
)
TINY = (_shape(2, 256, channels=16, prefix="tiny-"),)  # CPU smoke run
SHAPES = {s.name: s for s in DEFAULT + TINY}
SHAPE_SETS = {"default": tuple(s.name for s in DEFAULT), "tiny": tuple(s.name for s in TINY), "all": tuple(SHAPES)}


def long_conv_bytes(shape: LongConvShape, mode: str, itemsize: int = 2) -> float:
  signal = shape.batch * shape.seq_len * shape.channels * itemsize
  return float((4 if mode == "fwd" else 7) * signal)


def array_shapes(shape: LongConvShape):
  """((u, in_gate, out_gate, k, skip) shapes, output shape)."""
  signal = (shape.batch, shape.seq_len, shape.channels)
  return (signal, signal, signal, (shape.seq_len, shape.channels), (shape.channels,)), signal


def our_candidates(names) -> list[Candidate | Skipped]:
  def make(api, name: str, shape: LongConvShape):
    if name == "direct" and shape.seq_len > DIRECT_MAX_LENGTH:
      raise ValueError(f"direct: the [L, L, D] Toeplitz matrix is timed up to L = {DIRECT_MAX_LENGTH}")

    def call(u, in_gate, out_gate, k, skip):
      return api.long_conv(u, k, skip=skip, in_gate=in_gate, out_gate=out_gate, implementation=name)
    return call
  return harness.our_candidates(names, "pallas_kernels.long_conv.api", make)


def _copy_candidate() -> Candidate:
  """Copies u and ig into one [2, B, L, D] array (harness.copy_peer returns a tuple, which a gradient cannot
  take); asked for a gradient it raises NotImplementedError (an `unsupported` row)."""
  import jax
  import jax.numpy as jnp

  @jax.custom_vjp
  def copy(u, in_gate):
    return jnp.stack([u, in_gate])

  def backward(residuals, cotangent):
    raise NotImplementedError("xla:copy times a copy, not a gradient: its fwd row is the copy rate")

  copy.defvjp(lambda u, in_gate: (copy(u, in_gate), None), backward)
  return Candidate("xla:copy", "jax", lambda shape: lambda u, in_gate, out_gate, k, skip: copy(u, in_gate))


def peer_candidates() -> list[Candidate | Skipped]:
  return [_copy_candidate()]


SUITE = Suite(
    op="long_conv",
    shapes=SHAPES,
    shape_sets=SHAPE_SETS,
    unit="GB/s",
    work=long_conv_bytes,
    array_shapes=array_shapes,
    ours=our_candidates,
    peers=peer_candidates,
    ratio_peers=("reference", "xla:copy"),
    default_impls=("pallas", "reference", "direct"),
    float32_inputs=(3, 4),
)
