"""Public Based (Taylor linear attention) ops: validation, then `implementation=` dispatch.

`based_linear_attention` computes y_t = phi(q_t)·S_t / (phi(q_t)·z_t + eps) over a whole sequence (see
reference.py for the math); `based_decode_step` advances a BasedState by one token. Implementations of the
sequence op, in auto's order: "hopper_parallel" and "pallas_parallel" (the quadratic form tiled like
FlashAttention: Mosaic GPU on sm90, portable Pallas elsewhere; short stateless calls on GPU), "hopper" (the
chunked form's Mosaic GPU forward with the portable backward: 16-bit, F 16, D 64/128 on sm90), "pallas" (the
portable chunked kernels), "reference" (the chunked jnp form), and "quadratic" / "recurrent" (the other jnp
forms, by name only, so tests reach every form through the api). Every implementation takes the arguments in
the signature below; `block_sizes=` tunes the kernel that runs (hopper_parallel.BlockSizes, parallel.BlockSizes,
hopper_chunked.BlockSizes, pallas.BlockSizes; decode.BlockSizes for the step).

States in and out are BasedState, the symmetric order-2 layout (symmetric.py: U = F(F+1)/2 order-2 rows, not F²);
the decode step and the reference forms compute on it, the chunked kernels convert it at their boundary. A state
in the old full layout (BasedFullState, or F² order-2 rows) is refused with the converter to use.

Letters: B batch, T length, H heads, F feature dim, D value head dim, U = F(F+1)/2 order-2 pairs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels.based import decode, hopper_chunked, hopper_parallel, pallas, parallel, reference
from pallas_kernels.based.symmetric import BasedFullState, BasedState, on_full_layout
from pallas_kernels.common import validation
from pallas_kernels.common.dispatch import Dispatcher, Implementation, first_reason, require

# The Taylor map widens F to X = 1 + F + F(F+1)/2 and the state holds a U·D block per head, so cost and memory grow
# quadratically in F; Based uses F = 16, and beyond 64 the state would dwarf the values it summarises.
MAX_FEATURE_DIM = 64


def _without_chunk(fn: Callable[..., Any]) -> Callable[..., Any]:
  """A form that does not tile the sequence, callable with the chunked form's keywords."""

  def call(q, k, v, *, chunk: int, **kwargs):
    del chunk
    return fn(q, k, v, **kwargs)

  return call


def _pallas_supports(*, chunk: int, feature_dim: int, value_dim: int, **_) -> str | None:
  # What the kernel tests cover (CPU interpret and the H100): Triton tiles are powers of two >= 16, and the
  # on-chip order-2 state (F² x Dc floats) must fit a program (F = 32 on Triton takes 16 value columns, slowly).
  return first_reason(
      require(chunk in (16, 32, 64, 128), f"{chunk=} not in (16, 32, 64, 128)"),
      require(feature_dim <= 32, f"{feature_dim=} > 32"),
      require(value_dim <= 256, f"{value_dim=} > 256"))


def _pallas_supports_decode(*, feature_dim: int, value_dim: int, **_) -> str | None:
  return first_reason(require(feature_dim <= 32, f"{feature_dim=} > 32"),
                      require(value_dim <= 256, f"{value_dim=} > 256"))


# Layouts of the state's pieces for running kernels per shard (pallas_kernels/common/sharding.py).
STATE_LAYOUT = BasedState("BHD", "BHFD", "BHUD", "BH", "BHF", "BHU")


# The parallel kernel's work grows as T², the chunked kernel's as T. Measured on the H100 (B·T = 16k tokens, H16
# F16 D64 bf16, forward / forward+backward): T2048 parallel 0.27 / 1.02 ms vs chunked 0.47 / 1.71; T4096 0.41 /
# 1.68 vs 0.62 / 2.92; T8192 0.78 / 3.17 vs 0.62 / 2.93. Auto takes it up to AUTO_PARALLEL_MAX_LENGTH; by name it
# runs up to PARALLEL_MAX_LENGTH.
AUTO_PARALLEL_MAX_LENGTH = 4096
PARALLEL_MAX_LENGTH = 8192


def _parallel_supports(*, length: int, feature_dim: int, value_dim: int, has_initial_state: bool,
                       return_final_state: bool, **_) -> str | None:
  return first_reason(
      require(not has_initial_state and not return_final_state, "no state in or out (the chunked kernel has it)"),
      require(length <= PARALLEL_MAX_LENGTH, f"{length=} > {PARALLEL_MAX_LENGTH}: the chunked form is cheaper"),
      require(feature_dim <= 32, f"{feature_dim=} > 32"),
      require(value_dim <= 256, f"{value_dim=} > 256"))


def _parallel_preferred(*, length: int, **_) -> str | None:
  return require(length <= AUTO_PARALLEL_MAX_LENGTH, f"{length=} > {AUTO_PARALLEL_MAX_LENGTH}: chunked is faster")


def _hopper_parallel_supports(**options) -> str | None:
  return first_reason(hopper_parallel.supports(**options), _parallel_supports(**options))


DISPATCHER = Dispatcher("based", (
    # The same quadratic form in Mosaic GPU (sm90, 16-bit inputs); auto's first choice where both apply.
    Implementation("hopper_parallel", hopper_parallel.based_parallel_hopper, supports=_hopper_parallel_supports,
                   backends=("gpu",), auto_prefers=_parallel_preferred, per_shard=True,
                   block_sizes=hopper_parallel.BlockSizes),
    # Auto takes it on GPU (where it was timed) for short stateless calls.
    Implementation("pallas_parallel", parallel.based_parallel, supports=_parallel_supports, auto_backends=("gpu",),
                   auto_prefers=_parallel_preferred, per_shard=True, block_sizes=parallel.BlockSizes),
    # The chunked form in Mosaic GPU (forward; the portable backward); auto takes it where its CTAs fill a wave
    # (hopper_chunked.preferred has the H100 timings against the portable kernel).
    # It carries the full order-2 layout: the symmetric state is converted at its boundary (computing on it natively
    # is the remaining step).
    Implementation("hopper", on_full_layout(hopper_chunked.based_chunked_hopper), supports=hopper_chunked.supports,
                   backends=("gpu",), auto_prefers=hopper_chunked.preferred, per_shard=True,
                   block_sizes=hopper_chunked.BlockSizes),
    # Interpret mode is far slower than XLA on CPU, so auto takes the kernel only on GPU and TPU.
    Implementation("pallas", pallas.based_chunked, supports=_pallas_supports, auto_backends=("gpu", "tpu"),
                   per_shard=True, block_sizes=pallas.BlockSizes),
    Implementation("reference", reference.based_chunked),
    Implementation("quadratic", _without_chunk(reference.based_quadratic), in_auto=False),
    Implementation("recurrent", _without_chunk(reference.based_recurrent), in_auto=False),
))
DECODE_DISPATCHER = Dispatcher("based_decode_step", (
    Implementation("pallas", decode.based_decode_step, supports=_pallas_supports_decode,
                   auto_backends=("gpu", "tpu"), per_shard=True, block_sizes=decode.BlockSizes),
    Implementation("reference", reference.based_step),
))


def _check_feature_dim(feature_dim: int | None, q: jax.Array) -> int:
  """feature_dim, defaulting to q's last axis; it must equal that axis and stay within MAX_FEATURE_DIM."""
  width = q.shape[-1]
  feature_dim = width if feature_dim is None else feature_dim
  if feature_dim != width:
    raise ValueError(f"feature_dim={feature_dim!r} must equal q.shape[-1] ({width}); q has shape {q.shape}")
  if feature_dim > MAX_FEATURE_DIM:
    raise ValueError(f"{feature_dim=} exceeds {MAX_FEATURE_DIM=}: the Taylor state has 1 + F + F(F+1)/2 = "
                     f"{1 + feature_dim + feature_dim * (feature_dim + 1) // 2} rows of D per head")
  return feature_dim


def _check_eps(eps: float) -> None:
  if not eps >= 0:  # also rejects NaN
    raise ValueError(f"eps must be >= 0, got {eps!r}")


def _check_qkv(q: jax.Array, k: jax.Array, v: jax.Array, axes: tuple[str, ...]) -> None:
  """q, k [*axes, feature_dim] and v [*axes, value_dim], one float dtype."""
  lead = ", ".join(axes)
  validation.check_rank("q", q, len(axes) + 1, f"{lead}, feature_dim")
  validation.check_shape("k", k, q.shape, f"{lead}, feature_dim, as q")
  validation.check_rank("v", v, len(axes) + 1, f"{lead}, value_dim")
  for i, axis in enumerate(axes):
    validation.check_dim("v", v, i, q.shape[i], f"{axis}, as q")
  for name, x in (("q", q), ("k", k), ("v", v)):
    validation.check_dtype(name, x)
  validation.check_same_dtype(q=q, k=k, v=v)


def _check_state(name: str, state: Any, batch: int, heads: int, feature_dim: int, value_dim: int) -> None:
  """A BasedState of float32 arrays with the shapes BasedState.zeros(batch, heads, feature_dim, value_dim) has;
  a state in the full order-2 layout gets its own message, naming the converter."""
  convert = "pallas_kernels.based.symmetric.full_to_symmetric"
  if isinstance(state, BasedFullState):
    raise ValueError(f"{name} is a BasedFullState (the full order-2 layout, s2_BHFFD of shape "
                     f"{tuple(state.s2_BHFFD.shape)}); states are BasedState in the symmetric layout now: convert "
                     f"it with {convert}({name})")
  if isinstance(state, BasedState) and jnp.ndim(state.s2_BHUD) == 5:
    raise ValueError(f"{name}.s2_BHUD has shape {tuple(state.s2_BHUD.shape)}, the full order-2 layout [B, H, F, F, "
                     f"D]; BasedState holds U = F(F+1)/2 symmetric rows: convert it with "
                     f"{convert}(BasedFullState(*{name}))")
  if not isinstance(state, BasedState):
    raise ValueError(f"{name} must be a BasedState, got {type(state).__name__}")
  expected = jax.eval_shape(lambda: BasedState.zeros(batch, heads, feature_dim, value_dim))
  for field, x, want in zip(BasedState._fields, state, expected):
    validation.check_shape(f"{name}.{field}", x, want.shape, f"batch={batch}, heads={heads}, "
                           f"feature_dim={feature_dim}, value_dim={value_dim}")
    validation.check_dtype(f"{name}.{field}", x, (jnp.float32,))


def based_linear_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, feature_dim: int | None = None,
                           normalize: bool = True, eps: float = 1e-6, chunk: int = 64,
                           initial_state: BasedState | None = None, return_final_state: bool = False,
                           segment_ids: jax.Array | None = None, implementation: str = "auto",
                           block_sizes: hopper_parallel.BlockSizes | parallel.BlockSizes | hopper_chunked.BlockSizes
                           | pallas.BlockSizes | None = None):
  """Causal Based attention of q, k [B, T, H, F] and v [B, T, H, D]: y [B, T, H, D], plus the final
  BasedState when return_final_state; block_sizes must be the running implementation's (name it), None its
  defaults for the shape."""
  _check_qkv(q, k, v, ("batch", "length", "heads"))
  batch, length, heads, _ = q.shape
  feature_dim = _check_feature_dim(feature_dim, q)
  validation.check_in("normalize", normalize, (True, False))
  validation.check_in("return_final_state", return_final_state, (True, False))
  _check_eps(eps)
  if not isinstance(chunk, int):
    raise ValueError(f"chunk must be an int, got {chunk!r}")
  validation.check_positive("chunk", chunk)
  if initial_state is not None:
    _check_state("initial_state", initial_state, batch, heads, feature_dim, v.shape[-1])
  if segment_ids is not None:
    validation.check_segment_ids("segment_ids", segment_ids, batch, length)

  options = dict(batch=batch, length=length, heads=heads, feature_dim=feature_dim, value_dim=v.shape[-1],
                 dtype=jnp.dtype(q.dtype), normalize=normalize, chunk=chunk,
                 has_initial_state=initial_state is not None, has_segment_ids=segment_ids is not None,
                 return_final_state=return_final_state)
  return DISPATCHER.run(
      implementation, options, positional=("q", "k", "v"),
      arrays=dict(q=q, k=k, v=v, initial_state=initial_state, segment_ids=segment_ids),
      layouts=dict(q="BTHF", k="BTHF", v="BTHD", initial_state=STATE_LAYOUT, segment_ids="BT"),
      out_layouts=("BTHD", STATE_LAYOUT) if return_final_state else "BTHD",
      static=dict(chunk=chunk, normalize=normalize, eps=eps, return_final_state=return_final_state),
      block_sizes=block_sizes)


def based_decode_step(q: jax.Array, k: jax.Array, v: jax.Array, state: BasedState, *, normalize: bool = True,
                      eps: float = 1e-6, implementation: str = "auto",
                      block_sizes: decode.BlockSizes | None = None) -> tuple[jax.Array, BasedState]:
  """One decode token, q, k [B, H, F] and v [B, H, D]: (y [B, H, D], the state with this token added)."""
  _check_qkv(q, k, v, ("batch", "heads"))
  batch, heads, _ = q.shape
  feature_dim = _check_feature_dim(None, q)
  validation.check_in("normalize", normalize, (True, False))
  _check_eps(eps)
  _check_state("state", state, batch, heads, feature_dim, v.shape[-1])

  options = dict(batch=batch, heads=heads, feature_dim=feature_dim, value_dim=v.shape[-1],
                 dtype=jnp.dtype(q.dtype), normalize=normalize)
  return DECODE_DISPATCHER.run(
      implementation, options, positional=("q", "k", "v", "state"), arrays=dict(q=q, k=k, v=v, state=state),
      layouts=dict(q="BHF", k="BHF", v="BHD", state=STATE_LAYOUT), out_layouts=("BHD", STATE_LAYOUT),
      static=dict(normalize=normalize, eps=eps), block_sizes=block_sizes)
