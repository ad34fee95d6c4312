"""Which keys a query sees, and which blocks the kernels can skip because nothing in them is visible; the scale and
soft-cap of the logits, shared by every attention kernel.

Query row t sits at position p = q_offset + t (q_offset = S - T: bottom-right alignment, as the reference).
Key s is visible iff s < kv_len (padding), p - s < window (if set), s - p <= right (right = 0 when causal,
window_right if set, the smaller of the two if both), and the segment ids match (checked by the kernels).
Block ranges use the same bounds on whole blocks; every bound is clamped at 0 before dividing so that lax.div,
which truncates, agrees with floor division.

The kernels take the softmax in base 2: exp(x) = exp2(x·LOG2E), so scale·LOG2E folds into one multiply.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
from jax import lax

from pallas_kernels.common.layout import cdiv

LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class MaskSpec:
  scale: float
  causal: bool
  window: int | None
  window_right: int | None
  softcap: float | None
  q_offset: int  # position of query row 0
  q_len: int  # real query rows (the rest is padding)
  kv_len: int  # real keys (the rest is padding)

  @classmethod
  def for_call(cls, *, q_len: int, kv_len: int, head_dim: int, causal: bool, window: int | None,
               window_right: int | None, scale: float | None, softcap: float | None) -> "MaskSpec":
    """The spec of one call: scale 1/sqrt(D) by default, queries aligned to the end of the keys."""
    return cls(scale=1.0 / math.sqrt(head_dim) if scale is None else float(scale), causal=causal, window=window,
               window_right=window_right, softcap=softcap, q_offset=kv_len - q_len, q_len=q_len, kv_len=kv_len)

  @property
  def exp2_scale(self) -> float:
    """scale·log2(e): base-2 logits from raw q·k in one multiply."""
    return self.scale * LOG2E

  @property
  def right(self) -> int | None:
    """Largest s - p that is visible, or None if unbounded."""
    limits = ([0] if self.causal else []) + ([self.window_right] if self.window_right is not None else [])
    return min(limits) if limits else None

  def visible(self, q_pos, k_pos):
    visible = k_pos < self.kv_len
    if self.window is not None:
      visible = visible & (q_pos - k_pos < self.window)
    if self.right is not None:
      visible = visible & (k_pos - q_pos <= self.right)
    return visible

  def kv_block_range(self, q_start, block_q: int, block_k: int):
    """[lo, hi) key blocks that queries q_start .. q_start + block_q - 1 can see."""
    p_min = self.q_offset + q_start
    hi_pos = jnp.int32(self.kv_len)
    if self.right is not None:
      hi_pos = jnp.clip(p_min + block_q + self.right, 0, self.kv_len)
    lo = jnp.int32(0)
    if self.window is not None:
      lo = lax.div(jnp.clip(p_min - self.window + 1, 0, self.kv_len), block_k)
    return lo, jnp.maximum(lo, cdiv(hi_pos, block_k))

  def q_block_range(self, k_start, block_k: int, block_q: int):
    """[lo, hi) query blocks that see some key in k_start .. k_start + block_k - 1."""
    lo = jnp.int32(0)
    if self.right is not None:
      lo = lax.div(jnp.clip(k_start - self.right - self.q_offset, 0, self.q_len), block_q)
    hi_row = jnp.int32(self.q_len)
    if self.window is not None:
      hi_row = jnp.clip(k_start + block_k - 1 + self.window - self.q_offset, 0, self.q_len)
    return lo, jnp.maximum(lo, cdiv(hi_row, block_q))
