"""BASED linear attention (Arora et al. 2024, "Simple linear attention language models balance the
recall-throughput tradeoff") as a sequence mixer.

Letters: B batch, T length, E model width (d_model), H heads, F feature dim, D value head dim (E / H).

  q_t, k_t = W_q x_t, W_k x_t ∈ R^{H×F},   v_t = W_v x_t ∈ R^{H×D}
  S_t = Σ_{s≤t} phi(k_s) v_sᵀ,   z_t = Σ_{s≤t} phi(k_s)
  y_t = phi(q_t)·S_t / (phi(q_t)·z_t + eps)    (normalize=True)      y_t = phi(q_t)·S_t    (normalize=False)
  out_t = W_o y_t,  or W_o RMSNorm_h(y_t) with norm="rms" (RMSNorm over D within each head)

phi is the second-order Taylor map of exp(q·k/√F) (pallas_kernels/based). The unnormalised variant grows with t,
which is why it is paired with the per-head RMSNorm. The decode cache is the BasedState (S, z split by Taylor
order, float32, the order-2 products k_i·k_j kept once per pair i ≤ j: 1 + F + F(F+1)/2 rows of D per head,
pallas_kernels/based/symmetric.py): its size does not grow with the sequence.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.layers.linear import build_linear
from pallas_kernels.based import BasedState, based_decode_step, based_linear_attention
from pallas_kernels.based.api import MAX_FEATURE_DIM
from pallas_kernels.common import validation

NORMS = (None, "rms")
_RMS_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class BasedConfig:
  d_model: int
  num_heads: int
  feature_dim: int = 16  # q/k width per head before the Taylor map (the state holds ~F²/2·D per head)
  normalize: bool = True  # divide by phi(q)·z, as softmax divides by its partition sum
  eps: float = 1e-6  # added to the normaliser
  chunk: int = 64  # tokens per chunk of the parallel form
  norm: str | None = None  # "rms": per-head RMSNorm of y before W_o (meant for normalize=False)
  implementation: str = "auto"  # the sequence op
  decode_implementation: str = "auto"  # the decode step

  def __post_init__(self):
    validation.check_positive("d_model", self.d_model)
    validation.check_positive("num_heads", self.num_heads)
    if self.d_model % self.num_heads:
      raise ValueError(f"num_heads={self.num_heads} must divide d_model={self.d_model}")
    validation.check_positive("feature_dim", self.feature_dim)
    if self.feature_dim > MAX_FEATURE_DIM:
      raise ValueError(f"feature_dim={self.feature_dim} exceeds {MAX_FEATURE_DIM}: the state holds an "
                       f"F(F+1)/2·D block per head")
    validation.check_positive("chunk", self.chunk)
    if not self.eps >= 0:
      raise ValueError(f"eps must be >= 0, got {self.eps!r}")
    validation.check_in("norm", self.norm, NORMS)

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads


def per_head_rms_norm(y_BTHD: jax.Array, scale_HD: jax.Array) -> jax.Array:
  """y / sqrt(mean_D(y²) + eps) · scale, each head normalised on its own, computed in float32."""
  y = y_BTHD.astype(jnp.float32)
  y = y * jax.lax.rsqrt(jnp.mean(y * y, axis=-1, keepdims=True) + _RMS_EPS)
  return (y * scale_HD.astype(jnp.float32)).astype(y_BTHD.dtype)


class Based(nnx.Module):
  """BASED linear attention mixer: Taylor-feature q/k projections, value projection, output projection."""

  def __init__(self, config: BasedConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.dtype = dtype
    e, h, f = config.d_model, config.num_heads, config.feature_dim
    kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_proj = build_linear(e, h * f, axes=("embed", "heads"), **kw)
    self.k_proj = build_linear(e, h * f, axes=("embed", "heads"), **kw)
    self.v_proj = build_linear(e, e, axes=("embed", "heads"), **kw)
    self.out_proj = build_linear(e, e, axes=("heads", "embed"), **kw)
    if config.norm == "rms":
      self.norm_scale_HD = nnx.Param(nnx.with_partitioning(nnx.initializers.ones, ("heads", "head_dim"))(
          rngs.params(), (h, config.head_dim), param_dtype))

  def _qkv(self, x_BTE: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q, k [B, T, H, F] and v [B, T, H, D] (any leading axes before E work the same)."""
    h, f, d = self.config.num_heads, self.config.feature_dim, self.config.head_dim
    lead = x_BTE.shape[:-1]
    q = self.q_proj(x_BTE).reshape(*lead, h, f)
    k = self.k_proj(x_BTE).reshape(*lead, h, f)
    v = self.v_proj(x_BTE).reshape(*lead, h, d)
    return q, k, v

  def _output(self, y_BTHD: jax.Array) -> jax.Array:
    if self.config.norm == "rms":
      y_BTHD = per_head_rms_norm(y_BTHD, self.norm_scale_HD[...])
    return self.out_proj(y_BTHD.reshape(*y_BTHD.shape[:-2], self.config.d_model).astype(self.dtype))

  def _attend(self, q, k, v, **kwargs):
    c = self.config
    return based_linear_attention(q, k, v, normalize=c.normalize, eps=c.eps, chunk=c.chunk,
                                  implementation=c.implementation, **kwargs)

  def __call__(self, x_BTE: jax.Array, *, segment_ids: jax.Array | None = None) -> jax.Array:
    """The parallel form; with segment_ids a token attends only within its packed document."""
    q, k, v = self._qkv(x_BTE)
    return self._output(self._attend(q, k, v, segment_ids=segment_ids))

  def init_cache(self, batch: int, max_length: int, dtype=None) -> BasedState:
    """The empty BasedState; it is float32 whatever `dtype`, and its size does not depend on max_length."""
    del max_length, dtype
    c = self.config
    return BasedState.zeros(batch, c.num_heads, c.feature_dim, c.head_dim)

  def prefill(self, x_BTE: jax.Array, cache: BasedState, lengths_B: jax.Array) -> tuple[jax.Array, BasedState]:
    """The parallel form over right-padded prompts, and the state after exactly lengths[b] tokens of row b.

    Starts from an empty state (`cache` only fixes the layout). Outputs at padded positions are meaningless.
    """
    del cache
    validation.check_lengths("lengths_B", lengths_B, *x_BTE.shape[:2])
    return self._attend_prefix(x_BTE, lengths_B, None)

  def extend(self, x_BTE: jax.Array, cache: BasedState, valid_B: jax.Array) -> tuple[jax.Array, BasedState]:
    """Chunked prefill: the state after the first valid[b] tokens of this piece, continued from `cache`; rows with
    valid[b] <= 0 keep theirs."""
    y_BTE, state = self._attend_prefix(x_BTE, jnp.clip(valid_B, 0, x_BTE.shape[1]), cache)
    keep_B = valid_B <= 0
    return y_BTE, jax.tree.map(lambda old, new: jnp.where(keep_B.reshape((-1,) + (1,) * (new.ndim - 1)), old, new),
                               cache, state)

  def _attend_prefix(self, x_BTE: jax.Array, lengths_B: jax.Array, initial_state: BasedState | None
                     ) -> tuple[jax.Array, BasedState]:
    """Outputs over x, and the state after the first lengths[b] tokens (from initial_state, None = empty).

    Padded tokens get k = v = 0, so phi(k) = [1, 0, 0] adds nothing to S and one count per padded token to z's
    order-0 term, which is taken back afterwards.
    """
    length = x_BTE.shape[1]
    q, k, v = self._qkv(x_BTE)
    valid_BT11 = (jnp.arange(length)[None, :] < lengths_B[:, None])[:, :, None, None]
    k = jnp.where(valid_BT11, k, jnp.zeros((), k.dtype))
    v = jnp.where(valid_BT11, v, jnp.zeros((), v.dtype))
    y_BTHD, state = self._attend(q, k, v, initial_state=initial_state, return_final_state=True)
    padded_B = (length - lengths_B).astype(state.z0_BH.dtype)
    state = state._replace(z0_BH=state.z0_BH - padded_B[:, None])
    return self._output(y_BTHD), state

  def decode(self, x_BE: jax.Array, cache: BasedState) -> tuple[jax.Array, BasedState]:
    """One token per row: add phi(k) vᵀ and phi(k) to the state, read it out with phi(q)."""
    c = self.config
    q, k, v = self._qkv(x_BE)
    y_BHD, cache = based_decode_step(q, k, v, cache, normalize=c.normalize, eps=c.eps,
                                     implementation=c.decode_implementation)
    return self._output(y_BHD), cache
