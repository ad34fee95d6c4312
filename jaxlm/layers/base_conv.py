"""BaseConv: a gated short convolution (the Zoology paper's BaseConv, in the form this project's issue defines).

Letters: B batch, T length, E model width (d_model), I inner width (expand·E), W short-conv taps.

  [a_t, g_t] = W_in x_t + b_in                    (one projection E → 2I, split in halves)
  c_t = Σ_{l<W} w[W-1-l] ⊙ a_{t-l} + b_conv      (depthwise causal conv, the short_conv op)
  out_t = W_out (SiLU(c_t) ⊙ g_t) + b_out

With segment_ids (packed documents) the taps that would reach into an earlier document are taken out again.
The decode cache is the conv state: the last W-1 values of a, oldest first. `tokens_before` (the inputs just
before each row's length, as a prefill needs them for such a state) is shared with H3 and Hyena.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.layers.linear import build_linear
from pallas_kernels.common import validation
from pallas_kernels.short_conv import short_conv, short_conv_step
from pallas_kernels.short_conv.api import WIDTHS


def tokens_before(x: jax.Array, lengths_B: jax.Array, count: int) -> jax.Array:
  """[B, count, channels] from x [B, T, channels]: x[b, lengths[b] - count + c] at c (oldest first), zeros where
  that index is negative."""
  index = lengths_B[:, None] - count + jnp.arange(count)[None, :]  # [B, count]
  taken = jnp.take_along_axis(x, jnp.clip(index, 0, x.shape[1] - 1)[..., None], axis=1)
  return jnp.where((index >= 0)[..., None], taken, jnp.zeros((), x.dtype))


def conv_init(kernel_size: int):
  """torch's Conv1d default for a depthwise conv (fan_in = W): U(-1/√W, 1/√W), for taps and bias alike."""
  bound = 1 / math.sqrt(kernel_size)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def check_short_kernel(name: str, width: int) -> None:
  if width not in WIDTHS:
    raise ValueError(f"{name} must be one of {WIDTHS} (the short_conv op's widths), got {width!r}")


def without_cross_segment_taps(y_BTI: jax.Array, x_BTI: jax.Array, w_WI: jax.Array,
                               segment_ids_BT: jax.Array) -> jax.Array:
  """y = short_conv(x, w) minus the taps that reach into an earlier document: y[t] -= w[W-1-l]·x[t-l] for each
  lag l < W whose token t-l lies in another segment (only the first W-1 tokens of a document have any)."""
  validation.check_segment_ids("segment_ids", segment_ids_BT, *x_BTI.shape[:2])
  width, length = w_WI.shape[0], x_BTI.shape[1]
  dtype = jnp.promote_types(y_BTI.dtype, jnp.float32)
  y = y_BTI.astype(dtype)
  for lag in range(1, min(width, length)):
    past_BTI = jnp.pad(x_BTI, ((0, 0), (lag, 0), (0, 0)))[:, :length].astype(dtype)
    cross_BT = jnp.pad(segment_ids_BT[:, lag:] != segment_ids_BT[:, :-lag], ((0, 0), (lag, 0)))
    y = y - jnp.where(cross_BT[..., None], w_WI[width - 1 - lag].astype(dtype) * past_BTI, 0)
  return y.astype(y_BTI.dtype)


@dataclasses.dataclass(frozen=True)
class BaseConvConfig:
  d_model: int
  kernel_size: int = 3  # W: taps of the depthwise causal conv
  expand: int = 2  # I = expand·d_model, the width of each half of the input projection
  implementation: str = "auto"  # the short_conv op and its decode step

  def __post_init__(self):
    validation.check_positive("d_model", self.d_model)
    validation.check_positive("expand", self.expand)
    check_short_kernel("kernel_size", self.kernel_size)

  @property
  def inner(self) -> int:
    return self.expand * self.d_model


class BaseConv(nnx.Module):
  """Gated short convolution: SiLU(conv(a)) ⊙ g with a, g the halves of one input projection."""

  def __init__(self, config: BaseConvConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.dtype = dtype
    e, i, w = config.d_model, config.inner, config.kernel_size
    partitioned = nnx.with_partitioning
    # One [E, 2, I] kernel rather than [E, 2I]: splitting the halves then never cuts across a tensor shard.
    in_init = nnx.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
    self.in_kernel_E2I = nnx.Param(partitioned(in_init, ("embed", None, "mlp"))(rngs.params(), (e, 2, i),
                                                                                 param_dtype))
    self.in_bias_2I = nnx.Param(partitioned(nnx.initializers.zeros, (None, "mlp"))(rngs.params(), (2, i),
                                                                                   param_dtype))
    self.conv_WI = nnx.Param(partitioned(conv_init(w), ("conv", "mlp"))(rngs.params(), (w, i), param_dtype))
    self.conv_bias_I = nnx.Param(partitioned(conv_init(w), ("mlp",))(rngs.params(), (i,), param_dtype))
    self.out_proj = build_linear(i, e, axes=("mlp", "embed"), use_bias=True, dtype=dtype, param_dtype=param_dtype,
                                 rngs=rngs)

  def _halves(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """a, g [..., I]: the conv input and the gate."""
    h = jnp.einsum("...e,eci->...ci", x.astype(self.dtype), self.in_kernel_E2I[...].astype(self.dtype))
    h = h + self.in_bias_2I[...].astype(self.dtype)
    return h[..., 0, :], h[..., 1, :]

  def _conv_params(self) -> tuple[jax.Array, jax.Array]:
    return self.conv_WI[...].astype(self.dtype), self.conv_bias_I[...].astype(self.dtype)

  def _output(self, c: jax.Array, g: jax.Array) -> jax.Array:
    return self.out_proj(jax.nn.silu(c) * g)

  def _forward(self, x_BTE: jax.Array, segment_ids_BT: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(out [B, T, E], the conv input a [B, T, I])."""
    a_BTI, g_BTI = self._halves(x_BTE)
    w_WI, bias_I = self._conv_params()
    c_BTI = short_conv(a_BTI, w_WI, bias_I, implementation=self.config.implementation)
    if segment_ids_BT is not None:
      c_BTI = without_cross_segment_taps(c_BTI, a_BTI, w_WI, segment_ids_BT)
    return self._output(c_BTI, g_BTI), a_BTI

  def __call__(self, x_BTE: jax.Array, *, segment_ids: jax.Array | None = None) -> jax.Array:
    """The parallel form; with segment_ids no tap reaches into an earlier packed document."""
    return self._forward(x_BTE, segment_ids)[0]

  def init_cache(self, batch: int, max_length: int, dtype=None) -> jax.Array:
    """The conv state [B, W-1, I]: zeros, as before the first token."""
    del max_length
    return jnp.zeros((batch, self.config.kernel_size - 1, self.config.inner), dtype or self.dtype)

  def prefill(self, x_BTE: jax.Array, cache: jax.Array, lengths_B: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The parallel form over right-padded prompts; the state holds the conv inputs just before lengths[b]."""
    validation.check_lengths("lengths_B", lengths_B, x_BTE.shape[0], x_BTE.shape[1])
    y_BTE, a_BTI = self._forward(x_BTE)
    return y_BTE, tokens_before(a_BTI, lengths_B, self.config.kernel_size - 1).astype(cache.dtype)

  def extend(self, x_BTE: jax.Array, cache: jax.Array, valid_B: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Chunked prefill: the conv runs over [the cached W-1 inputs ; the piece], so the piece's first taps reach
    into the previous piece; the state becomes the W-1 inputs before valid[b] (kept where valid[b] <= 0)."""
    width = self.config.kernel_size
    a_BTI, g_BTI = self._halves(x_BTE)
    a_BLI = jnp.concatenate([cache.astype(a_BTI.dtype), a_BTI], axis=1)  # L = W-1 + T
    c_BTI = short_conv(a_BLI, *self._conv_params(), implementation=self.config.implementation)[:, width - 1:]
    state = tokens_before(a_BLI, width - 1 + jnp.clip(valid_B, 0, x_BTE.shape[1]), width - 1).astype(cache.dtype)
    return self._output(c_BTI, g_BTI), jnp.where((valid_B > 0)[:, None, None], state, cache)

  def decode(self, x_BE: jax.Array, cache: jax.Array) -> tuple[jax.Array, jax.Array]:
    a_BI, g_BI = self._halves(x_BE)
    c_BI, cache = short_conv_step(a_BI.astype(cache.dtype), cache, *self._conv_params(),
                                  implementation=self.config.implementation)
    return self._output(c_BI.astype(self.dtype), g_BI), cache
