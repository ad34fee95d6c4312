"""H3 (Fu et al. 2023, "Hungry Hungry Hippos: Towards Language Modeling with State Space Models") as a mixer.

Letters: B batch, T length, E model width, N state size (shift-SSM taps), M = N/2 complex S4D modes, L filter
length (the impulse responses, L = T), P = head_dim, H = E/P heads, C = H·P² diagonal-SSM channels.

  q, k, v = W_q x + b_q, W_k x + b_k, W_v x + b_v
  k̃ = SSM_shift(k) + D_k ⊙ k                 shift SSM: a causal conv with N learned taps per channel of E
  u[h, i, j] = k̃[h, i] · v[h, j]              per head, the outer product of its P keys and P values (C channels)
  s = SSM_diag(u) + D ⊙ u                     diagonal S4D SSM per head (its P² channels share it), real state N
  y[h, j] = Σ_i q[h, i] · s[h, i, j]
  out = W_o y + b_o

(eq. 3 of the paper; the skips D_k and D are its symbols, not shape letters; head dim P as the H3 code's
`head_dim`). With P = 1 (the default, H3's language models) u = k̃ ⊙ v and y = q ⊙ s per channel, each channel's
state one product; P > 1 gives each head a P x P associative memory, as Zoology and the BASED paper run MQAR (P = 2).
Training runs the shift SSM as a short causal convolution of its N taps (the short_conv op, D_k on the current
token's tap; past short_conv's widths, a long convolution) and the diagonal SSM as a long convolution of its
impulse response (the long_conv op, FlashFFTConv's kernel on GPU), the skip D being the filter's lag-0 tap; with
P = 1 as one fused call, y = long_conv(k̃, k_diag + D·δ, in_gate=v, out_gate=q), so q, k̃ and v cross memory once.
Decoding steps both SSMs as recurrences.
The decode cache is the two SSM states: the last N values of k (newest first) and the complex S4D state
[B, C, M], so its size does not grow with the sequence.

SSM parameters (taps, step sizes, poles, B, C) are `SSMParam`s (jaxlm/layers/ssm_param.py): float32 whatever the
compute dtype, and free of weight decay. The parameters keep the names checkpoints store them under, written in
pallas_kernels/long_conv's letters (D a channel; N in S4D's fields its complex modes, M here):
shift_taps_ND [N, E], shift_skip_D [E], and per head skip_D [H], log_dt_D [H], log_neg_real_DN … C_im_DN [H, M].
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.layers.base_conv import tokens_before
from jaxlm.layers.linear import build_linear
from jaxlm.layers.mixer import segment_ids_unsupported
from jaxlm.layers.ssm_param import ssm_param
from pallas_kernels.common import validation
from pallas_kernels.long_conv import S4DParams, long_conv, s4d_inv_init, s4d_kernel, s4d_lin_init, shift_ssm_kernel
from pallas_kernels.long_conv.ssm import DISCRETIZATIONS, diagonal_ssm_step, s4d_discretize, shift_ssm_step
from pallas_kernels.short_conv import short_conv
from pallas_kernels.short_conv.api import MAX_WIDTH as SHORT_CONV_MAX_WIDTH

S4D_INITS = {"lin": s4d_lin_init, "inv": s4d_inv_init}


@dataclasses.dataclass(frozen=True)
class H3Config:
  d_model: int
  state_dim: int = 64  # N: shift-SSM taps, and the S4D real state per channel (N/2 complex modes)
  head_dim: int = 1  # P: keys and values per head, whose P² products share one diagonal SSM
  discretization: str = "zoh"  # S4D: "zoh" or "bilinear"
  init: str = "lin"  # S4D-Lin or S4D-Inv poles
  dt_min: float = 1e-3  # S4D step sizes Δ are log-uniform in [dt_min, dt_max]
  dt_max: float = 1e-1
  implementation: str = "auto"  # the long_conv op
  short_conv_implementation: str = "auto"  # the short_conv op (the shift SSM)

  def __post_init__(self):
    validation.check_positive("d_model", self.d_model)
    if not isinstance(self.state_dim, int) or self.state_dim < 2 or self.state_dim % 2:
      raise ValueError(f"state_dim must be an even integer >= 2 (S4D keeps state_dim/2 complex modes), got "
                       f"{self.state_dim!r}")
    if not isinstance(self.head_dim, int) or self.head_dim < 1 or self.d_model % self.head_dim:
      raise ValueError(f"head_dim={self.head_dim!r} must be a positive integer dividing d_model={self.d_model}")
    validation.check_in("discretization", self.discretization, DISCRETIZATIONS)
    validation.check_in("init", self.init, tuple(S4D_INITS))
    validation.check_positive("dt_min", self.dt_min)
    if not self.dt_min < self.dt_max:
      raise ValueError(f"dt_min must be below dt_max, got dt_min={self.dt_min}, dt_max={self.dt_max}")


class H3Cache(NamedTuple):
  shift_BNE: jax.Array  # the last N values of k, newest first (compute dtype)
  ssm_BCM: jax.Array  # the S4D state x_t per diagonal-SSM channel, complex64


class H3(nnx.Module):
  """H3: q ⊙ SSM_diag(SSM_shift(k) ⊙ v) with skips, per channel, between linear projections."""

  def __init__(self, config: H3Config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.dtype = dtype
    e, n = config.d_model, config.state_dim
    heads = e // config.head_dim
    partitioned = nnx.with_partitioning
    kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_proj, self.k_proj, self.v_proj = (build_linear(e, e, axes=("embed", "mlp"), **kw) for _ in range(3))
    self.out_proj = build_linear(e, e, axes=("mlp", "embed"), **kw)
    # The H3 code draws the taps from a standard normal; the 1/√N keeps k̃ near the variance of k.
    self.shift_taps_ND = ssm_param(jax.random.normal(rngs.params(), (n, e)) / jnp.sqrt(n), ("ssm_state", "mlp"))
    s4d = S4D_INITS[config.init](rngs.params(), heads, n // 2, config.dt_min, config.dt_max)
    for name, value in s4d._asdict().items():
      axes = ("mlp",) if value.ndim == 1 else ("mlp", "ssm_state")
      setattr(self, name, ssm_param(value, axes))
    normal = nnx.initializers.normal(1.0)
    self.shift_skip_D = nnx.Param(partitioned(normal, ("mlp",))(rngs.params(), (e,), param_dtype))
    self.skip_D = nnx.Param(partitioned(normal, ("mlp",))(rngs.params(), (heads,), param_dtype))

  def _s4d(self) -> S4DParams:
    """The heads' S4D parameters [H, ...]."""
    return S4DParams(*(getattr(self, name)[...] for name in S4DParams._fields))

  def _per_channel(self, x_H: jax.Array) -> jax.Array:
    """A head's value for each of its P² diagonal-SSM channels: [H, ...] -> [C, ...], channels head-major."""
    p = self.config.head_dim
    return x_H if p == 1 else jnp.repeat(x_H, p * p, axis=0)

  def _diag_filter(self, length: int, skip_C: jax.Array) -> jax.Array:
    """The diagonal SSM's impulse response per channel [L, C], with the skip D as its lag-0 tap:
    conv(u, k_diag) + D ⊙ u = conv(u, k_diag + D·δ)."""
    diag_LH = s4d_kernel(self._s4d(), length, self.config.discretization)
    diag_LC = self._per_channel(diag_LH.T).T
    return diag_LC.at[0].add(skip_C.astype(diag_LC.dtype))

  def _discretized(self) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(Ā, B̄, C) per channel, each complex [C, M]."""
    return tuple(self._per_channel(x) for x in s4d_discretize(self._s4d(), self.config.discretization))

  def _by_head(self, x: jax.Array) -> jax.Array:
    """[..., H·P] -> [..., H, P]."""
    p = self.config.head_dim
    return x.reshape(*x.shape[:-1], x.shape[-1] // p, p)

  def _products(self, k_shift: jax.Array, v: jax.Array) -> jax.Array:
    """u [..., C]: per head the P x P products k̃_i v_j (k̃ ⊙ v when P = 1)."""
    if self.config.head_dim == 1:
      return k_shift * v
    u = self._by_head(k_shift)[..., :, None] * self._by_head(v)[..., None, :]
    return u.reshape(*u.shape[:-3], -1)

  def _read(self, q: jax.Array, s: jax.Array) -> jax.Array:
    """y [..., E]: per head Σ_i q_i s_ij (q ⊙ s when P = 1)."""
    if self.config.head_dim == 1:
      return q * s
    q = self._by_head(q)
    y = jnp.sum(q[..., :, None] * s.reshape(*q.shape, q.shape[-1]), axis=-2)
    return y.reshape(*y.shape[:-2], -1)

  def _mix(self, q: jax.Array, k_shift: jax.Array, v: jax.Array, skip_C: jax.Array) -> jax.Array:
    """y = read(q, SSM_diag(u) + D ⊙ u) over [B, T, ·]: with P = 1 one long_conv with both gates fused."""
    diag_LC = self._diag_filter(k_shift.shape[1], skip_C)
    implementation = self.config.implementation
    if self.config.head_dim == 1:
      return long_conv(k_shift, diag_LC, in_gate=v, out_gate=q, implementation=implementation)
    return self._read(q, long_conv(self._products(k_shift, v), diag_LC, implementation=implementation))

  def _qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    x = x.astype(self.dtype)
    return self.q_proj(x), self.k_proj(x), self.v_proj(x)

  def _skips(self) -> tuple[jax.Array, jax.Array]:
    """D_k per channel of E and D per diagonal-SSM channel [C]."""
    return self.shift_skip_D[...].astype(self.dtype), self._per_channel(self.skip_D[...]).astype(self.dtype)

  def _shift(self, k_BTE: jax.Array, shift_skip_E: jax.Array) -> jax.Array:
    """k̃ = SSM_shift(k) + D_k ⊙ k: the causal conv with the N taps, newest first, and D_k on the current token."""
    taps_NE = self.shift_taps_ND[...]
    if taps_NE.shape[0] > SHORT_CONV_MAX_WIDTH:
      return long_conv(k_BTE, shift_ssm_kernel(taps_NE, k_BTE.shape[1]), skip=shift_skip_E,
                       implementation=self.config.implementation)
    # short_conv's taps run oldest first, the last on the current token, where D_k joins them.
    w_NE = taps_NE[::-1].astype(jnp.float32)
    w_NE = w_NE.at[-1].add(shift_skip_E.astype(jnp.float32))
    return short_conv(k_BTE, w_NE, implementation=self.config.short_conv_implementation)

  def _forward(self, x_BTE: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(out, k, u) over [B, T, ·]: the output and the two SSM inputs (u [B, T, C], which only prefill reads)."""
    shift_skip_E, skip_C = self._skips()
    q, k, v = self._qkv(x_BTE)
    k_shift = self._shift(k, shift_skip_E)
    return self.out_proj(self._mix(q, k_shift, v, skip_C)), k, self._products(k_shift, v)

  def __call__(self, x_BTE: jax.Array, *, segment_ids: jax.Array | None = None) -> jax.Array:
    segment_ids_unsupported("H3", segment_ids)
    return self._forward(x_BTE)[0]

  def init_cache(self, batch: int, max_length: int, dtype=None) -> H3Cache:
    """Zero SSM states; their size does not depend on max_length."""
    del max_length
    e, n, p = self.config.d_model, self.config.state_dim, self.config.head_dim
    return H3Cache(jnp.zeros((batch, n, e), dtype or self.dtype),
                   jnp.zeros((batch, e * p, n // 2), jnp.complex64))  # C = (E/P)·P² channels

  def prefill(self, x_BTE: jax.Array, cache: H3Cache, lengths_B: jax.Array) -> tuple[jax.Array, H3Cache]:
    """The parallel form over right-padded prompts, and both SSM states after exactly lengths[b] tokens.

    The S4D state is x = Σ_{j<len} Ā^j B̄ u[len-1-j]: a Vandermonde product over the prompt read backwards
    from each row's end, so the padding never enters it.
    """
    batch, length = x_BTE.shape[:2]
    validation.check_lengths("lengths_B", lengths_B, batch, length)
    y_BTE, k_BTE, u_BTC = self._forward(x_BTE)
    shift_BNE = tokens_before(k_BTE, lengths_B, self.config.state_dim)[:, ::-1]
    A_bar_CM, B_bar_CM, _ = self._discretized()
    reversed_BTC = tokens_before(u_BTC, lengths_B, length)[:, ::-1].astype(jnp.float32)
    # Integer powers Ā^j = exp(j·log Ā) hold on any branch of the complex log.
    powers_TCM = jnp.exp(jnp.arange(length, dtype=jnp.float32)[:, None, None] * jnp.log(A_bar_CM)[None])
    ssm_BCM = B_bar_CM * jnp.einsum("btc,tcm->bcm", reversed_BTC.astype(powers_TCM.dtype), powers_TCM,
                                    precision=jax.lax.Precision.HIGHEST)
    return y_BTE, H3Cache(shift_BNE.astype(cache.shift_BNE.dtype), ssm_BCM.astype(cache.ssm_BCM.dtype))

  def extend(self, x_BTE: jax.Array, cache: H3Cache, valid_B: jax.Array) -> tuple[jax.Array, H3Cache]:
    """Chunked prefill: both SSMs continued from `cache` over a piece whose first valid[b] tokens are real (rows
    with valid[b] <= 0 keep their cache).

    The shift SSM runs over [the cached N keys ; the piece]. The S4D output of piece token t adds the carried
    state's response 2·Re(C·Ā^{t+1} x_0) to the piece's own convolution, and the state becomes
    Ā^n x_0 + Σ_{j<n} Ā^j B̄ u[n-1-j] for the n = valid[b] real tokens (exp(n·log Ā): integer powers).
    """
    n = self.config.state_dim
    length = x_BTE.shape[1]
    shift_skip_E, skip_C = self._skips()
    q, k, v = self._qkv(x_BTE)
    k_BLE = jnp.concatenate([cache.shift_BNE[:, ::-1].astype(k.dtype), k], axis=1)  # L = N + T, oldest first
    k_shift = self._shift(k_BLE, shift_skip_E)[:, n:]
    y = self._mix(q, k_shift, v, skip_C)
    A_bar_CM, B_bar_CM, C_CM = self._discretized()
    log_A_CM = jnp.log(A_bar_CM)
    steps_T11 = jnp.arange(1, length + 1, dtype=jnp.float32)[:, None, None]
    carried_BTC = 2 * jnp.einsum("bcm,tcm->btc", cache.ssm_BCM, C_CM[None] * jnp.exp(steps_T11 * log_A_CM[None]),
                                 precision=jax.lax.Precision.HIGHEST).real
    y = y + self._read(q.astype(jnp.float32), carried_BTC).astype(y.dtype)  # read-out is linear in s
    valid_B = jnp.clip(valid_B, 0, length)
    u_BTC = self._products(k_shift, v)
    reversed_BTC = tokens_before(u_BTC, valid_B, length)[:, ::-1].astype(jnp.float32)
    powers_TCM = jnp.exp(jnp.arange(length, dtype=jnp.float32)[:, None, None] * log_A_CM[None])
    fresh_BCM = B_bar_CM * jnp.einsum("btc,tcm->bcm", reversed_BTC.astype(powers_TCM.dtype), powers_TCM,
                                      precision=jax.lax.Precision.HIGHEST)
    ssm_BCM = jnp.exp(valid_B.astype(jnp.float32)[:, None, None] * log_A_CM[None]) * cache.ssm_BCM + fresh_BCM
    shift_BNE = tokens_before(k_BLE, n + valid_B, n)[:, ::-1]
    keep_B11 = (valid_B <= 0)[:, None, None]
    return self.out_proj(y), H3Cache(jnp.where(keep_B11, cache.shift_BNE, shift_BNE.astype(cache.shift_BNE.dtype)),
                                     jnp.where(keep_B11, cache.ssm_BCM, ssm_BCM.astype(cache.ssm_BCM.dtype)))

  def decode(self, x_BE: jax.Array, cache: H3Cache) -> tuple[jax.Array, H3Cache]:
    """One token per row: one step of the shift SSM, then of the S4D recurrence."""
    shift_skip_E, skip_C = self._skips()
    q, k, v = self._qkv(x_BE)
    k_shift, shift_BNE = shift_ssm_step(cache.shift_BNE, k.astype(cache.shift_BNE.dtype), self.shift_taps_ND[...])
    u_BC = self._products(k_shift.astype(self.dtype) + shift_skip_E * k, v)
    y_ssm, ssm_BCM = diagonal_ssm_step(cache.ssm_BCM, u_BC, *self._discretized())
    return self.out_proj(self._read(q, y_ssm + skip_C * u_BC)), H3Cache(shift_BNE, ssm_BCM)
