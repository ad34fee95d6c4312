"""Public softmax attention (prefill/training and single-token decode): input checks, then `implementation=`
dispatch. The math and masking rules are in reference.py. `block_sizes=` tunes the kernel that runs: hopper.BlockSizes
(its `.backward` tunes the Hopper backward), pallas.BlockSizes, decode.BlockSizes.

Letters: B batch, T query length, S key length, H query heads, K kv heads, D head dim.
"""

from __future__ import annotations

import numbers

import jax

from pallas_kernels.attention import decode, hopper, pallas, reference
from pallas_kernels.common import validation
from pallas_kernels.common.dispatch import Dispatcher, Implementation, require
from pallas_kernels.common.target import Target


def _pallas_supports(*, head_dim: int, **_) -> str | None:
  # Head dims up to 256 are what the kernel tests cover (64/80/128 in CI, more on the GPU machine).
  return require(head_dim <= 256, f"{head_dim=} > 256")


# The chunked (online-softmax) oracle is only taken by name: it mirrors a flash kernel's recurrence for tests.
ATTENTION = Dispatcher("attention", (
    # The Mosaic GPU kernels: sm90 only, 16-bit inputs, head dim up to 128 (other than 64/128 zero-padded to the next
    # of them, so every preset's head dim runs here); the portable kernel covers the rest.
    Implementation("hopper", hopper.flash_attention, supports=hopper.supports, backends=("gpu",), per_shard=True,
                   block_sizes=hopper.BlockSizes),
    # Interpret mode is far slower than XLA on CPU, so auto takes the kernel only on GPU and TPU.
    Implementation("pallas", pallas.flash_attention, supports=_pallas_supports, auto_backends=("gpu", "tpu"),
                   per_shard=True, block_sizes=pallas.BlockSizes),
    Implementation("reference_chunked", reference.attention_chunked, in_auto=False),
    Implementation("reference", reference.attention),
))
ATTENTION_DECODE = Dispatcher("attention_decode", (
    Implementation("pallas", decode.attention_decode, supports=_pallas_supports, auto_backends=("gpu", "tpu"),
                   per_shard=True, block_sizes=decode.BlockSizes),
    Implementation("reference", reference.attention_decode),
))


def _check_options(*, window, window_right=None, scale, softcap) -> None:
  if window is not None and (not isinstance(window, numbers.Integral) or window < 1):
    raise ValueError(f"window must be an integer >= 1 (the number of most recent keys seen), got {window!r}")
  if window_right is not None and (not isinstance(window_right, numbers.Integral) or window_right < 0):
    raise ValueError(f"window_right must be an integer >= 0, got {window_right!r}")
  validation.check_positive("scale", scale, allow_none=True)
  validation.check_positive("softcap", softcap, allow_none=True)


def _check_kv(q_name: str, q: jax.Array, k_name: str, k: jax.Array, v_name: str, v: jax.Array) -> None:
  """k and v [B, S, K, D] agreeing with q (batch first, head dim last) in batch, head dim and dtype."""
  for name, x in ((q_name, q), (k_name, k), (v_name, v)):
    validation.check_dtype(name, x)
  validation.check_same_dtype(**{q_name: q, k_name: k, v_name: v})
  validation.check_dim(k_name, k, 0, q.shape[0], "batch")
  validation.check_dim(k_name, k, 3, q.shape[-1], "head dim")
  validation.check_shape(v_name, v, k.shape, f"the shape of {k_name}")
  validation.check_heads_divide(q.shape[-2], k.shape[2])


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False, window: int | None = None,
              window_right: int | None = None, segment_ids: jax.Array | None = None,
              kv_segment_ids: jax.Array | None = None, scale: float | None = None,
              softcap: float | None = None, return_lse: bool = False, implementation: str = "auto",
              block_sizes: hopper.BlockSizes | pallas.BlockSizes | None = None):
  """Softmax attention of q [B,T,H,D] over k, v [B,S,K,D]: out [B,T,H,D] (and lse [B,H,T] float32); block_sizes
  must be the running implementation's (name it), None its defaults for the shape."""
  validation.check_rank("q", q, 4, "batch, q_len, heads, head_dim")
  validation.check_rank("k", k, 4, "batch, kv_len, kv_heads, head_dim")
  validation.check_rank("v", v, 4, "batch, kv_len, kv_heads, head_dim")
  _check_kv("q", q, "k", k, "v", v)
  _check_options(window=window, window_right=window_right, scale=scale, softcap=softcap)
  B, T, H, D = q.shape
  S, K = k.shape[1], k.shape[2]
  if segment_ids is None and kv_segment_ids is not None:
    raise ValueError("kv_segment_ids was given without segment_ids; pass both (or neither)")
  if segment_ids is not None:
    validation.check_segment_ids("segment_ids", segment_ids, B, T)
    if kv_segment_ids is None and T != S:
      raise ValueError(f"kv_segment_ids is required when q_len={T} != kv_len={S} (segment_ids cover the "
                       f"queries only)")
    if kv_segment_ids is not None:
      validation.check_segment_ids("kv_segment_ids", kv_segment_ids, B, S)
  options = dict(batch=B, q_len=T, kv_len=S, num_heads=H, num_kv_heads=K, head_dim=D, dtype=q.dtype,
                 causal=causal, window=window, window_right=window_right, segmented=segment_ids is not None,
                 softcapped=softcap is not None, return_lse=return_lse)
  return ATTENTION.run(
      implementation, options, positional=("q", "k", "v"),
      arrays=dict(q=q, k=k, v=v, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids),
      layouts=dict(q="BTHD", k="BSKD", v="BSKD", segment_ids="BT", kv_segment_ids="BS"),
      out_layouts=("BTHD", "BHT") if return_lse else "BTHD",
      static=dict(causal=causal, window=window, window_right=window_right, scale=scale, softcap=softcap,
                  return_lse=return_lse), block_sizes=block_sizes)


def attention_decode(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array, *,
                     scale: float | None = None, softcap: float | None = None, window: int | None = None,
                     implementation: str = "auto", block_sizes: decode.BlockSizes | None = None) -> jax.Array:
  """One query per row q [B,H,D] at position lengths[b] - 1 over cache slots [0, lengths[b]): out [B,H,D]."""
  validation.check_rank("q", q, 3, "batch, heads, head_dim")
  validation.check_rank("k_cache", k_cache, 4, "batch, max_len, kv_heads, head_dim")
  validation.check_rank("v_cache", v_cache, 4, "batch, max_len, kv_heads, head_dim")
  _check_kv("q", q, "k_cache", k_cache, "v_cache", v_cache)
  _check_options(window=window, scale=scale, softcap=softcap)
  B, H, D = q.shape
  S, K = k_cache.shape[1], k_cache.shape[2]
  validation.check_lengths("lengths", lengths, B, S)
  options = dict(batch=B, max_len=S, num_heads=H, num_kv_heads=K, head_dim=D, dtype=q.dtype, window=window,
                 softcapped=softcap is not None)
  return ATTENTION_DECODE.run(
      implementation, options, positional=("q", "k_cache", "v_cache", "lengths"),
      arrays=dict(q=q, k_cache=k_cache, v_cache=v_cache, lengths=lengths),
      layouts=dict(q="BHD", k_cache="BSKD", v_cache="BSKD", lengths="B"), out_layouts="BHD",
      static=dict(scale=scale, softcap=softcap, window=window), block_sizes=block_sizes)


def decode_cache_head_dim(head_dim: int, implementation: str = "auto") -> int:
  """The head dim to store a KV cache at so that attention_decode(implementation) reads it where it lies.

  The portable kernel's Triton tiles (and interpret mode's, which stand in for them) are powers of two; a cache of
  any other head dim is padded, so copied, on every call: transformer-1.3b (head dim 70) decoded at 14% of the
  H100's HBM rate, where transformer-360m (64) reached 60-86%. A cache stored zero-padded costs D_pad/D of the
  bytes once instead; zero key and value columns change no logit and no output (pass the scale of the real D).
  """
  options = dict(batch=1, max_len=1, num_heads=1, num_kv_heads=1, head_dim=head_dim, dtype=jax.numpy.bfloat16,
                 window=None, softcapped=False)
  if ATTENTION_DECODE.select(implementation, **options).name != "pallas":
    return head_dim
  return Target.current().padded_dim(head_dim)
