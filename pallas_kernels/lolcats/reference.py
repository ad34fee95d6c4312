"""LoLCATs hybrid attention oracles in jax.numpy: the quadratic form with explicit masks, and the recurrent form
(a decode step with a linear-attention state and a ring buffer of the last `window` keys, scanned over tokens).

LoLCATs (Zhang et al. 2024, "LoLCATs: On Low-Rank Linearizing of Large Language Models"; HazyResearch/lolcats,
`hybrid_attention_quadratic`) mixes, for query t, softmax attention over the last w keys (itself included) with
linear attention over every earlier key, under one normaliser:

  window  W_t = {s : t - w < s <= t}          linear  L_t = {s : s <= t - w}
  s_ts = q_t·k_s / √D,   m_t = max_{s in W_t} s_ts
  y_t = (a Σ_{W_t} exp(s_ts - m_t) v_s + b Σ_{L_t} (f_t·g_s) v_s) / (a Σ_{W_t} exp(s_ts - m_t) + b Σ_{L_t} f_t·g_s)

with f = phi_q(q), g = phi_k(k) the feature-mapped queries and keys (their widths X), and per-head factors
a = window_factor, b = linear_factor (LoLCATs: a = sigmoid(w_h), b = 1 or 1 - a). As in LoLCATs the window term
is shifted by its own maximum m_t but the linear term is not, so y depends on m_t (this is the formula their
checkpoints were trained with, and gradients flow through m_t to the arg-max score). Since W_t holds t itself,
the window sum is at least a > 0 and no eps is needed. Dividing through by a shows that only b/a matters: the
kernels take f·(b/a) as the query features and no factors.

GQA: q and the features have H heads, k and v have K heads (query head h reads kv head h // (H/K)); the feature
maps are per query head (LoLCATs applies them after repeating k), so the linear state is per query head.

Every form computes in float32 (float64 when given float64) and returns y in v's dtype.

Letters: B batch, T query length, S key length (ring slots in the decode state), H heads, K kv heads, D head dim,
X feature width (after the feature map).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.common.precision import exact_matmuls


class LolcatsState(NamedTuple):
  """The decode state after `lengths` tokens: Σ g_s v_sᵀ and Σ g_s over the keys that left the window (float32),
  and a ring of the last `window` keys and values (position p in slot p mod window)."""

  kv_BHXD: jax.Array
  k_sum_BHX: jax.Array
  k_ring_BSKD: jax.Array
  v_ring_BSKD: jax.Array
  lengths_B: jax.Array  # tokens seen per row, int32

  @classmethod
  def zeros(cls, batch: int, heads: int, kv_heads: int, head_dim: int, feature_width: int, window: int,
            dtype=jnp.float32) -> "LolcatsState":
    """The empty state: no token seen; the ring in `dtype` (the keys' dtype), the sums float32."""
    b, h, k, d, x = batch, heads, kv_heads, head_dim, feature_width
    return cls(jnp.zeros((b, h, x, d), jnp.float32), jnp.zeros((b, h, x), jnp.float32),
               jnp.zeros((b, window, k, d), dtype), jnp.zeros((b, window, k, d), dtype),
               jnp.zeros((b,), jnp.int32))


def _compute_dtype(*arrays: jax.Array):
  # float32 for float32/bf16/f16 inputs; float64 stays float64 so gradient checks run in double precision.
  return jnp.result_type(jnp.float32, *(x.dtype for x in arrays))


def window_masks(length: int, window: int) -> tuple[jax.Array, jax.Array]:
  """(window_TS, linear_TS): key s is in query t's window when t - window < s <= t, linear when s <= t - window."""
  t = jnp.arange(length)[:, None]
  s = jnp.arange(length)[None, :]
  return (s <= t) & (s > t - window), s <= t - window


def term_factors(window_factor, linear_factor, heads: int, dtype) -> tuple[jax.Array, jax.Array]:
  """(a, b) [H] in dtype: the factors, 1 where None."""
  ones = jnp.ones((heads,), dtype)
  a = ones if window_factor is None else jnp.asarray(window_factor, dtype) * ones
  b = ones if linear_factor is None else jnp.asarray(linear_factor, dtype) * ones
  return a, b


def _repeat_kv(x_BTKD: jax.Array, heads: int) -> jax.Array:
  """[..., K, D] -> [..., H, D]: query head h reads kv head h // (H/K)."""
  return jnp.repeat(x_BTKD, heads // x_BTKD.shape[-2], axis=-2)


@functools.partial(jax.jit, static_argnames=("window",))
@exact_matmuls
def lolcats_quadratic(q_BTHD, k_BTKD, v_BTKD, fq_BTHX, fk_BTHX, *, window: int = 64,
                      window_factor=None, linear_factor=None):
  """y [B, T, H, D] from [T, T] masked scores: the window term exp(s - m) and the linear term f·g, one normaliser."""
  dtype = _compute_dtype(q_BTHD, k_BTKD, v_BTKD, fq_BTHX, fk_BTHX)
  heads, length = q_BTHD.shape[2], q_BTHD.shape[1]
  q, fq, fk = (x.astype(dtype) for x in (q_BTHD, fq_BTHX, fk_BTHX))
  k, v = (_repeat_kv(x.astype(dtype), heads) for x in (k_BTKD, v_BTKD))
  a_H, b_H = term_factors(window_factor, linear_factor, heads, dtype)
  in_window_TS, in_linear_TS = window_masks(length, window)
  s_BHTS = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.shape[-1])
  s_BHTS = jnp.where(in_window_TS, s_BHTS, -jnp.inf)
  m_BHT1 = jnp.max(s_BHTS, axis=-1, keepdims=True)  # finite: t is in its own window
  p_BHTS = a_H[:, None, None] * jnp.where(in_window_TS, jnp.exp(s_BHTS - m_BHT1), 0.0)
  lin_BHTS = b_H[:, None, None] * jnp.where(in_linear_TS, jnp.einsum("bthx,bshx->bhts", fq, fk), 0.0)
  weights_BHTS = p_BHTS + lin_BHTS
  num_BTHD = jnp.einsum("bhts,bshd->bthd", weights_BHTS, v)
  den_BTH = weights_BHTS.sum(axis=-1).transpose(0, 2, 1)
  return (num_BTHD / den_BTH[..., None]).astype(v_BTKD.dtype)


def evicted_slot(state: LolcatsState) -> jax.Array:
  """[B] the ring slot the next token overwrites: it holds the key leaving the window (if lengths >= window)."""
  return state.lengths_B % state.k_ring_BSKD.shape[1]


def evicted_key(state: LolcatsState) -> jax.Array:
  """k [B, K, D] that the next decode step moves from the ring into the linear state (junk while lengths < window:
  the step adds nothing then). The caller maps it through phi_k and passes the features to the step."""
  return state.k_ring_BSKD[jnp.arange(state.lengths_B.shape[0]), evicted_slot(state)]


@jax.jit
@exact_matmuls
def lolcats_step(q_BHD, k_BKD, v_BKD, fq_BHX, fk_evicted_BHX, state: LolcatsState, *, window_factor=None,
                 linear_factor=None):
  """One decode token at position lengths[b]: the key leaving the window (features fk_evicted, of the key in the
  slot about to be overwritten) joins the linear state, the new key and value take its slot, then the query reads
  softmax over the ring and f·state. Returns (y [B, H, D], new state)."""
  dtype = _compute_dtype(q_BHD, k_BKD, v_BKD, fq_BHX, fk_evicted_BHX)
  heads, d = q_BHD.shape[1:]
  slots = state.k_ring_BSKD.shape[1]
  rows = jnp.arange(q_BHD.shape[0])
  slot_B = evicted_slot(state)
  # The value leaving the window, read before the new token overwrites its slot.
  leaves_B = (state.lengths_B >= slots).astype(dtype)
  v_old_BHD = _repeat_kv(state.v_ring_BSKD[rows, slot_B].astype(dtype), heads)
  g_BHX = fk_evicted_BHX.astype(dtype) * leaves_B[:, None, None]
  kv_BHXD = state.kv_BHXD.astype(dtype) + g_BHX[..., None] * v_old_BHD[:, :, None, :]
  k_sum_BHX = state.k_sum_BHX.astype(dtype) + g_BHX
  k_ring = state.k_ring_BSKD.at[rows, slot_B].set(k_BKD.astype(state.k_ring_BSKD.dtype))
  v_ring = state.v_ring_BSKD.at[rows, slot_B].set(v_BKD.astype(state.v_ring_BSKD.dtype))
  lengths_B = state.lengths_B + 1

  q, fq = q_BHD.astype(dtype), fq_BHX.astype(dtype)
  k_BSHD, v_BSHD = (_repeat_kv(x.astype(dtype), heads) for x in (k_ring, v_ring))
  a_H, b_H = term_factors(window_factor, linear_factor, heads, dtype)
  filled_BS = jnp.arange(slots)[None, :] < jnp.minimum(lengths_B, slots)[:, None]
  s_BHS = jnp.einsum("bhd,bshd->bhs", q, k_BSHD) / math.sqrt(d)
  s_BHS = jnp.where(filled_BS[:, None, :], s_BHS, -jnp.inf)
  m_BH1 = jnp.max(s_BHS, axis=-1, keepdims=True)
  p_BHS = a_H[:, None] * jnp.where(filled_BS[:, None, :], jnp.exp(s_BHS - m_BH1), 0.0)
  num_BHD = jnp.einsum("bhs,bshd->bhd", p_BHS, v_BSHD) + b_H[:, None] * jnp.einsum("bhx,bhxd->bhd", fq, kv_BHXD)
  den_BH = p_BHS.sum(axis=-1) + b_H * jnp.einsum("bhx,bhx->bh", fq, k_sum_BHX)
  y_BHD = (num_BHD / den_BH[..., None]).astype(v_BKD.dtype)
  sums_dtype = state.kv_BHXD.dtype
  new_state = LolcatsState(kv_BHXD.astype(sums_dtype), k_sum_BHX.astype(sums_dtype), k_ring, v_ring, lengths_B)
  return y_BHD, new_state


def shifted_features(fk_BTHX: jax.Array, window: int) -> jax.Array:
  """fk_evicted for every step of a sequence from the start: step t evicts position t - window (zeros before)."""
  length = fk_BTHX.shape[1]
  shift = min(window, length)
  return jnp.pad(fk_BTHX, ((0, 0), (shift, 0), (0, 0), (0, 0)))[:, :length]


@functools.partial(jax.jit, static_argnames=("window", "return_final_state"))
@exact_matmuls
def lolcats_recurrent(q_BTHD, k_BTKD, v_BTKD, fq_BTHX, fk_BTHX, *, window: int = 64, window_factor=None,
                      linear_factor=None, return_final_state: bool = False):
  """The same y as lolcats_quadratic, token by token: lax.scan of lolcats_step from the empty state."""
  batch, _, heads, d = q_BTHD.shape
  state = LolcatsState.zeros(batch, heads, k_BTKD.shape[2], d, fq_BTHX.shape[-1], window,
                             _compute_dtype(q_BTHD, k_BTKD, v_BTKD, fq_BTHX, fk_BTHX))
  state = state._replace(kv_BHXD=state.kv_BHXD.astype(state.k_ring_BSKD.dtype),
                         k_sum_BHX=state.k_sum_BHX.astype(state.k_ring_BSKD.dtype))

  def token_step(state, xs):
    y_BHD, state = lolcats_step(*xs, state, window_factor=window_factor, linear_factor=linear_factor)
    return state, y_BHD

  time_major = lambda x: jnp.moveaxis(x, 1, 0)
  xs = tuple(time_major(x) for x in (q_BTHD, k_BTKD, v_BTKD, fq_BTHX, shifted_features(fk_BTHX, window)))
  final, y_TBHD = jax.lax.scan(token_step, state, xs)
  y_BTHD = time_major(y_TBHD).astype(v_BTKD.dtype)
  return (y_BTHD, final) if return_final_state else y_BTHD


@functools.partial(jax.jit, static_argnames=("window", "ring_dtype"))
@exact_matmuls
def lolcats_prefill_state(k_BTKD, v_BTKD, fk_BTHX, lengths_B, *, window: int = 64,
                          ring_dtype=None) -> LolcatsState:
  """The decode state after the first lengths[b] tokens of each (right-padded) row: the linear sums over positions
  p < lengths - window, and the ring slot s holding the latest position p < lengths with p ≡ s (mod window)."""
  batch, length = k_BTKD.shape[:2]
  dtype = _compute_dtype(k_BTKD, v_BTKD, fk_BTHX)
  lengths_B = lengths_B.astype(jnp.int32)
  heads = fk_BTHX.shape[2]
  evicted_BT = (jnp.arange(length)[None, :] < (lengths_B - window)[:, None]).astype(dtype)
  g_BTHX = fk_BTHX.astype(dtype) * evicted_BT[:, :, None, None]
  v_BTHD = _repeat_kv(v_BTKD.astype(dtype), heads)
  kv_BHXD = jnp.einsum("bthx,bthd->bhxd", g_BTHX, v_BTHD)
  k_sum_BHX = g_BTHX.sum(axis=1)
  slot_S = jnp.arange(window, dtype=jnp.int32)
  last_BS = lengths_B[:, None] - 1 - slot_S  # how far the newest token lies past slot s
  pos_BS = jnp.where(last_BS >= 0, slot_S + window * (jnp.maximum(last_BS, 0) // window), 0)
  pos_BS = jnp.minimum(pos_BS, length - 1)
  take = jax.vmap(lambda a, i: a[i])
  ring_dtype = ring_dtype or k_BTKD.dtype
  return LolcatsState(kv_BHXD.astype(jnp.float32), k_sum_BHX.astype(jnp.float32),
                      take(k_BTKD, pos_BS).astype(ring_dtype), take(v_BTKD, pos_BS).astype(ring_dtype), lengths_B)
