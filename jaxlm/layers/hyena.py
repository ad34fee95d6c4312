"""The Hyena operator (Poli et al. 2023, "Hyena Hierarchy: Towards Larger Convolutional Language Models") as a
mixer, of order N >= 2, following the HyenaOperator of the paper's code.

Letters: B batch, T length, E model width (d_model), P = (N+1)·E projected channels, O = N-1 long filters,
L filter length (max_length), S cache length, W short-conv taps.

  z = ShortConv(W_in x + b_in)                    E → (N+1)·E, then a depthwise causal conv (W = 3)
  [x_0, …, x_{N-1}, v] = split(z)                 N gates and the value, E channels each
  for o = 0 … N-2, gate x_{N-1-o}:                the Hyena recurrence
    u_o = x_{N-1-o} ⊙ v
    v   = h_o * u_o + b_o ⊙ u_o                   causal long conv with the implicit filter h_o, skip b_o
  out = W_out (x_0 ⊙ v) + b_out

As in that code the short conv stands for the paper's first (shift) filter, so order N has N-1 implicit long
filters h_o = hyena_filter (an MLP of positional features, windowed by an exponential decay). The filters are
generated for `max_length` positions and cut to the sequence, so a filter tap depends only on its lag. Each step
is one fused long_conv (FlashFFTConv's kernel on GPU): h_o * u + b_o ⊙ u = (h_o + b_o·δ) * u, the bias being the
filter's lag-0 tap, with the gate x_{N-1-o} as the op's input gate and x_0 as the last step's output gate.

Decoding: Hyena has no recurrence of fixed size. The cache keeps every past long-conv input u_o (newest first),
and a decode step computes the conv at the new position as the dot product Σ_j h_o[j]·u_o[t-j] over that history
(the shift-SSM step with the filter as its taps): O(T·E) per token, O(T²·E) per generated sequence, and a cache
of O·S·E values per row.

The parameters keep the names checkpoints store them under: short_conv_WC [W, P] and short_conv_bias_C [P]
(C here is P, not a chunk), and the filter MLP's filter_* in pallas_kernels/long_conv/hyena.py's letters.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.layers.base_conv import check_short_kernel, conv_init, tokens_before
from jaxlm.layers.linear import build_linear
from jaxlm.layers.mixer import segment_ids_unsupported
from jaxlm.layers.ssm_param import ssm_param
from pallas_kernels.common import validation
from pallas_kernels.long_conv import HyenaFilterParams, hyena_filter, hyena_filter_init, long_conv
from pallas_kernels.long_conv.ssm import shift_ssm_step
from pallas_kernels.short_conv import short_conv, short_conv_step


@dataclasses.dataclass(frozen=True)
class HyenaConfig:
  d_model: int
  max_length: int  # L: the longest sequence; filters are generated over L positions (part of the model)
  order: int = 2  # N: N gates and a value from the projection, N-1 implicit long filters
  filter_order: int = 64  # width of the implicit-filter MLP
  emb_dim: int = 3  # positional features of the filter MLP (odd: time plus sine/cosine pairs)
  filter_layers: int = 2  # inner layers of the filter MLP
  filter_freq: float = 1.0  # initial frequency of the MLP's Sin activations
  short_kernel: int = 3  # W: taps of the short depthwise conv
  implementation: str = "auto"  # the long_conv op
  short_conv_implementation: str = "auto"  # the short_conv op and its decode step

  def __post_init__(self):
    validation.check_positive("d_model", self.d_model)
    validation.check_positive("max_length", self.max_length)
    if not isinstance(self.order, int) or self.order < 2:
      raise ValueError(f"order must be an integer >= 2 (order 1 has no long convolution), got {self.order!r}")
    validation.check_positive("filter_order", self.filter_order)
    if not isinstance(self.emb_dim, int) or self.emb_dim < 3 or self.emb_dim % 2 == 0:
      raise ValueError(f"emb_dim must be an odd integer >= 3 (time plus sine/cosine pairs), got {self.emb_dim!r}")
    if self.filter_layers < 0:
      raise ValueError(f"filter_layers must be >= 0, got {self.filter_layers!r}")
    check_short_kernel("short_kernel", self.short_kernel)


class HyenaCache(NamedTuple):
  conv_BWP: jax.Array  # short-conv state: the last W-1 projections, oldest first
  history_OBSE: jax.Array  # past long-conv inputs u_o, newest first (slot j holds u_o[t-j])


class Hyena(nnx.Module):
  """Hyena operator: projections, short conv, N-1 gated implicit long convolutions, output projection."""

  def __init__(self, config: HyenaConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.dtype = dtype
    e, n, w = config.d_model, config.order, config.short_kernel
    partitioned = nnx.with_partitioning
    kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.in_proj = build_linear(e, (n + 1) * e, axes=("embed", "mlp"), **kw)
    self.out_proj = build_linear(e, e, axes=("mlp", "embed"), **kw)
    self.short_conv_WC = nnx.Param(partitioned(conv_init(w), ("conv", "mlp"))(rngs.params(), (w, (n + 1) * e),
                                                                              param_dtype))
    self.short_conv_bias_C = nnx.Param(partitioned(conv_init(w), ("mlp",))(rngs.params(), ((n + 1) * e,),
                                                                           param_dtype))
    # Filter-MLP weights are SSMParams (no weight decay, float32), as the Hyena code sets wd = 0 for them; the
    # MLP is small, so it stays replicated.
    params = hyena_filter_init(rngs.params(), (n - 1) * e, config.emb_dim, config.filter_order,
                               config.filter_layers, config.filter_freq)
    for name, value in params._asdict().items():
      setattr(self, f"filter_{name}", ssm_param(value, (None,) * value.ndim))
    self.filter_bias_OE = nnx.Param(partitioned(nnx.initializers.normal(1.0), (None, "mlp"))(
        rngs.params(), (n - 1, e), param_dtype))

  def _filters(self, length: int) -> jax.Array:
    """h [length, O, E], float32: the filters over max_length positions, cut to the first `length` lags."""
    c = self.config
    params = HyenaFilterParams(*(getattr(self, f"filter_{name}")[...] for name in HyenaFilterParams._fields))
    return hyena_filter(params, c.max_length)[:length].reshape(length, c.order - 1, c.d_model)

  def _short_conv_params(self) -> tuple[jax.Array, jax.Array]:
    return self.short_conv_WC[...].astype(self.dtype), self.short_conv_bias_C[...].astype(self.dtype)

  def _split(self, z: jax.Array) -> tuple[list[jax.Array], jax.Array]:
    *gates, v = jnp.split(z, self.config.order + 1, axis=-1)
    return gates, v

  def _forward(self, x_BTE: jax.Array) -> tuple[jax.Array, jax.Array, list[jax.Array]]:
    """(out [B, T, E], the projection before the short conv [B, T, P], the long-conv inputs u_o [B, T, E])."""
    c = self.config
    length = x_BTE.shape[1]
    if length > c.max_length:
      raise ValueError(f"sequence length {length} exceeds max_length={c.max_length} (the filters' length)")
    p_BTP = self.in_proj(x_BTE.astype(self.dtype))
    gates, v = self._split(short_conv(p_BTP, *self._short_conv_params(),
                                      implementation=c.short_conv_implementation))
    filters_TOE = self._filters(length)
    bias_OE = self.filter_bias_OE[...].astype(self.dtype)
    filters_TOE = filters_TOE.at[0].add(bias_OE.astype(filters_TOE.dtype))  # the skip b_o as the lag-0 tap
    steps = list(reversed(gates[1:]))
    inputs = []
    for o, gate in enumerate(steps):
      inputs.append(gate * v)  # the decode cache's history: prefill reads it, the parallel forward does not
      out_gate = gates[0] if o == len(steps) - 1 else None
      v = long_conv(v, filters_TOE[:, o], in_gate=gate, out_gate=out_gate, implementation=c.implementation)
    return self.out_proj(v), p_BTP, inputs

  def __call__(self, x_BTE: jax.Array, *, segment_ids: jax.Array | None = None) -> jax.Array:
    segment_ids_unsupported("Hyena", segment_ids)
    return self._forward(x_BTE)[0]

  def init_cache(self, batch: int, max_length: int, dtype=None) -> HyenaCache:
    """Zero short-conv state and an empty history of max_length (<= config.max_length) inputs per filter."""
    c = self.config
    if max_length > c.max_length:
      raise ValueError(f"cache max_length={max_length} exceeds the filters' max_length={c.max_length}")
    dtype = dtype or self.dtype
    return HyenaCache(jnp.zeros((batch, c.short_kernel - 1, (c.order + 1) * c.d_model), dtype),
                      jnp.zeros((c.order - 1, batch, max_length, c.d_model), dtype))

  def prefill(self, x_BTE: jax.Array, cache: HyenaCache, lengths_B: jax.Array) -> tuple[jax.Array, HyenaCache]:
    """The parallel form over right-padded prompts; the cache gets the short-conv inputs before lengths[b] and
    the long-conv inputs of the first lengths[b] positions, newest first."""
    batch, length = x_BTE.shape[:2]
    cache_length = cache.history_OBSE.shape[2]
    if length > cache_length:
      raise ValueError(f"prompt length {length} exceeds the cache's max_length={cache_length}")
    validation.check_lengths("lengths_B", lengths_B, batch, length)
    y_BTE, p_BTP, inputs = self._forward(x_BTE)
    conv_BWP = tokens_before(p_BTP, lengths_B, self.config.short_kernel - 1)
    history_OBSE = jnp.stack([tokens_before(u_BTE, lengths_B, cache_length)[:, ::-1] for u_BTE in inputs])
    return y_BTE, HyenaCache(conv_BWP.astype(cache.conv_BWP.dtype), history_OBSE.astype(cache.history_OBSE.dtype))

  def extend(self, x_BTE: jax.Array, cache: HyenaCache, valid_B: jax.Array) -> tuple[jax.Array, HyenaCache]:
    """Chunked prefill: the short conv over [cached W-1 projections ; the piece], each long conv over [the stored
    history, oldest first ; the piece's inputs u_o] (its output at the piece only), the history then advanced by
    the first valid[b] inputs (rows with valid[b] <= 0 keep their cache).

    The history is as long as the cache (S), so a piece costs one long conv of S + T: Hyena's prefill memory is
    bounded by its cache plus the piece, as its cache already grows with max_length.
    """
    c = self.config
    length, width = x_BTE.shape[1], c.short_kernel
    slots = cache.history_OBSE.shape[2]
    valid_B = jnp.clip(valid_B, 0, length)
    p_BTP = self.in_proj(x_BTE.astype(self.dtype))
    p_BLP = jnp.concatenate([cache.conv_BWP.astype(p_BTP.dtype), p_BTP], axis=1)  # L = W-1 + T
    z_BTP = short_conv(p_BLP, *self._short_conv_params(), implementation=c.short_conv_implementation)[:, width - 1:]
    gates, v = self._split(z_BTP)
    # Lags past the filters' max_length only ever pair a piece token with history slots before position 0
    # (zeros), as every real position is below max_length; zero taps there.
    filters_LOE = self._filters(min(slots + length, c.max_length))
    filters_LOE = jnp.pad(filters_LOE, ((0, slots + length - filters_LOE.shape[0]), (0, 0), (0, 0)))
    bias_OE = self.filter_bias_OE[...].astype(self.dtype)
    filters_LOE = filters_LOE.at[0].add(bias_OE.astype(filters_LOE.dtype))
    history = []
    for o, gate in enumerate(reversed(gates[1:])):
      u_BLE = jnp.concatenate([cache.history_OBSE[o][:, ::-1].astype(self.dtype), gate * v], axis=1)
      v = long_conv(u_BLE, filters_LOE[:, o], implementation=c.implementation)[:, slots:]
      history.append(tokens_before(u_BLE, slots + valid_B, slots)[:, ::-1])
    keep = valid_B <= 0
    conv_BWP = tokens_before(p_BLP, width - 1 + valid_B, width - 1).astype(cache.conv_BWP.dtype)
    history_OBSE = jnp.stack(history).astype(cache.history_OBSE.dtype)
    return self.out_proj(gates[0] * v), HyenaCache(jnp.where(keep[:, None, None], cache.conv_BWP, conv_BWP),
                                                   jnp.where(keep[None, :, None, None], cache.history_OBSE,
                                                             history_OBSE))

  def decode(self, x_BE: jax.Array, cache: HyenaCache) -> tuple[jax.Array, HyenaCache]:
    """One token per row: short-conv step, then each long conv as a dot product over the stored history."""
    p_BP = self.in_proj(x_BE.astype(self.dtype))
    z_BP, conv_BWP = short_conv_step(p_BP.astype(cache.conv_BWP.dtype), cache.conv_BWP, *self._short_conv_params(),
                                     implementation=self.config.short_conv_implementation)
    gates, v = self._split(z_BP.astype(self.dtype))
    filters_SOE = self._filters(cache.history_OBSE.shape[2])
    bias_OE = self.filter_bias_OE[...].astype(self.dtype)
    history = []
    for o, gate in enumerate(reversed(gates[1:])):
      u_BE = gate * v
      conv_BE, history_BSE = shift_ssm_step(cache.history_OBSE[o], u_BE.astype(cache.history_OBSE.dtype),
                                            filters_SOE[:, o])
      history.append(history_BSE)
      v = conv_BE.astype(self.dtype) + bias_OE[o] * u_BE
    return self.out_proj(gates[0] * v), HyenaCache(conv_BWP, jnp.stack(history))
