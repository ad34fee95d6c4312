"""The BASED decode-step kernel (pallas_kernels/based/decode.py) against reference.based_step, step by step from
an empty state (output and every state piece after each step), and against an independent numpy float64
quadratic form over the tokens seen so far; normalised and not, F in {8, 16}, D in {16, 48, 64}, several
value-column blocks and row chunks, sizes that need padding and a D cut into blocks without it; the state is donated in place; and the kernel lowers for GPU
(Triton) and exports for TPU (Mosaic) with the state aliased input to output.

Runs in interpret mode on CPU and through Triton on a GPU. Letters: B batch, T steps, H heads, F feature dim,
D value dim.
"""

import unittest.mock
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.based import reference as ref
from pallas_kernels.based.decode import BlockSizes, based_decode_step, row_pieces
from pallas_kernels.based.reference import BasedState
from tests.tolerances import assert_close, normal

_OPTIONS = ("normalize", "eps", "block_sizes")
step = jax.jit(based_decode_step, static_argnames=_OPTIONS)  # compiles each interpret-mode kernel once
_jitted_reference_step = jax.jit(ref.based_step, static_argnames=("normalize", "eps"))


def reference_step(*args, **kwargs):
  """reference.based_step with exact float32 products (XLA on GPU may otherwise use TF32)."""
  with jax.default_matmul_precision("highest"):
    return _jitted_reference_step(*args, **kwargs)

# (F, D, normalize, dtype, block sizes); interpret-mode compilations cost seconds, so options are spread, not
# crossed. "blocks": 4 value-column blocks and S2's U = 136 rows as 8 chunks of 16 and a tail of 8; "padded": F
# and D padded to 8 and 32, U = 21 rows as 16 + 4 + 1.
CASES = {
    "f8_d16_normalized_f32": (8, 16, True, jnp.float32, None),
    "f8_d64_unnormalized_bf16": (8, 64, False, jnp.bfloat16, None),
    "f16_d16_unnormalized_f32": (16, 16, False, jnp.float32, None),
    "f16_d64_normalized_bf16": (16, 64, True, jnp.bfloat16, None),
    "f16_d64_normalized_f32_blocks": (16, 64, True, jnp.float32, BlockSizes(block_d=16, block_rows=16)),
    "f6_d20_normalized_f32_padded": (6, 20, True, jnp.float32, BlockSizes(block_d=16, block_rows=16)),
    # D a multiple of 16 but not a power of two: the default blocks cut it into three 16-wide columns, unpadded.
    "f16_d48_normalized_f32_unpadded": (16, 48, True, jnp.float32, None),
}
STEPS = 4


def numpy_based_outputs(q, k, v, *, normalize, eps=1e-6):
  """y_BTHD in float64 from the definition: y_t = Σ_{s≤t} (1 + a + a²/2) v_s [/ Σ_{s≤t} (1 + a + a²/2) + eps],
  a = q_t·k_s / √F, for tokens [B, T, H, ·] (no state, no feature map)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  B, T, H, F = q.shape
  y = np.zeros(v.shape)
  for b in range(B):
    for h in range(H):
      for t in range(T):
        a = k[b, :t + 1, h] @ q[b, t, h] / np.sqrt(F)
        w = 1.0 + a + 0.5 * a * a
        y[b, t, h] = w @ v[b, :t + 1, h] / ((w.sum() + eps) if normalize else 1.0)
  return y


@pytest.mark.parametrize("case", list(CASES))
def test_steps_match_reference_and_numpy(rng, case):
  F, D, normalize, dtype, blocks = CASES[case]
  B, H = 2, 2
  q, k = normal(rng, (B, STEPS, H, F), dtype), normal(rng, (B, STEPS, H, F), dtype)
  v = normal(rng, (B, STEPS, H, D), dtype)
  state = expected_state = BasedState.zeros(B, H, F, D)
  ys = []
  for t in range(STEPS):
    y, state = step(q[:, t], k[:, t], v[:, t], state, normalize=normalize, block_sizes=blocks)
    expected_y, expected_state = reference_step(q[:, t], k[:, t], v[:, t], expected_state, normalize=normalize)
    assert y.dtype == v.dtype and y.shape == (B, H, D)
    assert_close(y, expected_y, dtype=dtype, reduction_len=F * F, name=f"y at step {t}")
    for name, got, want in zip(BasedState._fields, state, expected_state):
      assert got.dtype == jnp.float32
      assert_close(got, want, dtype=jnp.float32, reduction_len=t + 1, name=f"{name} after step {t}")
    ys.append(y)
  assert_close(jnp.stack(ys, axis=1), numpy_based_outputs(q, k, v, normalize=normalize), dtype=dtype,
               reduction_len=F * F * STEPS, name="y vs numpy float64")


def test_donated_state_is_updated_in_place(rng):
  B, H, F, D = 2, 2, 8, 16
  state = BasedState(*(normal(rng, x.shape) for x in BasedState.zeros(B, H, F, D)))
  q, k, v = normal(rng, (B, H, F)), normal(rng, (B, H, F)), normal(rng, (B, H, D))
  expected_y, expected_state = reference_step(q, k, v, state)
  donating = jax.jit(based_decode_step, donate_argnums=3)
  with warnings.catch_warnings():
    warnings.filterwarnings("error", message=".*donated buffers were not usable")
    y, new_state = donating(q, k, v, state)
  assert state.s2_BHUD.is_deleted()  # the old state's buffers now hold the new one
  assert_close(y, expected_y, dtype=jnp.float32, reduction_len=F * F)
  assert_close(new_state.s2_BHUD, expected_state.s2_BHUD, dtype=jnp.float32)


def test_row_pieces_cover_the_rows_in_power_of_two_tiles():
  assert row_pieces(136, 64) == (2, ((128, 8),))
  assert row_pieces(21, 16) == (1, ((16, 4), (20, 1)))
  assert row_pieces(128, 64) == (2, ())


def _call(D: int = 128):
  B, H, F = 2, 4, 16
  q = jnp.zeros((B, H, F), jnp.bfloat16)
  v = jnp.zeros((B, H, D), jnp.bfloat16)
  return lambda q, k, v, s: based_decode_step(q, k, v, s), (q, q, v, BasedState.zeros(B, H, F, D))


def _aliased_outputs(text: str) -> int:
  """How many outputs of the (only) custom call alias an input (S0, S1 and S2 should)."""
  return text.count("#stablehlo.output_operand_alias<")


def test_lowers_for_gpu_triton():
  fn, args = _call()
  with unittest.mock.patch.object(jax, "default_backend", return_value="gpu"):
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert "based_decode_step" in text
  assert _aliased_outputs(text) == 3


def test_a_value_dim_of_16_wide_blocks_is_not_padded_on_gpu():
  """D = 112 (the 1.3B preset's BASED heads) lowers for Triton in 16-wide column blocks with no pad or slice of the
  state around the kernel: padding to 128 would copy the whole state in and out every decode step."""
  fn, args = _call(D=112)
  with unittest.mock.patch.object(jax, "default_backend", return_value="gpu"):
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert _aliased_outputs(text) == 3
  assert "stablehlo.pad" not in text and "stablehlo.slice" not in text


def test_exports_for_tpu():
  fn, args = _call()
  with unittest.mock.patch.object(jax, "default_backend", return_value="tpu"):
    text = jax.export.export(jax.jit(fn), platforms=("tpu",))(*args).mlir_module()
  assert "tpu_custom_call" in text
  assert _aliased_outputs(text) == 3
