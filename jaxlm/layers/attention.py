"""Multi-head softmax attention with GQA/MQA, RoPE, causal or sliding-window masking, and its decode cache.

  q, k, v = x W_q, x W_k, x W_v   (x [E]; q [H, D], k and v [K, D]; query head h reads kv head h // (H/K))
  o_t = Σ_{s ≤ t, t - s < window} softmax_s(rope(q_t)·rope(k_s)/√D) v_s,   y = o W_o

Decode cache: a ring buffer of S slots per row. Position p lives in slot p mod S, so the slots hold the last
min(n, S) keys of a row with n tokens, in rotated order; softmax attention does not depend on key order, and the
keys carry their rotary phase from when they were written, so `attention_decode` over slots [0, min(n, S)) equals
the parallel form. S = max_length for full attention (no wrap before max_length) and S = min(window, max_length)
for sliding-window layers, whose memory is then independent of the sequence length. Where the decode kernel tiles
only powers of two (Triton), the cache stores D padded to one with zero columns (`cache_head_dim`), which it then
reads in place.

Letters: B batch, T query length, S key length (cache slots), E model width, H query heads, K kv heads,
D head dim.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.layers import cached_attention
from jaxlm.layers.linear import LINEARS, build_linear
from jaxlm.layers.rotary import RopeScaling, apply_rotary, check_rotary_dim, default_positions
from pallas_kernels.attention import api as attention_api
from pallas_kernels.common import validation


class HeadLayout:
  """The head fields' resolution and checks, for every attention-shaped mixer config (fields d_model, num_heads,
  num_kv_heads, head_dim, rotary_dim: AttentionConfig, and LolcatsConfig, whose projections load Attention's)."""

  def check_heads(self) -> None:
    """ValueError naming the field when the heads cannot be laid out."""
    validation.check_positive("d_model", self.d_model)
    if not isinstance(self.num_heads, int) or self.num_heads < 1:
      raise ValueError(f"num_heads={self.num_heads!r} must be a positive integer")
    if self.head_dim is None and self.d_model % self.num_heads:
      raise ValueError(f"num_heads={self.num_heads} must divide d_model={self.d_model} (or set head_dim)")
    if self.head_dim is not None and self.head_dim < 1:
      raise ValueError(f"head_dim={self.head_dim!r} must be positive")
    if self.kv_heads() < 1 or self.num_heads % self.kv_heads():
      raise ValueError(f"num_kv_heads={self.num_kv_heads!r} must be positive and divide num_heads={self.num_heads}")
    try:
      check_rotary_dim(self.resolved_rotary_dim(), self.resolved_head_dim())
    except ValueError as e:
      raise ValueError(f"rotary_dim: {e}") from None

  def kv_heads(self) -> int:
    return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

  def resolved_head_dim(self) -> int:
    return self.d_model // self.num_heads if self.head_dim is None else self.head_dim

  def resolved_rotary_dim(self) -> int:
    return self.resolved_head_dim() if self.rotary_dim is None else self.rotary_dim


@dataclasses.dataclass(frozen=True)
class AttentionConfig(HeadLayout):
  d_model: int  # E: the model width (the input and output of the layer)
  num_heads: int = 8  # query heads
  num_kv_heads: int | None = None  # key/value heads: None = num_heads (MHA), 1 = MQA, else GQA
  head_dim: int | None = None  # None: d_model // num_heads
  rotary_dim: int | None = None  # rotated dims per head: None = head_dim, 0 = no RoPE, else partial
  rope_base: float = 10000.0  # θ of RoPE
  rope_scaling: Any = None  # long-context RoPE: None, or {type: llama3 | linear, factor, ...} (rotary.RopeScaling)
  window: int | None = None  # keys each query sees, itself included; None = all earlier keys
  use_bias: bool = False  # biases on the q/k/v/out maps (GPT-2, H3)
  qkv_bias: bool | None = None  # biases on the q/k/v maps only: None = use_bias; True with use_bias off: Qwen2
  projection: str = "dense"  # q/k/v/out maps: "dense" or "monarch"
  nblocks: int = 4  # Monarch blocks when projection = "monarch"
  softcap: float | None = None  # logits -> softcap·tanh(logits/softcap)
  implementation: str = "auto"  # the attention op
  decode_implementation: str = "auto"  # the attention_decode op
  monarch_implementation: str = "auto"  # the monarch op (projection = "monarch")

  def __post_init__(self):
    """Raises ValueError naming the field when this config cannot build a layer."""
    self.check_heads()
    try:
      object.__setattr__(self, "rope_scaling", RopeScaling.from_value(self.rope_scaling))  # frozen: hashable
    except (TypeError, ValueError) as e:
      raise ValueError(f"rope_scaling: {e}") from None
    if self.window is not None and (not isinstance(self.window, int) or self.window < 1):
      raise ValueError(f"window={self.window!r} must be an integer >= 1 (keys seen, itself included)")
    if self.projection not in LINEARS:
      raise ValueError(f"projection={self.projection!r} not in {LINEARS}")
    if self.projection == "monarch":
      widths = (self.d_model, self.num_heads * self.resolved_head_dim(), self.kv_heads() * self.resolved_head_dim())
      if self.nblocks < 1 or any(w % self.nblocks for w in widths):
        raise ValueError(f"nblocks={self.nblocks} must divide the projection widths {widths}")
    if self.softcap is not None and self.softcap <= 0:
      raise ValueError(f"softcap={self.softcap!r} must be positive")



@dataclasses.dataclass(frozen=True)
class SlidingWindowConfig(AttentionConfig):
  """Attention over the last `window` keys (BASED: 64 in the paper, 128 in the released checkpoints)."""
  window: int | None = 128

  def __post_init__(self):
    if self.window is None:
      raise ValueError("window must be set (an integer >= 1) for sliding-window attention")
    super().__post_init__()


class KVCache(NamedTuple):
  k_BSKD: jax.Array  # ring buffer: position p in slot p mod S
  v_BSKD: jax.Array
  lengths_B: jax.Array  # tokens seen per row (int32)


class Attention(nnx.Module):
  """Causal (optionally sliding-window) attention implementing the Mixer interface (jaxlm/layers/mixer.py)."""

  def __init__(self, config: AttentionConfig, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
               rngs: nnx.Rngs):
    self.config = config
    self.num_heads, self.num_kv_heads = config.num_heads, config.kv_heads()
    self.head_dim = config.resolved_head_dim()
    self.rotary_dim = config.resolved_rotary_dim()
    self.dtype = dtype
    kw = dict(kind=config.projection, nblocks=config.nblocks, dtype=dtype, param_dtype=param_dtype,
              implementation=config.monarch_implementation, rngs=rngs)
    qkv_bias = config.use_bias if config.qkv_bias is None else config.qkv_bias
    e, q_width, kv_width = config.d_model, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
    self.q_proj = build_linear(e, q_width, axes=("embed", "heads"), use_bias=qkv_bias, **kw)
    self.k_proj = build_linear(e, kv_width, axes=("embed", "kv_heads"), use_bias=qkv_bias, **kw)
    self.v_proj = build_linear(e, kv_width, axes=("embed", "kv_heads"), use_bias=qkv_bias, **kw)
    self.out_proj = build_linear(q_width, e, axes=("heads", "embed"), use_bias=config.use_bias, **kw)

  def _qkv(self, x: jax.Array, positions: jax.Array):
    """q [..., H, D], k and v [..., K, D] for x [..., E] at integer positions [...], RoPE applied."""
    x = x.astype(self.dtype)
    lead = x.shape[:-1]
    q = self.q_proj(x).reshape(*lead, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(*lead, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(*lead, self.num_kv_heads, self.head_dim)
    rope = dict(rotary_dim=self.rotary_dim, base=self.config.rope_base, scaling=self.config.rope_scaling)
    return apply_rotary(q, positions, **rope), apply_rotary(k, positions, **rope), v

  def _out(self, o: jax.Array) -> jax.Array:
    return self.out_proj(o.reshape(*o.shape[:-2], self.num_heads * self.head_dim))

  def __call__(self, x_BTE: jax.Array, *, segment_ids: jax.Array | None = None) -> jax.Array:
    B, T, _ = x_BTE.shape
    q, k, v = self._qkv(x_BTE, default_positions(B, T, segment_ids))
    o = attention_api.attention(q, k, v, causal=True, window=self.config.window, segment_ids=segment_ids,
                                softcap=self.config.softcap, implementation=self.config.implementation)
    return self._out(o)

  def cache_slots(self, max_length: int) -> int:
    window = self.config.window
    return max_length if window is None else min(window, max_length)

  def cache_head_dim(self) -> int:
    """D as the cache stores it: padded with zero columns where the decode kernel tiles only powers of two, so it
    reads the cache in place instead of padding a copy every step (attention_api.decode_cache_head_dim)."""
    return attention_api.decode_cache_head_dim(self.head_dim, self.config.decode_implementation)

  def _to_cache(self, x: jax.Array, cache_x: jax.Array, dtype: Any = None) -> jax.Array:
    """x [..., D] at the cache's head dim (zero columns past D), in the cache's dtype unless given."""
    extra = cache_x.shape[-1] - x.shape[-1]
    x = x.astype(dtype or cache_x.dtype)
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)]) if extra else x

  def init_cache(self, batch: int, max_length: int, dtype: Any = None) -> KVCache:
    shape = (batch, self.cache_slots(max_length), self.num_kv_heads, self.cache_head_dim())
    dtype = dtype or self.dtype
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))

  def prefill(self, x_BTE: jax.Array, cache: KVCache, lengths_B: jax.Array) -> tuple[jax.Array, KVCache]:
    """The parallel form over a right-padded prompt; slot s gets the latest position p < lengths with p ≡ s."""
    B, T, _ = x_BTE.shape
    S = cache.k_BSKD.shape[1]
    if self.config.window is None and T > S:
      raise ValueError(f"prompt length {T} exceeds the cache's max_length {S}")
    q, k, v = self._qkv(x_BTE, default_positions(B, T))
    o = attention_api.attention(q, k, v, causal=True, window=self.config.window, softcap=self.config.softcap,
                                implementation=self.config.implementation)
    lengths_B = lengths_B.astype(jnp.int32)
    slot_S = jnp.arange(S, dtype=jnp.int32)
    last_BS = lengths_B[:, None] - 1 - slot_S  # how far the newest token lies past slot s
    pos_BS = jnp.where(last_BS >= 0, slot_S + S * (jnp.maximum(last_BS, 0) // S), 0)
    take = jax.vmap(lambda a, i: a[i])
    k_cache = self._to_cache(take(k, pos_BS), cache.k_BSKD)
    v_cache = self._to_cache(take(v, pos_BS), cache.v_BSKD)
    return self._out(o), KVCache(k_cache, v_cache, lengths_B)

  def decode(self, x_BE: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """One token per row at position lengths[b]: write its key into slot lengths mod S, attend over the ring."""
    S = cache.k_BSKD.shape[1]
    q, k, v = self._qkv(x_BE, cache.lengths_B)
    rows, slot = jnp.arange(x_BE.shape[0]), cache.lengths_B % S
    k_cache = cache.k_BSKD.at[rows, slot].set(self._to_cache(k, cache.k_BSKD))
    v_cache = cache.v_BSKD.at[rows, slot].set(self._to_cache(v, cache.v_BSKD))
    lengths = cache.lengths_B + 1
    # Every stored key lies inside the window (S <= window), so no window mask is needed on the ring. q gets the
    # cache's zero columns too; the scale stays that of the real head dim.
    o = attention_api.attention_decode(self._to_cache(q, cache.k_BSKD, q.dtype), k_cache.astype(q.dtype),
                                       v_cache.astype(q.dtype), jnp.minimum(lengths, S), scale=self.head_dim ** -0.5,
                                       softcap=self.config.softcap, implementation=self.config.decode_implementation)
    return self._out(o[..., :self.head_dim]), KVCache(k_cache, v_cache, lengths)

  def extend(self, x_BTE: jax.Array, cache: KVCache, valid_B: jax.Array) -> tuple[jax.Array, KVCache]:
    """Chunked prefill: a piece of tokens at positions lengths[b]..., the first valid[b] of them real, attending
    over the ring and the piece (jaxlm/layers/cached_attention.py); rows with valid[b] <= 0 keep their cache."""
    B, T, _ = x_BTE.shape
    seen_B = cache.lengths_B
    q, k, v = self._qkv(x_BTE, seen_B[:, None] + jnp.arange(T, dtype=jnp.int32))
    D = self.head_dim
    o = cached_attention.attend_cache_and_piece(q, k, v, cache.k_BSKD[..., :D], cache.v_BSKD[..., :D], seen_B,
                                                window=self.config.window, softcap=self.config.softcap)
    valid_B = jnp.clip(valid_B, 0, T).astype(jnp.int32)
    k_cache, v_cache = (cached_attention.write_piece(c, self._to_cache(x, c), seen_B, valid_B)
                        for c, x in ((cache.k_BSKD, k), (cache.v_BSKD, v)))
    return self._out(o), KVCache(k_cache, v_cache, seen_B + valid_B)
