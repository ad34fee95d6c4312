"""Sequence pieces: how the chunked BASED kernels split a long sequence to fill the GPU, and how each piece gets
its starting state.

A chunked kernel's program (CTA) walks its sequence in order, so with few programs (long sequences at small
batch·heads) most of the GPU idles. Cutting the sequence into n pieces, each run by its own program, multiplies
the programs by n: a states-only pass first gives every piece its own final state from zero, and piece i starts
from the call's initial state plus the states of pieces 0 .. i-1 (the state is a sum over tokens, so the prefix
sum is exact; segment resets are not modelled, so callers split only without segment ids).

Arrays split into pieces are [B·n, T/n, ...]: piece i of batch row b is row b·n + i.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def piece_count(*, programs: int, steps: int, max_programs: int, min_steps: int, whole_steps: bool = False) -> int:
  """The most pieces, a power of two, that keep programs·pieces <= max_programs and every piece at least
  `min_steps` of the `steps` the sequence takes (whole_steps: the pieces must also split the steps evenly)."""
  pieces = 1
  while (programs * pieces * 2 <= max_programs and steps // (pieces * 2) >= min_steps
         and (not whole_steps or steps % (pieces * 2) == 0)):
    pieces *= 2
  return pieces


def split(x_BT, pieces: int):
  """[B, T, ...] -> [B·pieces, T/pieces, ...] (T a multiple of pieces)."""
  batch, length = x_BT.shape[:2]
  return x_BT.reshape(batch * pieces, length // pieces, *x_BT.shape[2:])


def last_piece(x, pieces: int):
  """[B·pieces, ...] -> [B, ...]: the last piece's rows (a final state is the last piece's)."""
  return x.reshape(x.shape[0] // pieces, pieces, *x.shape[1:])[:, -1]


def piece_starts(initial: Any, pieces: int, own_states: Callable[[Any], Any]) -> Any:
  """Every piece's starting state [B·pieces, ...] (a pytree like `initial` [B, ...]): the initial state plus the
  states of the pieces before it, where own_states(zeros) runs every piece from the zero state [B·pieces, ...] and
  returns the final states it reaches."""
  zeros = jax.tree.map(lambda x: jnp.zeros((x.shape[0] * pieces, *x.shape[1:]), x.dtype), initial)
  own = own_states(zeros)

  def start(initial, own):
    own = own.reshape(initial.shape[0], pieces, *initial.shape[1:])
    before = jnp.cumsum(own, axis=1) - own
    return (initial[:, None] + before).reshape(initial.shape[0] * pieces, *initial.shape[1:])

  return jax.tree.map(start, initial, own)
