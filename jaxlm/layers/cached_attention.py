"""Attention of a piece of new tokens over a ring-buffer KV cache and the piece itself: what chunked prefill needs
to continue an attention layer from a partial prompt (jaxlm/layers/attention.py's `extend`).

The cache (attention.py's KVCache) holds a row's last min(n, S) keys in S slots, position p in slot p mod S, for
n tokens seen. A piece of T tokens at positions n .. n+T-1, of which the first `valid_B` are real, attends over

  keys = [the S cache slots ; the T piece keys],   key at position p visible to query q iff p <= q (causal),
                                                   q - p < window (sliding window), and the key is real

which is the parallel form's mask restricted to this piece's queries, so the outputs equal the one-shot prefill's
up to the order of float32 sums. The piece is then written into the ring: token t goes to slot (n + t) mod S when
it is real and among the last S real tokens (so no two writes of a row hit one slot). Memory: the [T, S + T]
logits of one piece per head, not the prompt's [T_prompt, T_prompt].

Letters: B batch, T piece length, S cache slots, H query heads, K kv heads, G = H/K query heads per kv head,
D head dim.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def slot_positions(seen_B: jax.Array, slots: int) -> tuple[jax.Array, jax.Array]:
  """(position held by each slot [B, S], whether it holds one [B, S]) after seen_B tokens of each row: the
  latest p < seen with p ≡ s (mod S)."""
  slot_S = jnp.arange(slots, dtype=jnp.int32)
  back_BS = seen_B[:, None] - 1 - slot_S  # how far the newest token lies past slot s
  return slot_S + slots * (jnp.maximum(back_BS, 0) // slots), back_BS >= 0


def attend_cache_and_piece(q_BTHD: jax.Array, k_BTKD: jax.Array, v_BTKD: jax.Array, k_cache_BSKD: jax.Array,
                           v_cache_BSKD: jax.Array, seen_B: jax.Array, *, window: int | None,
                           softcap: float | None) -> jax.Array:
  """Causal (optionally windowed) softmax attention of the piece's queries over the cache and the piece: out
  [B, T, H, D] in q's dtype; logits and softmax in float32."""
  B, T, H, D = q_BTHD.shape
  S, K = k_cache_BSKD.shape[1], k_cache_BSKD.shape[2]
  cache_pos_BS, cache_real_BS = slot_positions(seen_B, S)
  query_pos_BT = seen_B[:, None] + jnp.arange(T, dtype=jnp.int32)
  key_pos_BS = jnp.concatenate([cache_pos_BS, query_pos_BT], axis=1)  # [B, S + T]
  key_real_BS = jnp.concatenate([cache_real_BS, jnp.ones((B, T), bool)], axis=1)
  # Padded piece keys sit after every real query, so causality alone keeps them out of the real outputs.
  lag_BTS = query_pos_BT[:, :, None] - key_pos_BS[:, None, :]
  mask_BTS = key_real_BS[:, None, :] & (lag_BTS >= 0)
  if window is not None:
    mask_BTS = mask_BTS & (lag_BTS < window)
  keys_BSKD = jnp.concatenate([k_cache_BSKD.astype(k_BTKD.dtype), k_BTKD], axis=1)
  values_BSKD = jnp.concatenate([v_cache_BSKD.astype(v_BTKD.dtype), v_BTKD], axis=1)
  q_BTKGD = q_BTHD.reshape(B, T, K, H // K, D)
  logits_BKGTS = jnp.einsum("btkgd,bskd->bkgts", q_BTKGD, keys_BSKD, preferred_element_type=jnp.float32,
                            precision=jax.lax.Precision.HIGHEST) / math.sqrt(D)
  if softcap is not None:
    logits_BKGTS = softcap * jnp.tanh(logits_BKGTS / softcap)
  # Every query sees at least itself, so no row of the softmax is empty.
  probs_BKGTS = jax.nn.softmax(jnp.where(mask_BTS[:, None, None], logits_BKGTS, -jnp.inf), axis=-1)
  out_BTKGD = jnp.einsum("bkgts,bskd->btkgd", probs_BKGTS, values_BSKD.astype(jnp.float32),
                         precision=jax.lax.Precision.HIGHEST)
  return out_BTKGD.reshape(B, T, H, D).astype(q_BTHD.dtype)


def write_piece(cache_BSKD: jax.Array, x_BTKD: jax.Array, seen_B: jax.Array, valid_B: jax.Array) -> jax.Array:
  """The ring with the piece's real tokens written (token t of row b to slot (seen + t) mod S), in place."""
  S, T = cache_BSKD.shape[1], x_BTKD.shape[1]
  t_BT = jnp.arange(T, dtype=jnp.int32)[None, :]
  # Only the last S real tokens: earlier ones would be overwritten by later ones in the same scatter, whose order
  # among equal indices is unspecified.
  written_BT = (t_BT < valid_B[:, None]) & (t_BT >= valid_B[:, None] - S)
  slot_BT = jnp.where(written_BT, (seen_B[:, None] + t_BT) % S, S)  # slot S is out of range: dropped
  rows_B1 = jnp.arange(cache_BSKD.shape[0])[:, None]
  return cache_BSKD.at[rows_B1, slot_BT].set(x_BTKD.astype(cache_BSKD.dtype), mode="drop")
