"""BASED (Taylor linear attention) benchmark: shapes, FLOP count, our implementations and fla's Triton kernels.

Letters: B batch, T length, H heads, F q/k feature dim, D value head dim (dv), C chunk, P = 1 + F + F²
(width of the 2nd-order Taylor feature map φ(x) = [1, x, x⊗x/√2]). Layout [B, T, H, ·], as fla 0.6 takes it.

Work is counted in FLOPs of the chunked form with C = 64, whatever chunk an implementation uses, so TFLOP/s is
comparable across implementations (it is a rate of this fixed count, not of the work each one does). The
normaliser is counted as one more value column (D + 1), since it is Σ φ(q)·φ(k) times a column of ones:
  forward per (b, t, h) = 2·C·(F + D + 1)   intra-chunk: q·kᵀ over F, then the C×C weights times v (full
                                             C×C, as a chunked kernel computes it before masking)
                        + 2·P·(D + 1)       inter-chunk: φ(q) times the running state [P, D + 1]
                        + 2·P·(D + 1)       state update: φ(k)ᵀ v over the chunk
  fwd_bwd = forward · (1 + 2.5), the attention benchmark's convention.
The op is compute-bound at these shapes (P = 273 for F = 16: ~80 kFLOP per token-head against 320 bytes of
minimal bf16 IO), so TFLOP/s rather than GB/s.
"""

from __future__ import annotations

import dataclasses
import functools

from benchmarks import harness
from benchmarks.harness import BACKWARD_FACTOR, Candidate, Skipped, Suite
from benchmarks.peers import import_fla_based

FLOP_CHUNK = 64


@dataclasses.dataclass(frozen=True)
class BasedShape:
  name: str
  batch: int
  seq_len: int
  num_heads: int
  feature_dim: int = 16  # q/k width per head before the Taylor map
  head_dim: int = 64  # v width per head (dv)


def _shape(batch, seq_len, heads=16, feature_dim=16, head_dim=64, prefix="") -> BasedShape:
  name = f"{prefix}B{batch}-T{seq_len}-H{heads}-F{feature_dim}-D{head_dim}"
  return BasedShape(name, batch, seq_len, heads, feature_dim, head_dim)


DEFAULT = (
    _shape(8, 2048),
    _shape(2, 16384),
    _shape(1, 65536),
    _shape(8, 2048, head_dim=128),
)
TINY = (_shape(2, 128, heads=2, head_dim=32, prefix="tiny-"),)  # CPU smoke run: two chunks of 64
SHAPES = {s.name: s for s in DEFAULT + TINY}
SHAPE_SETS = {"default": tuple(s.name for s in DEFAULT), "tiny": tuple(s.name for s in TINY), "all": tuple(SHAPES)}


def based_flops(shape: BasedShape, mode: str, itemsize: int = 2) -> float:
  del itemsize  # FLOPs do not depend on it
  f, d = shape.feature_dim, shape.head_dim
  expanded = 1 + f + f * f
  per_token_head = 2 * FLOP_CHUNK * (f + d + 1) + 4 * expanded * (d + 1)
  forward = float(shape.batch * shape.seq_len * shape.num_heads * per_token_head)
  return forward * (1.0 + BACKWARD_FACTOR) if mode == "fwd_bwd" else forward


def array_shapes(shape: BasedShape):
  """((q, k, v) shapes, output shape)."""
  qk = (shape.batch, shape.seq_len, shape.num_heads, shape.feature_dim)
  v = (shape.batch, shape.seq_len, shape.num_heads, shape.head_dim)
  return (qk, qk, v), v


def our_candidates(names) -> list[Candidate | Skipped]:
  """Implementations by name; "hopper+hopper_bwd" is "hopper" with its Mosaic GPU backward (by name only)."""
  def make(api, name, shape):
    implementation, _, variant = name.partition("+")
    kwargs = {}
    if variant == "hopper_bwd":
      from pallas_kernels.based import hopper_chunked
      kwargs["block_sizes"] = hopper_chunked.BlockSizes(backward_kernel="hopper")
    elif variant:
      raise ValueError(f"--impls {name}: unknown variant {variant!r} (known: hopper+hopper_bwd)")
    return functools.partial(api.based_linear_attention, normalize=True, implementation=implementation, **kwargs)
  return harness.our_candidates(names, "pallas_kernels.based.api", make)


def peer_candidates() -> list[Candidate | Skipped]:
  names = ("parallel_based", "fused_chunk_based")
  fla_based, reason = import_fla_based()
  if fla_based is None:
    return [Skipped(f"fla:{name}", reason) for name in names]

  def candidate(name: str) -> Candidate:
    kernel = getattr(fla_based, name)
    # fla's defaults (q scaled by F^-1/2, eps 1e-6) change values, not the work timed.
    return Candidate(f"fla:{name}", "torch", lambda shape: functools.partial(kernel, use_norm=True))

  return [candidate(name) for name in names]


SUITE = Suite(
    op="based",
    shapes=SHAPES,
    shape_sets=SHAPE_SETS,
    unit="TFLOP/s",
    work=based_flops,
    array_shapes=array_shapes,
    ours=our_candidates,
    peers=peer_candidates,
    ratio_peers=("fla:parallel_based", "fla:fused_chunk_based"),  # parallel is fla's faster one to T=16k
)
