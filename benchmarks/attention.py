"""Softmax attention benchmark: shapes, FLOP count, our implementations and the peers.

Letters: B batch, T query length (= S, key length), H query heads, K kv heads, D head dim, W window.
Packed documents (`documents=N`, names ending -docsN): every row holds N equal documents (segment ids 1..N, the
last ones one token longer when N does not divide T), which only our implementations take; compare their rows with
the same shape without documents (the issue's target: 8 documents at <= 0.2x of its time, 1 document within 5%).
Layout [B, T, H, D] everywhere, ours and peers alike (jax.nn and tokamax take it as is).

FLOPs count the two matrix products over the visible (query, key) pairs, as FlashAttention does:
  forward  = 4 · B · H · D · pairs,  pairs = T·S (full), T(T+1)/2 (causal), Σ_t min(t + 1, W) (causal window W),
             summed over the documents of a row when there are several
  fwd_bwd  = forward · (1 + 2.5)     (the backward recomputes logits and runs four more products)
A window W means key s is visible from query t iff t - W < s <= t (W keys, self included), our reference's
convention; jax.nn and tokamax take it as local_window_size = (W - 1, 0).
"""

from __future__ import annotations

import dataclasses
import functools

from benchmarks import harness
from benchmarks.harness import BACKWARD_FACTOR, Candidate, Skipped, Suite
from benchmarks.peers import gpu_missing_reason, import_tokamax


@dataclasses.dataclass(frozen=True)
class AttentionShape:
  name: str
  batch: int
  seq_len: int  # T = S: self-attention
  num_heads: int
  num_kv_heads: int  # < num_heads: grouped-query attention
  head_dim: int
  causal: bool
  window: int | None = None  # keys per query in a causal sliding window, self included
  documents: int | None = None  # equal documents packed in each row (segment ids); None: no segment ids


def _shape(batch, seq_len, heads, head_dim, *, causal, kv_heads=None, window=None, documents=None,
           prefix="") -> AttentionShape:
  kv_heads = kv_heads or heads
  name = f"{prefix}B{batch}-S{seq_len}-H{heads}" + (f"-K{kv_heads}" if kv_heads != heads else "")
  name += f"-D{head_dim}" + ("-causal" if causal else "") + (f"-W{window}" if window else "")
  name += f"-docs{documents}" if documents else ""
  return AttentionShape(name, batch, seq_len, heads, kv_heads, head_dim, causal, window, documents)


DEFAULT = (
    _shape(4, 4096, 16, 128, causal=True),
    _shape(4, 4096, 16, 128, causal=False),
    _shape(16, 2048, 16, 64, causal=True),
    _shape(1, 16384, 16, 128, causal=True),
    _shape(1, 8192, 32, 128, kv_heads=8, causal=True),
    *(_shape(1, 8192, 16, 128, causal=True, window=w) for w in (64, 256, 1024)),
)
# Issue 18's packed-document case: the same call with no segment ids, 8 equal documents, and 1 document.
DOCUMENTS = tuple(_shape(4, 8192, 16, 128, kv_heads=4, causal=True, documents=n) for n in (None, 8, 1))
TINY = (  # CPU smoke runs: every mask path (full, causal, GQA + window) in seconds
    _shape(2, 128, 2, 64, causal=False, prefix="tiny-"),
    _shape(1, 256, 4, 64, kv_heads=2, causal=True, window=32, prefix="tiny-"),
)
SHAPES = {s.name: s for s in DEFAULT + DOCUMENTS + TINY}
SHAPE_SETS = {
    "default": tuple(s.name for s in DEFAULT),
    "documents": tuple(s.name for s in DOCUMENTS),
    "tiny": tuple(s.name for s in TINY),
    "window": tuple(s.name for s in DEFAULT if s.window),
    "all": tuple(SHAPES),
}


def segment_ids(shape: AttentionShape):
  """[T] int32 ids 1..N of the row's equal documents (numpy; None without documents)."""
  import numpy as np
  if not shape.documents:
    return None
  return (np.arange(shape.seq_len) * shape.documents // shape.seq_len + 1).astype(np.int32)


def _pairs(t: int, shape: AttentionShape) -> int:
  """Visible pairs of one document of t tokens."""
  if not shape.causal:
    return t * t
  if shape.window is None or shape.window >= t:
    return t * (t + 1) // 2
  w = shape.window
  return w * (w + 1) // 2 + (t - w) * w  # rows t < W see t + 1 keys, the rest see W


def visible_pairs(shape: AttentionShape) -> int:
  """Number of (query, key) pairs the mask keeps, per batch row and head."""
  if not shape.documents:
    return _pairs(shape.seq_len, shape)
  import numpy as np
  return sum(_pairs(int(n), shape) for n in np.bincount(segment_ids(shape))[1:])


def attention_flops(shape: AttentionShape, mode: str, itemsize: int = 2) -> float:
  del itemsize  # FLOPs do not depend on it
  forward = 4.0 * shape.batch * shape.num_heads * shape.head_dim * visible_pairs(shape)
  return forward * (1.0 + BACKWARD_FACTOR) if mode == "fwd_bwd" else forward


def array_shapes(shape: AttentionShape):
  """((q, k, v) shapes, output shape)."""
  q = (shape.batch, shape.seq_len, shape.num_heads, shape.head_dim)
  kv = (shape.batch, shape.seq_len, shape.num_kv_heads, shape.head_dim)
  return (q, kv, kv), q


def _peer_window(shape: AttentionShape) -> tuple[int, int] | None:
  return None if shape.window is None else (shape.window - 1, 0)


def _ours(api, name: str, shape: AttentionShape):
  ids = segment_ids(shape)
  if ids is not None:
    import jax.numpy as jnp
    ids = jnp.broadcast_to(jnp.asarray(ids), (shape.batch, shape.seq_len))
  implementation, _, variant = name.partition("+")
  kwargs = {}
  if variant == "persistent":  # the Hopper forward as a persistent kernel: one CTA per SM (by name only)
    import jax

    from pallas_kernels.attention import hopper
    sms = getattr(jax.devices()[0], "core_count", None) or 132
    kwargs["block_sizes"] = dataclasses.replace(hopper.BlockSizes.for_shape(head_dim=shape.head_dim),
                                                persistent_ctas=sms)
  elif variant:
    raise ValueError(f"--impls {name}: unknown variant {variant!r} (known: hopper+persistent)")
  return functools.partial(api.attention, causal=shape.causal, window=shape.window, segment_ids=ids,
                           implementation=implementation, **kwargs)


def our_candidates(names) -> list[Candidate | Skipped]:
  """Implementations by name; "hopper+persistent" is "hopper" with a persistent forward (BlockSizes.persistent_ctas
  = the device's SM count)."""
  return harness.our_candidates(names, "pallas_kernels.attention.api", _ours)


def _no_documents(make):
  """Peers here take no segment ids: a packed-document shape is an unsupported row for them."""
  def checked(shape: AttentionShape):
    if shape.documents:
      raise NotImplementedError("this peer is not given segment ids here")
    return make(shape)
  return checked


def _jax_nn(implementation: str) -> Candidate:
  import jax

  def make(shape: AttentionShape):
    return functools.partial(jax.nn.dot_product_attention, is_causal=shape.causal,
                             local_window_size=_peer_window(shape), implementation=implementation)
  return Candidate(f"jax.nn:{implementation}", "jax", _no_documents(make))


def _tokamax(tokamax, implementation: str) -> Candidate:
  def make(shape: AttentionShape):
    return functools.partial(tokamax.dot_product_attention, is_causal=shape.causal,
                             local_window_size=_peer_window(shape), implementation=implementation)
  return Candidate(f"tokamax:{implementation}", "jax", _no_documents(make))


def peer_candidates() -> list[Candidate | Skipped]:
  gpu_reason = gpu_missing_reason()
  peers: list[Candidate | Skipped] = [
      Skipped("jax.nn:cudnn", gpu_reason) if gpu_reason else _jax_nn("cudnn"),
      _jax_nn("xla"),
  ]
  tokamax, reason = import_tokamax()
  for implementation in ("mosaic", "triton"):
    peers.append(_tokamax(tokamax, implementation) if tokamax else Skipped(f"tokamax:{implementation}", reason))
  return peers


SUITE = Suite(
    op="attention",
    shapes=SHAPES,
    shape_sets=SHAPE_SETS,
    unit="TFLOP/s",
    work=attention_flops,
    array_shapes=array_shapes,
    ours=our_candidates,
    peers=peer_candidates,
    ratio_peers=("jax.nn:cudnn", "jax.nn:xla"),
)
