"""Public LoLCATs ops: validation, then `implementation=` dispatch.

`lolcats_attention` computes softmax attention over the last `window` keys plus linear attention over every
earlier key under one normaliser (reference.py has the math), from RoPE'd q [B, T, H, D], k and v [B, T, K, D]
and the feature-mapped queries and keys fq, fk [B, T, H, X] (features.py); `window_factor` and `linear_factor`
([H] or None for 1) weight the two terms. Implementations: "pallas" (the chunked kernel, chunk = window; by name
only until it has run on a GPU), "reference" (the quadratic jnp form) and "recurrent" (the token scan, by name).
The kernel takes no factors: only b/a matters (reference.py), so it is folded into fq here, where autodiff
carries its gradient.

`lolcats_decode_step` advances a LolcatsState by one token (reference form); `lolcats_prefill_state` builds the
state after a right-padded prompt; `evicted_key` is the key the next step moves into the linear state, which the
caller maps through its key feature map (the op does not own the feature map's weights).

Letters: B batch, T length, H heads, K kv heads, D head dim, X feature width, S ring slots (= window).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels.common import validation
from pallas_kernels.common.dispatch import Dispatcher, Implementation, first_reason, require
from pallas_kernels.lolcats import pallas, reference
from pallas_kernels.lolcats.reference import LolcatsState, evicted_key

__all__ = ["DISPATCHER", "DECODE_DISPATCHER", "LolcatsState", "evicted_key", "lolcats_attention",
           "lolcats_decode_step", "lolcats_prefill_state"]

# Triton tiles are powers of two >= 16 and a program holds [C, C] score blocks and an [X, D] float32 state.
KERNEL_WINDOWS = (16, 32, 64, 128)
KERNEL_MAX_DIM = 256


def _pallas_supports(*, window: int, head_dim: int, feature_width: int, **_) -> str | None:
  return first_reason(
      require(window in KERNEL_WINDOWS, f"{window=} not in {KERNEL_WINDOWS} (the kernel's chunk is the window)"),
      require(head_dim <= KERNEL_MAX_DIM, f"{head_dim=} > {KERNEL_MAX_DIM}"),
      require(feature_width <= KERNEL_MAX_DIM, f"{feature_width=} > {KERNEL_MAX_DIM}"))


def _folded_kernel(q, k, v, fq, fk, *, window: int, window_factor=None, linear_factor=None, block_sizes=None):
  """The kernel with b/a folded into fq (y = (a·W + b·L) / (a·W' + b·L') = (W + (b/a)·L) / (W' + (b/a)·L'))."""
  if window_factor is not None or linear_factor is not None:
    heads = q.shape[2]
    a, b = reference.term_factors(window_factor, linear_factor, heads, jnp.float32)
    fq = (fq.astype(jnp.float32) * (b / a)[:, None]).astype(fq.dtype)
  return pallas.lolcats_chunked(q, k, v, fq, fk, window=window, block_sizes=block_sizes)


DISPATCHER = Dispatcher("lolcats", (
    # By name only until the GPU tests have run it (in_auto=False); then auto_backends=("gpu", "tpu").
    Implementation("pallas", _folded_kernel, supports=_pallas_supports, in_auto=False, per_shard=True,
                   block_sizes=pallas.BlockSizes),
    Implementation("reference", reference.lolcats_quadratic),
    Implementation("recurrent", reference.lolcats_recurrent, in_auto=False),
))
DECODE_DISPATCHER = Dispatcher("lolcats_decode_step", (
    Implementation("reference", reference.lolcats_step),
))

STATE_LAYOUT = LolcatsState("BHXD", "BHX", "BSKD", "BSKD", "B")


def _check_window(window: Any) -> None:
  if not isinstance(window, int) or isinstance(window, bool) or window < 1:
    raise ValueError(f"window={window!r} must be an integer >= 1 (keys in the softmax window, itself included)")


def _check_inputs(q, k, v, fq, fk, axes: tuple[str, ...]) -> None:
  """q [*axes, H, D], k and v [*axes, K, D], fq and fk [*axes, H, X], one float dtype."""
  lead = ", ".join(axes)
  n = len(axes)
  validation.check_rank("q", q, n + 2, f"{lead}, heads, head_dim")
  validation.check_rank("k", k, n + 2, f"{lead}, kv_heads, head_dim")
  validation.check_shape("v", v, k.shape, f"{lead}, kv_heads, head_dim, as k")
  for i, axis in enumerate(axes):
    validation.check_dim("k", k, i, q.shape[i], f"{axis}, as q")
  validation.check_dim("k", k, n + 1, q.shape[n + 1], "head_dim, as q")
  validation.check_heads_divide(q.shape[n], k.shape[n])
  validation.check_rank("fq", fq, n + 2, f"{lead}, heads, feature_width")
  validation.check_shape("fk", fk, fq.shape, f"{lead}, heads, feature_width, as fq")
  validation.check_shape("fq", fq, (*q.shape[:n + 1], fq.shape[-1]), f"{lead}, heads as q, feature_width")
  for name, x in (("q", q), ("k", k), ("v", v), ("fq", fq), ("fk", fk)):
    validation.check_dtype(name, x)
  validation.check_same_dtype(q=q, k=k, v=v, fq=fq, fk=fk)


def _check_factor(name: str, factor, heads: int) -> None:
  if factor is not None:
    validation.check_shape(name, jnp.asarray(factor), (heads,), "heads")


def lolcats_attention(q: jax.Array, k: jax.Array, v: jax.Array, fq: jax.Array, fk: jax.Array, *, window: int = 64,
                      window_factor: jax.Array | None = None, linear_factor: jax.Array | None = None,
                      implementation: str = "auto", block_sizes: pallas.BlockSizes | None = None) -> jax.Array:
  """y [B, T, H, D]: softmax over each query's last `window` keys plus fq·fk linear attention over the earlier
  ones, one normaliser, the terms weighted per head by window_factor and linear_factor (None: 1)."""
  _check_inputs(q, k, v, fq, fk, ("batch", "length"))
  _check_window(window)
  batch, length, heads, head_dim = q.shape
  _check_factor("window_factor", window_factor, heads)
  _check_factor("linear_factor", linear_factor, heads)
  options = dict(batch=batch, length=length, heads=heads, kv_heads=k.shape[2], head_dim=head_dim,
                 feature_width=fq.shape[-1], window=window, dtype=jnp.dtype(q.dtype))
  return DISPATCHER.run(
      implementation, options, positional=("q", "k", "v", "fq", "fk"),
      arrays=dict(q=q, k=k, v=v, fq=fq, fk=fk, window_factor=window_factor, linear_factor=linear_factor),
      layouts=dict(q="BTHD", k="BTKD", v="BTKD", fq="BTHX", fk="BTHX", window_factor="H", linear_factor="H"),
      out_layouts="BTHD", static=dict(window=window), block_sizes=block_sizes)


def _check_state(state: Any, batch: int, heads: int, kv_heads: int, head_dim: int, width: int) -> None:
  if not isinstance(state, LolcatsState):
    raise ValueError(f"state must be a LolcatsState, got {type(state).__name__}")
  window = state.k_ring_BSKD.shape[1] if state.k_ring_BSKD.ndim == 4 else None
  expected = jax.eval_shape(lambda: LolcatsState.zeros(batch, heads, kv_heads, head_dim, width, window or 1))
  for field, x, want in zip(LolcatsState._fields, state, expected):
    validation.check_shape(f"state.{field}", x, want.shape, f"batch={batch}, heads={heads}, kv_heads={kv_heads}, "
                           f"head_dim={head_dim}, feature_width={width}, window={window}")
  validation.check_dtype("state.kv_BHXD", state.kv_BHXD, (jnp.float32,))
  validation.check_dtype("state.k_sum_BHX", state.k_sum_BHX, (jnp.float32,))
  validation.check_dtype("state.lengths_B", state.lengths_B, (jnp.int32,))


def lolcats_decode_step(q: jax.Array, k: jax.Array, v: jax.Array, fq: jax.Array, fk_evicted: jax.Array,
                        state: LolcatsState, *, window_factor: jax.Array | None = None,
                        linear_factor: jax.Array | None = None,
                        implementation: str = "auto") -> tuple[jax.Array, LolcatsState]:
  """One token per row, q [B, H, D], k and v [B, K, D], fq [B, H, X]; fk_evicted [B, H, X] are the key features of
  evicted_key(state). Returns (y [B, H, D], the state with this token in its ring)."""
  _check_inputs(q, k, v, fq, fk_evicted, ("batch",))
  batch, heads, head_dim = q.shape
  _check_state(state, batch, heads, k.shape[1], head_dim, fq.shape[-1])
  _check_factor("window_factor", window_factor, heads)
  _check_factor("linear_factor", linear_factor, heads)
  options = dict(batch=batch, heads=heads, kv_heads=k.shape[1], head_dim=head_dim, feature_width=fq.shape[-1],
                 dtype=jnp.dtype(q.dtype))
  return DECODE_DISPATCHER.run(
      implementation, options, positional=("q", "k", "v", "fq", "fk_evicted", "state"),
      arrays=dict(q=q, k=k, v=v, fq=fq, fk_evicted=fk_evicted, state=state, window_factor=window_factor,
                  linear_factor=linear_factor),
      layouts=dict(q="BHD", k="BKD", v="BKD", fq="BHX", fk_evicted="BHX", state=STATE_LAYOUT, window_factor="H",
                   linear_factor="H"),
      out_layouts=("BHD", STATE_LAYOUT), static={})


def lolcats_prefill_state(k: jax.Array, v: jax.Array, fk: jax.Array, lengths: jax.Array, *, window: int = 64,
                          ring_dtype=None) -> LolcatsState:
  """The decode state after the first lengths[b] tokens of each right-padded row of k, v [B, T, K, D] and key
  features fk [B, T, H, X]."""
  _check_window(window)
  validation.check_rank("k", k, 4, "batch, length, kv_heads, head_dim")
  validation.check_shape("v", v, k.shape, "as k")
  validation.check_rank("fk", fk, 4, "batch, length, heads, feature_width")
  validation.check_dim("fk", fk, 1, k.shape[1], "length, as k")
  validation.check_lengths("lengths", lengths, k.shape[0], k.shape[1])
  return reference.lolcats_prefill_state(k, v, fk, lengths, window=window,
                                         ring_dtype=None if ring_dtype is None else jnp.dtype(ring_dtype))
