"""How kernels cut [batch, sequence, heads, dim] arrays into 2-D tiles, portably.

On GPU (Triton) and in interpret mode a tile of one head is cut straight out of [B, T, H, D] (no transpose); on
TPU the wrapper transposes to [B, H, T, D] so the last two block dims are the (rows, dim) tile Mosaic wants.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl


def round_up(x: int, multiple: int) -> int:
  """x padded up to whole blocks of `multiple` (sequence lengths to whole kernel blocks)."""
  return -(-x // multiple) * multiple


def cdiv(x, block: int):
  """The blocks of `block` that cover a traced non-negative int x (lax.div truncates, so x must be >= 0)."""
  return lax.div(x + (block - 1), block)


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where batch, sequence and heads sit in the arrays the kernels read."""
  heads_major: bool  # True: [B, H, T, D] (TPU); False: [B, T, H, D]

  def arrange(self, x_BTHD: jax.Array) -> jax.Array:
    return jnp.swapaxes(x_BTHD, 1, 2) if self.heads_major else x_BTHD

  def restore(self, x: jax.Array) -> jax.Array:
    return jnp.swapaxes(x, 1, 2) if self.heads_major else x

  def tile(self, rows: int, dim: int, heads: int | None, index_map) -> pl.BlockSpec:
    """BlockSpec of `rows` rows of one head (heads=None, a [rows, dim] ref) or of `heads` consecutive heads
    ([heads, rows, dim] heads-major, [rows, heads, dim] otherwise). index_map returns (batch, head block, row
    block) or (batch, head block, row block, dim block)."""
    def index(*g):
      b, h, r, *c = index_map(*g)
      return (b, h, r, *(c or [0])) if self.heads_major else (b, r, h, *(c or [0]))
    return pl.BlockSpec((None, heads, rows, dim) if self.heads_major else (None, rows, heads, dim), index)

  def seq_len(self, x: jax.Array) -> int:
    return x.shape[2 if self.heads_major else 1]

  def head_rows(self, ref, g, rows):
    """Rows of head g from a several-heads tile."""
    return ref[g, rows, :] if self.heads_major else ref[rows, g, :]
