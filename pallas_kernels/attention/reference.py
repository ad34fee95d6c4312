"""Softmax attention oracles in pure jax.numpy: a quadratic form, a key-chunked online-softmax form (the
recurrence flash-attention kernels run), and single-token decode against a KV cache.

Letters: B batch, T query length, S key length, H query heads, K kv heads, G query heads per kv head (H = K·G),
D head dim, C key chunk length, J number of key chunks.

  logits[b,h,t,s] = scale · q[b,t,h] · k[b,s,h // G]       scale defaults to 1/sqrt(D)
  logits          = softcap · tanh(logits / softcap)       when softcap is set (Gemma 2)
  out[b,t,h]      = Σ_{s visible} softmax_s(logits)[b,h,t,s] · v[b,s,h // G]
  lse[b,h,t]      = log Σ_{s visible} exp(logits[b,h,t,s])

Query t sits at key position p(t) = S - T + t (bottom-right aligned: the queries are the last T tokens of the
sequence, so chunked prefill and decode use the same mask; T == S gives p(t) = t). Key s is visible iff
  (not causal or s <= p) and (window is None or p - s < window) and (window_right is None or s - p <= window_right)
  and segment_ids[b, t] == kv_segment_ids[b, s].
A query with no visible key gives out = 0 and lse = -inf, with zero (not NaN) gradients.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.common.precision import exact_matmuls


def _compute_dtype(dtype) -> jnp.dtype:
  # float32 at least; float64 inputs (gradient checks under x64) stay float64.
  return jnp.promote_types(dtype, jnp.float32)


def visible_mask(q_positions, k_positions, *, causal: bool, window: int | None,
                 window_right: int | None) -> jax.Array:
  """mask[..., t, s]: whether the key at k_positions[..., s] is visible from the query at q_positions[..., t]."""
  p = q_positions[..., :, None]
  s = k_positions[..., None, :]
  mask = jnp.ones(jnp.broadcast_shapes(p.shape, s.shape), dtype=bool)
  if causal:
    mask &= s <= p
  if window is not None:
    mask &= p - s < window
  if window_right is not None:
    mask &= s - p <= window_right
  return mask


def _segments(segment_ids_BT, kv_segment_ids_BS, batch: int, q_len: int, kv_len: int):
  """(segment_ids_BT, kv_segment_ids_BS) with the defaults filled in: one segment when none are given."""
  if segment_ids_BT is None:
    if kv_segment_ids_BS is not None:
      raise ValueError("kv_segment_ids needs segment_ids as well")
    return jnp.zeros((batch, q_len), jnp.int32), jnp.zeros((batch, kv_len), jnp.int32)
  if kv_segment_ids_BS is None:
    if q_len != kv_len:
      raise ValueError(f"kv_segment_ids is required when q_len={q_len} != kv_len={kv_len}")
    kv_segment_ids_BS = segment_ids_BT
  return segment_ids_BT, kv_segment_ids_BS


def _grouped(q_BTHD: jax.Array, num_kv_heads: int) -> jax.Array:
  """q as [B, T, K, G, D]: query head h = k·G + g shares kv head k, so K/V are never repeated."""
  B, T, H, D = q_BTHD.shape
  return q_BTHD.reshape(B, T, num_kv_heads, H // num_kv_heads, D)


def _logits(q_BTKGD, k_BSKD, scale: float, softcap: float | None) -> jax.Array:
  logits_BKGTS = jnp.einsum("btkgd,bskd->bkgts", q_BTKGD, k_BSKD) * scale
  if softcap is not None:
    logits_BKGTS = softcap * jnp.tanh(logits_BKGTS / softcap)
  return logits_BKGTS


def _masked_attention(q_BTKGD, k_BSKD, v_BSKD, mask_BTS, scale: float, softcap: float | None):
  """(out_BTKGD, lse_BKGT) over the visible keys; rows with none give 0 and -inf."""
  logits_BKGTS = jnp.where(mask_BTS[:, None, None], _logits(q_BTKGD, k_BSKD, scale, softcap), -jnp.inf)
  # The shift only keeps exp in range and softmax is invariant to it, so no gradient flows through it; a row
  # with no visible key has max -inf and is shifted by 0 instead, so exp(-inf) = 0 rather than NaN.
  max_BKGT = lax.stop_gradient(jnp.max(logits_BKGTS, axis=-1))
  max_BKGT = jnp.where(jnp.isfinite(max_BKGT), max_BKGT, 0.0)
  weights_BKGTS = jnp.exp(logits_BKGTS - max_BKGT[..., None])
  denom_BKGT = jnp.sum(weights_BKGTS, axis=-1)
  has_keys_BKGT = denom_BKGT > 0
  # log/divide by a safe 1 in empty rows, so their gradients are 0 rather than 0 · inf.
  denom_BKGT = jnp.where(has_keys_BKGT, denom_BKGT, 1.0)
  probs_BKGTS = weights_BKGTS / denom_BKGT[..., None]
  out_BTKGD = jnp.einsum("bkgts,bskd->btkgd", probs_BKGTS, v_BSKD)
  lse_BKGT = jnp.where(has_keys_BKGT, max_BKGT + jnp.log(denom_BKGT), -jnp.inf)
  return out_BTKGD, lse_BKGT


def _finish(out_BTKGD, lse_BKGT, q_BTHD, return_lse: bool):
  B, T, H, D = q_BTHD.shape
  out_BTHD = out_BTKGD.reshape(B, T, H, D).astype(q_BTHD.dtype)
  if not return_lse:
    return out_BTHD
  return out_BTHD, lse_BKGT.reshape(B, H, T)


@exact_matmuls
def attention(q_BTHD: jax.Array, k_BSKD: jax.Array, v_BSKD: jax.Array, *, causal: bool = False,
              window: int | None = None, window_right: int | None = None, segment_ids=None,
              kv_segment_ids=None, scale: float | None = None, softcap: float | None = None,
              return_lse: bool = False):
  """out_BTHD (and lse_BHT) = softmax(mask(softcap(scale · q kᵀ))) v, materialising the [T, S] logits."""
  B, T, H, D = q_BTHD.shape
  S, K = k_BSKD.shape[1], k_BSKD.shape[2]
  scale = 1.0 / math.sqrt(D) if scale is None else scale
  dtype = _compute_dtype(q_BTHD.dtype)
  seg_BT, kv_seg_BS = _segments(segment_ids, kv_segment_ids, B, T, S)
  mask_TS = visible_mask(jnp.arange(T) + (S - T), jnp.arange(S), causal=causal, window=window,
                         window_right=window_right)
  mask_BTS = mask_TS & (seg_BT[:, :, None] == kv_seg_BS[:, None, :])
  out_BTKGD, lse_BKGT = _masked_attention(_grouped(q_BTHD.astype(dtype), K), k_BSKD.astype(dtype),
                                          v_BSKD.astype(dtype), mask_BTS, scale, softcap)
  return _finish(out_BTKGD, lse_BKGT, q_BTHD, return_lse)


@exact_matmuls
def attention_chunked(q_BTHD: jax.Array, k_BSKD: jax.Array, v_BSKD: jax.Array, *, causal: bool = False,
                      window: int | None = None, window_right: int | None = None, segment_ids=None,
                      kv_segment_ids=None, scale: float | None = None, softcap: float | None = None,
                      return_lse: bool = False, chunk_size: int = 16):
  """`attention` by an online softmax over key chunks of `chunk_size` (lax.scan), never holding [T, S].

  Per chunk: m' = max(m, max_c logits), l' = l·exp(m - m') + Σ_c exp(logits - m'),
  acc' = acc·exp(m - m') + Σ_c exp(logits - m') v; then out = acc / l and lse = m + log l.
  """
  B, T, H, D = q_BTHD.shape
  S, K = k_BSKD.shape[1], k_BSKD.shape[2]
  G, C = H // K, chunk_size
  J = -(-S // C)
  scale = 1.0 / math.sqrt(D) if scale is None else scale
  dtype = _compute_dtype(q_BTHD.dtype)
  seg_BT, kv_seg_BS = _segments(segment_ids, kv_segment_ids, B, T, S)
  q_BTKGD = _grouped(q_BTHD.astype(dtype), K)
  q_positions_T = jnp.arange(T) + (S - T)

  # [B, S, ...] -> [J, B, C, ...], padded to J·C keys; the padding sits at positions >= S, which the mask hides.
  def chunks(x):
    x = jnp.pad(x, [(0, 0), (0, J * C - S)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(B, J, C, *x.shape[2:]), 1, 0)

  xs = (chunks(k_BSKD.astype(dtype)), chunks(v_BSKD.astype(dtype)), chunks(kv_seg_BS),
        jnp.arange(J * C).reshape(J, C))

  def step(carry, chunk):
    max_BKGT, denom_BKGT, acc_BKGTD = carry
    k_BCKD, v_BCKD, kv_seg_BC, positions_C = chunk
    mask_TC = visible_mask(q_positions_T, positions_C, causal=causal, window=window,
                           window_right=window_right) & (positions_C < S)
    mask_BTC = mask_TC & (seg_BT[:, :, None] == kv_seg_BC[:, None, :])
    logits_BKGTC = jnp.where(mask_BTC[:, None, None], _logits(q_BTKGD, k_BCKD, scale, softcap), -jnp.inf)
    # As in `attention`: the running max is a constant shift (no gradient), and 0 while a row has seen no key.
    new_max_BKGT = lax.stop_gradient(jnp.maximum(max_BKGT, jnp.max(logits_BKGTC, axis=-1)))
    shift_BKGT = jnp.where(jnp.isfinite(new_max_BKGT), new_max_BKGT, 0.0)
    rescale_BKGT = jnp.exp(max_BKGT - shift_BKGT)
    weights_BKGTC = jnp.exp(logits_BKGTC - shift_BKGT[..., None])
    denom_BKGT = denom_BKGT * rescale_BKGT + jnp.sum(weights_BKGTC, axis=-1)
    acc_BKGTD = (acc_BKGTD * rescale_BKGT[..., None]
                 + jnp.einsum("bkgtc,bckd->bkgtd", weights_BKGTC, v_BCKD))
    return (new_max_BKGT, denom_BKGT, acc_BKGTD), None

  init = (jnp.full((B, K, G, T), -jnp.inf, dtype), jnp.zeros((B, K, G, T), dtype),
          jnp.zeros((B, K, G, T, D), dtype))
  (max_BKGT, denom_BKGT, acc_BKGTD), _ = lax.scan(step, init, xs)
  has_keys_BKGT = denom_BKGT > 0
  denom_BKGT = jnp.where(has_keys_BKGT, denom_BKGT, 1.0)
  out_BTKGD = jnp.einsum("bkgtd->btkgd", acc_BKGTD / denom_BKGT[..., None])
  shift_BKGT = jnp.where(jnp.isfinite(max_BKGT), max_BKGT, 0.0)
  lse_BKGT = jnp.where(has_keys_BKGT, shift_BKGT + jnp.log(denom_BKGT), -jnp.inf)
  return _finish(out_BTKGD, lse_BKGT, q_BTHD, return_lse)


@exact_matmuls
def attention_decode(q_BHD: jax.Array, k_cache_BSKD: jax.Array, v_cache_BSKD: jax.Array,
                     lengths_B: jax.Array, *, scale: float | None = None, softcap: float | None = None,
                     window: int | None = None) -> jax.Array:
  """out_BHD for one new query per row at position lengths[b] - 1 over cache keys [0, lengths[b]).

  Only the last `window` of those keys when window is set; a row with length 0 sees no key and gives 0.
  """
  B, H, D = q_BHD.shape
  S, K = k_cache_BSKD.shape[1], k_cache_BSKD.shape[2]
  scale = 1.0 / math.sqrt(D) if scale is None else scale
  dtype = _compute_dtype(q_BHD.dtype)
  # Causal from position lengths - 1 is exactly "s < lengths": cache slots past a row's length stay hidden.
  mask_B1S = visible_mask(lengths_B[:, None] - 1, jnp.arange(S), causal=True, window=window, window_right=None)
  out_B1KGD, _ = _masked_attention(_grouped(q_BHD[:, None].astype(dtype), K), k_cache_BSKD.astype(dtype),
                                   v_cache_BSKD.astype(dtype), mask_B1S, scale, softcap)
  return out_B1KGD.reshape(B, H, D).astype(q_BHD.dtype)
