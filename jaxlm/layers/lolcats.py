"""LoLCATs hybrid attention (Zhang et al. 2024, "LoLCATs: On Low-Rank Linearizing of Large Language Models") as a
sequence mixer: softmax attention over the last `window` tokens plus linear attention over every earlier one,
under one normaliser (pallas_kernels/lolcats/reference.py has the formula).

  q, k, v = x W_q, x W_k, x W_v, RoPE on q and k        (projections shaped and named as jaxlm/layers/attention.py's,
                                                          so a softmax Attention's weights load as they are)
  f = phi(q; W̃_q),  g = phi(repeat(k); W̃_k)             (per query head, after RoPE; hedgehog or projected Taylor)
  a = sigmoid(window_factor_H),  b = 1 - a (affine_factors) or 1
  y = lolcats_attention(q, k, v, f, g, window, a, b),   out = y W_o

The feature maps W̃_q, W̃_k [H, D, F] and the per-head factor are the only parameters Attention lacks (what
attention transfer trains). W̃ starts as the identity on the first min(D, F) dims (Hedgehog's initialisation).
The decode cache is a LolcatsState: the linear state Σ g vᵀ, Σ g over keys that left the window (float32, size
independent of the sequence) and a ring of the last `window` RoPE'd keys and values; each step maps the key leaving
the ring through phi_k into the state.

Letters: B batch, T length, E model width, H query heads, K kv heads, D head dim, F feature-map width, X feature
width (2F hedgehog, 1 + F + F² taylor).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.layers.attention import HeadLayout
from jaxlm.layers.linear import build_linear
from jaxlm.layers.rotary import apply_rotary, default_positions
from pallas_kernels.common import validation
from pallas_kernels.lolcats import (LolcatsState, evicted_key, lolcats_attention, lolcats_decode_step,
                                    lolcats_prefill_state)
from pallas_kernels.lolcats.features import FEATURE_MAPS, feature_width, features

# The Taylor map's X = 1 + F + F² grows fast and the state holds X·D floats per head.
MAX_TAYLOR_FEATURE_DIM = 16


@dataclasses.dataclass(frozen=True)
class LolcatsConfig(HeadLayout):
  d_model: int  # E
  num_heads: int = 8  # query heads
  num_kv_heads: int | None = None  # None = num_heads (MHA), else GQA/MQA, as AttentionConfig
  head_dim: int | None = None  # None: d_model // num_heads
  rotary_dim: int | None = None  # rotated dims per head: None = head_dim, 0 = no RoPE
  rope_base: float = 10000.0  # θ of RoPE
  use_bias: bool = False  # biases on the q/k/v/out maps, as AttentionConfig
  window: int = 64  # keys in each query's softmax window, itself included (LoLCATs: 64)
  feature_map: str = "hedgehog"  # "hedgehog": [softmax(xW̃), softmax(-xW̃)]; "taylor": BASED's map of xW̃
  feature_dim: int | None = None  # F, the width of xW̃: None = head_dim (hedgehog) or 16 (taylor)
  affine_factors: bool = False  # linear term weighted 1 - a instead of 1 (LoLCATs' affine_attention_factors)
  init_window_factor: float = 0.0  # the factor's logit at init: a = sigmoid(0) = 1/2
  implementation: str = "auto"  # the lolcats op
  decode_implementation: str = "auto"  # the lolcats decode step

  def __post_init__(self):
    self.check_heads()
    if not isinstance(self.window, int) or self.window < 1:
      raise ValueError(f"window={self.window!r} must be an integer >= 1 (keys seen, itself included)")
    validation.check_in("feature_map", self.feature_map, FEATURE_MAPS)
    if self.feature_dim is not None and (not isinstance(self.feature_dim, int) or self.feature_dim < 1):
      raise ValueError(f"feature_dim={self.feature_dim!r} must be a positive integer")
    if self.feature_map == "taylor" and self.resolved_feature_dim() > MAX_TAYLOR_FEATURE_DIM:
      raise ValueError(f"feature_dim={self.resolved_feature_dim()} exceeds {MAX_TAYLOR_FEATURE_DIM} for the taylor "
                       f"map (X = 1 + F + F² features per head)")

  def resolved_feature_dim(self) -> int:
    if self.feature_dim is not None:
      return self.feature_dim
    return self.resolved_head_dim() if self.feature_map == "hedgehog" else MAX_TAYLOR_FEATURE_DIM

  def feature_width(self) -> int:
    """X, the width of phi."""
    return feature_width(self.feature_map, self.resolved_feature_dim())


def _identity_init(key, shape, dtype=jnp.float32):
  """[H, D, F]: the identity on the first min(D, F) dims of every head."""
  del key
  heads, d, f = shape
  return jnp.broadcast_to(jnp.eye(d, f, dtype=dtype), shape)


class Lolcats(nnx.Module):
  """LoLCATs sliding-window + linear attention implementing the Mixer interface (jaxlm/layers/mixer.py)."""

  def __init__(self, config: LolcatsConfig, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
               rngs: nnx.Rngs):
    self.config = config
    self.num_heads, self.num_kv_heads = config.num_heads, config.kv_heads()
    self.head_dim = config.resolved_head_dim()
    self.dtype = dtype
    kw = dict(use_bias=config.use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    e, q_width, kv_width = config.d_model, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
    self.q_proj = build_linear(e, q_width, axes=("embed", "heads"), **kw)
    self.k_proj = build_linear(e, kv_width, axes=("embed", "kv_heads"), **kw)
    self.v_proj = build_linear(e, kv_width, axes=("embed", "kv_heads"), **kw)
    self.out_proj = build_linear(q_width, e, axes=("heads", "embed"), **kw)
    shape = (self.num_heads, self.head_dim, config.resolved_feature_dim())
    feature_init = nnx.with_partitioning(_identity_init, ("heads", None, None))
    self.feature_q_HDF = nnx.Param(feature_init(rngs.params(), shape, param_dtype))
    self.feature_k_HDF = nnx.Param(feature_init(rngs.params(), shape, param_dtype))
    factor_init = nnx.with_partitioning(nnx.initializers.constant(config.init_window_factor), ("heads",))
    self.window_factor_H = nnx.Param(factor_init(rngs.params(), (self.num_heads,), param_dtype))

  def _qkv(self, x: jax.Array, positions: jax.Array):
    """q [..., H, D], k and v [..., K, D] for x [..., E] at integer positions [...], RoPE applied."""
    x = x.astype(self.dtype)
    lead = x.shape[:-1]
    q = self.q_proj(x).reshape(*lead, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(*lead, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(*lead, self.num_kv_heads, self.head_dim)
    rope = dict(rotary_dim=self.config.resolved_rotary_dim(), base=self.config.rope_base)
    return apply_rotary(q, positions, **rope), apply_rotary(k, positions, **rope), v

  def query_features(self, q: jax.Array) -> jax.Array:
    """phi_q(q) [..., H, X] of RoPE'd queries [..., H, D]."""
    return features(self.config.feature_map, q, self.feature_q_HDF[...])

  def key_features(self, k: jax.Array) -> jax.Array:
    """phi_k(k) [..., H, X] of RoPE'd keys [..., K, D], per query head (LoLCATs maps k after repeating it)."""
    k = jnp.repeat(k, self.num_heads // self.num_kv_heads, axis=-2)
    return features(self.config.feature_map, k, self.feature_k_HDF[...])

  def factors(self) -> dict[str, jax.Array]:
    """window_factor a = sigmoid(logit) and linear_factor (1 - a, or None for 1), float32 [H]."""
    a = jax.nn.sigmoid(self.window_factor_H[...].astype(jnp.float32))
    return dict(window_factor=a, linear_factor=1.0 - a if self.config.affine_factors else None)

  def _out(self, y: jax.Array) -> jax.Array:
    return self.out_proj(y.reshape(*y.shape[:-2], self.num_heads * self.head_dim).astype(self.dtype))

  def _attend(self, q, k, v):
    return lolcats_attention(q, k, v, self.query_features(q), self.key_features(k), window=self.config.window,
                             implementation=self.config.implementation, **self.factors())

  def __call__(self, x_BTE: jax.Array, *, segment_ids: jax.Array | None = None) -> jax.Array:
    if segment_ids is not None:
      raise NotImplementedError("lolcats: segment_ids (packed documents) are not supported; the window and the "
                                "linear state would reach across documents")
    B, T, _ = x_BTE.shape
    q, k, v = self._qkv(x_BTE, default_positions(B, T))
    return self._out(self._attend(q, k, v))

  def init_cache(self, batch: int, max_length: int, dtype: Any = None) -> LolcatsState:
    """The empty state: float32 sums and a `window`-slot ring in `dtype`; its size does not depend on max_length."""
    del max_length
    return LolcatsState.zeros(batch, self.num_heads, self.num_kv_heads, self.head_dim, self.config.feature_width(),
                              self.config.window, dtype or self.dtype)

  def prefill(self, x_BTE: jax.Array, cache: LolcatsState, lengths_B: jax.Array) -> tuple[jax.Array, LolcatsState]:
    """The parallel form over right-padded prompts (outputs at padded positions are meaningless: padding comes
    after every real token, so causality keeps it out of theirs), and the state after lengths[b] tokens of row b."""
    B, T, _ = x_BTE.shape
    validation.check_lengths("lengths_B", lengths_B, B, T)
    q, k, v = self._qkv(x_BTE, default_positions(B, T))
    state = lolcats_prefill_state(k, v, self.key_features(k), lengths_B, window=self.config.window,
                                  ring_dtype=cache.k_ring_BSKD.dtype)
    return self._out(self._attend(q, k, v)), state

  def decode(self, x_BE: jax.Array, cache: LolcatsState) -> tuple[jax.Array, LolcatsState]:
    """One token per row at position lengths[b]: the key leaving the window joins the linear state, this one takes
    its ring slot, and the query reads both."""
    q, k, v = self._qkv(x_BE, cache.lengths_B)
    fk_evicted = self.key_features(evicted_key(cache).astype(k.dtype))
    y, cache = lolcats_decode_step(q, k, v, self.query_features(q), fk_evicted, cache,
                                   implementation=self.config.decode_implementation, **self.factors())
    return self._out(y), cache
