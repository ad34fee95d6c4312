"""Based (Taylor linear attention) oracles in jax.numpy: quadratic, chunked and recurrent forms.

Based (Arora et al. 2024, "Simple linear attention language models balance the recall-throughput tradeoff")
replaces exp(s) in softmax attention by its second-order Taylor expansion 1 + s + s²/2, s = q·k / √F, which
factors through the feature map

  phi(x) = [1, x / F^¼, vec(x ⊗ x) / (√2·√F)] ∈ R^X,  X = 1 + F + F²,  so  phi(q)·phi(k) = 1 + s + s²/2.

Causal output, normalised (default) or not (numerator only):

  y_t = phi(q_t)·S_t / (phi(q_t)·z_t + eps),  S_t = S_0 + Σ_{s≤t} phi(k_s) v_sᵀ,  z_t = z_0 + Σ_{s≤t} phi(k_s)

With segment_ids (packed documents) a token sees only earlier tokens of its own segment, and the initial state
(S_0, z_0) reaches only the row's first segment; the final state is that of the row's last segment. Since
1 + s + s²/2 = ((1 + s)² + 1) / 2 ≥ 1/2, the normaliser is positive whenever a token sees any key.

The state (S, z) is kept in the symmetric layout of symmetric.py: the order-2 block holds each product x_i·x_j,
i ≤ j, once (off-diagonal ones scaled by √2), 1 + F + F(F+1)/2 features with the same inner products as phi; every
form here computes on it directly.

Every form computes in float32 (float64 when given float64, for gradient checks) and returns y in v's dtype.

Letters: B batch, T query length, S key length, H heads, F feature dim, D value head dim,
X = 1 + F + F² expanded features, U = F(F+1)/2 symmetric order-2 features, C chunk length, J number of chunks.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from pallas_kernels.based.symmetric import BasedState, order2_features, taylor_scales
from pallas_kernels.common.precision import exact_matmuls


def _compute_dtype(*arrays: jax.Array):
  # float32 for float32/bf16/f16 inputs; float64 stays float64 so gradient checks run in double precision.
  return jnp.result_type(jnp.float32, *(x.dtype for x in arrays))


class TaylorScaled:
  """Gives a (dataclass) spec with a `feature_dim` field the scales c1, c2 of phi."""

  @property
  def c1(self) -> float:
    return taylor_scales(self.feature_dim)[0]

  @property
  def c2(self) -> float:
    return taylor_scales(self.feature_dim)[1]


def _scaled_pieces(x_F: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The order-1 and order-2 blocks of phi_sym(x): x / F^¼ and the U symmetric products (symmetric.py)."""
  return x_F / x_F.shape[-1] ** 0.25, order2_features(x_F)


def taylor_features(x_F: jax.Array) -> jax.Array:
  """The full map phi(x) = [1, x / F^¼, vec(x ⊗ x) / (√2·√F)] along the last axis, shape (..., 1 + F + F²)
  (the state uses symmetric.symmetric_taylor_features, with the same inner products)."""
  f = x_F.shape[-1]
  x = x_F.astype(_compute_dtype(x_F))
  c1, c2 = taylor_scales(f)
  x2_FF = c2 * x[..., :, None] * x[..., None, :]
  ones = jnp.ones((*x.shape[:-1], 1), x.dtype)
  return jnp.concatenate([ones, c1 * x, x2_FF.reshape(*x.shape[:-1], f * f)], axis=-1).astype(x_F.dtype)


def _taylor_scores(q_BTHF: jax.Array, k_BSHF: jax.Array) -> jax.Array:
  """phi(q_t)·phi(k_s) = 1 + s + s²/2 straight from s = q·k/√F, without the X-wide expansion: [B, H, T, S]."""
  s_BHTS = jnp.einsum("bthf,bshf->bhts", q_BTHF, k_BSHF) / math.sqrt(q_BTHF.shape[-1])
  return 1.0 + s_BHTS + 0.5 * s_BHTS * s_BHTS


def _state_readout(q_BTHF: jax.Array, state: BasedState) -> tuple[jax.Array, jax.Array]:
  """phi(q_t)·S and phi(q_t)·z for a state shared by all T queries: ([B, T, H, D], [B, T, H])."""
  q1_BTHF, q2_BTHU = _scaled_pieces(q_BTHF)
  num_BTHD = (state.s0_BHD[:, None]
              + jnp.einsum("bthf,bhfd->bthd", q1_BTHF, state.s1_BHFD)
              + jnp.einsum("bthu,bhud->bthd", q2_BTHU, state.s2_BHUD))
  den_BTH = (state.z0_BH[:, None]
             + jnp.einsum("bthf,bhf->bth", q1_BTHF, state.z1_BHF)
             + jnp.einsum("bthu,bhu->bth", q2_BTHU, state.z2_BHU))
  return num_BTHD, den_BTH


def _state_sums(k_BTHF: jax.Array, v_BTHD: jax.Array, weight_BT: jax.Array) -> BasedState:
  """Σ_t weight_t phi(k_t) v_tᵀ and Σ_t weight_t phi(k_t), split by order (weight 0/1 selects tokens)."""
  k1_BTHF, k2_BTHU = _scaled_pieces(k_BTHF)
  wv_BTHD = v_BTHD * weight_BT[:, :, None, None]
  heads = k_BTHF.shape[2]
  return BasedState(
      s0_BHD=wv_BTHD.sum(axis=1),
      s1_BHFD=jnp.einsum("bthf,bthd->bhfd", k1_BTHF, wv_BTHD),
      s2_BHUD=jnp.einsum("bthu,bthd->bhud", k2_BTHU, wv_BTHD),
      z0_BH=jnp.broadcast_to(weight_BT.sum(axis=1)[:, None], (k_BTHF.shape[0], heads)),
      z1_BHF=jnp.einsum("bthf,bt->bhf", k1_BTHF, weight_BT),
      z2_BHU=jnp.einsum("bthu,bt->bhu", k2_BTHU, weight_BT))


def _where_rows(keep_B: jax.Array, state: BasedState) -> BasedState:
  """The state where keep_B, zeros elsewhere (per batch row)."""
  return jax.tree.map(lambda x: jnp.where(keep_B.reshape(-1, *(1,) * (x.ndim - 1)), x, 0), state)


def _add(a: BasedState, b: BasedState) -> BasedState:
  return jax.tree.map(jnp.add, a, b)


def _normalized(num_BTHD: jax.Array, den_BTH: jax.Array, normalize: bool, eps: float) -> jax.Array:
  return num_BTHD / (den_BTH[..., None] + eps) if normalize else num_BTHD


# Jitted so that eager calls (tests, the api outside a model's jit) compile once per shape, not once per op.
_jit_form = functools.partial(jax.jit, static_argnames=("normalize", "eps", "return_final_state"))


def _prepare(q_BTHF, k_BTHF, v_BTHD, initial_state, segment_ids):
  """Inputs upcast to the compute dtype, the starting state, and segment ids (one segment when None)."""
  dtype = _compute_dtype(q_BTHF, k_BTHF, v_BTHD)
  batch, length, heads, feature_dim = q_BTHF.shape
  if initial_state is None:
    initial_state = BasedState.zeros(batch, heads, feature_dim, v_BTHD.shape[-1], dtype)
  state = jax.tree.map(lambda x: jnp.asarray(x, dtype), initial_state)
  seg_BT = (jnp.zeros((batch, length), jnp.int32) if segment_ids is None else jnp.asarray(segment_ids))
  return q_BTHF.astype(dtype), k_BTHF.astype(dtype), v_BTHD.astype(dtype), BasedState(*state), seg_BT


@_jit_form
@exact_matmuls
def based_quadratic(q_BTHF, k_BTHF, v_BTHD, *, normalize: bool = True, eps: float = 1e-6,
                    initial_state: BasedState | None = None, segment_ids: jax.Array | None = None,
                    return_final_state: bool = False):
  """y_t = Σ_{s≤t, same segment} (1 + s_ts + s_ts²/2) v_s (+ phi(q_t)·S_0), normalised by the same sums of weights.

  O(T²) masked scores; the initial state adds phi(q_t)·S_0 and phi(q_t)·z_0 to tokens of the first segment.
  """
  q, k, v, state, seg_BT = _prepare(q_BTHF, k_BTHF, v_BTHD, initial_state, segment_ids)
  length = q.shape[1]
  causal_TS = jnp.tril(jnp.ones((length, length), bool))
  mask_BTS = causal_TS & (seg_BT[:, :, None] == seg_BT[:, None, :])
  a_BHTS = jnp.where(mask_BTS[:, None], _taylor_scores(q, k), 0.0)
  num_BTHD = jnp.einsum("bhts,bshd->bthd", a_BHTS, v)
  den_BTH = a_BHTS.sum(axis=-1).transpose(0, 2, 1)
  first_BT = seg_BT == seg_BT[:, :1]
  state_num_BTHD, state_den_BTH = _state_readout(q, state)
  num_BTHD = num_BTHD + jnp.where(first_BT[:, :, None, None], state_num_BTHD, 0.0)
  den_BTH = den_BTH + jnp.where(first_BT[:, :, None], state_den_BTH, 0.0)
  y_BTHD = _normalized(num_BTHD, den_BTH, normalize, eps).astype(v_BTHD.dtype)
  if not return_final_state:
    return y_BTHD
  last_BT = seg_BT == seg_BT[:, -1:]
  final = _add(_where_rows(first_BT[:, -1], state), _state_sums(k, v, last_BT.astype(q.dtype)))
  return y_BTHD, final


@functools.partial(jax.jit, static_argnames=("chunk", "normalize", "eps", "return_final_state"))
@exact_matmuls
def based_chunked(q_BTHF, k_BTHF, v_BTHD, *, chunk: int = 64, normalize: bool = True, eps: float = 1e-6,
                  initial_state: BasedState | None = None, segment_ids: jax.Array | None = None,
                  return_final_state: bool = False):
  """The same y as based_quadratic: 1 + s + s²/2 scores within each chunk of C tokens, and across chunks the
  order-0/1/2 prefix state carried by lax.scan (O(T·C + T·F²·D) work)."""
  q, k, v, state, seg_BT = _prepare(q_BTHF, k_BTHF, v_BTHD, initial_state, segment_ids)
  batch, length, heads, _ = q.shape
  num_chunks = -(-length // chunk)
  pad = num_chunks * chunk - length
  # Padded keys get weight 0; padded ids repeat the last one so the last chunk ends in the row's last segment.
  valid_BT = jnp.pad(jnp.ones((batch, length), q.dtype), ((0, 0), (0, pad)))
  seg_BT = jnp.pad(seg_BT, ((0, 0), (0, pad)), mode="edge")

  q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))

  def chunks(x):  # [B, J·C, ...] -> [J, B, C, ...]
    return jnp.moveaxis(x.reshape(batch, num_chunks, chunk, *x.shape[2:]), 1, 0)

  causal_CC = jnp.tril(jnp.ones((chunk, chunk), bool))

  def chunk_step(carry, xs):
    # carry: the state of segment prev_seg_B (the segment of the previous chunk's last token).
    state, prev_seg_B = carry
    q_BCHF, k_BCHF, v_BCHD, seg_BC, valid_BC = xs
    mask_BCC = causal_CC & (seg_BC[:, :, None] == seg_BC[:, None, :]) & (valid_BC[:, None, :] > 0)
    a_BHCC = jnp.where(mask_BCC[:, None], _taylor_scores(q_BCHF, k_BCHF), 0.0)
    num_BCHD = jnp.einsum("bhts,bshd->bthd", a_BHCC, v_BCHD)
    den_BCH = a_BHCC.sum(axis=-1).transpose(0, 2, 1)
    sees_state_BC = seg_BC == prev_seg_B[:, None]
    state_num_BCHD, state_den_BCH = _state_readout(q_BCHF, state)
    num_BCHD = num_BCHD + jnp.where(sees_state_BC[:, :, None, None], state_num_BCHD, 0.0)
    den_BCH = den_BCH + jnp.where(sees_state_BC[:, :, None], state_den_BCH, 0.0)
    last_B = seg_BC[:, -1]
    in_last_BC = ((seg_BC == last_B[:, None]) & (valid_BC > 0)).astype(q_BCHF.dtype)
    new_state = _add(_where_rows(prev_seg_B == last_B, state), _state_sums(k_BCHF, v_BCHD, in_last_BC))
    return (new_state, last_B), _normalized(num_BCHD, den_BCH, normalize, eps)

  xs = (chunks(q), chunks(k), chunks(v), chunks(seg_BT), chunks(valid_BT))
  (final, _), y_JBCHD = jax.lax.scan(chunk_step, (state, seg_BT[:, 0]), xs)
  y_BTHD = jnp.moveaxis(y_JBCHD, 0, 1).reshape(batch, num_chunks * chunk, heads, -1)[:, :length]
  y_BTHD = y_BTHD.astype(v_BTHD.dtype)
  return (y_BTHD, final) if return_final_state else y_BTHD


@functools.partial(jax.jit, static_argnames=("normalize", "eps"))
@exact_matmuls
def based_step(q_BHF, k_BHF, v_BHD, state: BasedState, *, normalize: bool = True, eps: float = 1e-6):
  """One decode token: S += phi(k) vᵀ, z += phi(k), then y = phi(q)·S / (phi(q)·z + eps). Returns (y, new state)."""
  dtype = _compute_dtype(q_BHF, k_BHF, v_BHD)
  q, k, v = (x.astype(dtype) for x in (q_BHF, k_BHF, v_BHD))
  state = BasedState(*(jnp.asarray(x, dtype) for x in state))
  k1_BHF, k2_BHU = _scaled_pieces(k)
  new_state = BasedState(
      s0_BHD=state.s0_BHD + v,
      s1_BHFD=state.s1_BHFD + k1_BHF[..., None] * v[:, :, None, :],
      s2_BHUD=state.s2_BHUD + k2_BHU[..., None] * v[:, :, None, :],
      z0_BH=state.z0_BH + 1.0,
      z1_BHF=state.z1_BHF + k1_BHF,
      z2_BHU=state.z2_BHU + k2_BHU)
  num_B1HD, den_B1H = _state_readout(q[:, None], new_state)
  y_BHD = _normalized(num_B1HD, den_B1H, normalize, eps)[:, 0]
  return y_BHD.astype(v_BHD.dtype), new_state


@_jit_form
@exact_matmuls
def based_recurrent(q_BTHF, k_BTHF, v_BTHD, *, normalize: bool = True, eps: float = 1e-6,
                    initial_state: BasedState | None = None, segment_ids: jax.Array | None = None,
                    return_final_state: bool = False):
  """The same y as based_quadratic, token by token: lax.scan of based_step, the state zeroed where a segment starts."""
  q, k, v, state, seg_BT = _prepare(q_BTHF, k_BTHF, v_BTHD, initial_state, segment_ids)
  starts_BT = jnp.concatenate([jnp.zeros_like(seg_BT[:, :1], bool), seg_BT[:, 1:] != seg_BT[:, :-1]], axis=1)

  def token_step(state, xs):
    q_BHF, k_BHF, v_BHD, starts_B = xs
    state = _where_rows(~starts_B, state)
    y_BHD, state = based_step(q_BHF, k_BHF, v_BHD, state, normalize=normalize, eps=eps)
    return state, y_BHD

  xs = (jnp.moveaxis(q, 1, 0), jnp.moveaxis(k, 1, 0), jnp.moveaxis(v, 1, 0), starts_BT.T)
  final, y_TBHD = jax.lax.scan(token_step, state, xs)
  y_BTHD = jnp.moveaxis(y_TBHD, 0, 1).astype(v_BTHD.dtype)
  return (y_BTHD, final) if return_final_state else y_BTHD
