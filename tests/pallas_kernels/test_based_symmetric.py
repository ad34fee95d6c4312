"""The symmetric order-2 Taylor layout (pallas_kernels/based/symmetric.py): the map's inner products equal the full
map's, the converters keep every readout and round-trip, and a state in the old full layout is refused by name.

Letters: B batch, H heads, F feature dim, D value dim, U = F(F+1)/2 order-2 pairs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.based import BasedState, based_decode_step, based_linear_attention, reference, symmetric
from pallas_kernels.based.symmetric import BasedFullState, full_to_symmetric, symmetric_to_full
from tests.tolerances import assert_close, normal


@pytest.mark.parametrize("f", [4, 16])
def test_symmetric_map_has_the_full_maps_inner_products(rng, f):
  q, k = normal(rng, (3, 7, f)), normal(rng, (3, 7, f))
  phi_q, phi_k = symmetric.symmetric_taylor_features(q), symmetric.symmetric_taylor_features(k)
  assert phi_q.shape == (3, 7, 1 + f + f * (f + 1) // 2) and phi_q.dtype == jnp.float32
  dots = jnp.einsum("btx,btx->bt", phi_q, phi_k)
  full = jnp.einsum("btx,btx->bt", reference.taylor_features(q), reference.taylor_features(k))
  assert_close(dots, full, dtype=jnp.float32, reduction_len=f * f, name="phi_sym(q)·phi_sym(k) vs phi")
  # ... and each order alone (a wrong diagonal or √2 cannot hide behind the other orders).
  s = np.einsum("btf,btf->bt", np.asarray(q, np.float64), np.asarray(k, np.float64)) / np.sqrt(f)
  order2 = jnp.einsum("btu,btu->bt", symmetric.order2_features(q), symmetric.order2_features(k))
  assert_close(order2, s * s / 2.0, dtype=jnp.float32, reduction_len=f * f, name="order 2")


def _random_full_state(rng, b, h, f, d) -> BasedFullState:
  """Random pieces, the order-2 blocks not symmetric in (i, j)."""
  return BasedFullState(*(normal(rng, x.shape) for x in BasedFullState.zeros(b, h, f, d)))


def _full_readout(q_BHF, state: BasedFullState):
  """phi(q)·S and phi(q)·z with the full map."""
  f = q_BHF.shape[-1]
  phi = reference.taylor_features(q_BHF)  # [B, H, 1 + F + F²]
  s = jnp.concatenate([state.s0_BHD[:, :, None], state.s1_BHFD,
                       state.s2_BHFFD.reshape(*state.s2_BHFFD.shape[:2], f * f, -1)], axis=2)
  z = jnp.concatenate([state.z0_BH[:, :, None], state.z1_BHF, state.z2_BHFF.reshape(*state.z2_BHFF.shape[:2], -1)],
                      axis=2)
  return jnp.einsum("bhx,bhxd->bhd", phi, s), jnp.einsum("bhx,bhx->bh", phi, z)


def _symmetric_readout(q_BHF, state: BasedState):
  phi = symmetric.symmetric_taylor_features(q_BHF)  # [B, H, 1 + F + U]
  s = jnp.concatenate([state.s0_BHD[:, :, None], state.s1_BHFD, state.s2_BHUD], axis=2)
  z = jnp.concatenate([state.z0_BH[:, :, None], state.z1_BHF, state.z2_BHU], axis=2)
  return jnp.einsum("bhx,bhxd->bhd", phi, s), jnp.einsum("bhx,bhx->bh", phi, z)


def test_converters_keep_readouts_and_round_trip(rng):
  b, h, f, d = 2, 3, 6, 5
  full = _random_full_state(rng, b, h, f, d)
  q = normal(rng, (b, h, f))
  sym = full_to_symmetric(full)
  assert sym.s2_BHUD.shape == (b, h, 21, d) and sym.z2_BHU.shape == (b, h, 21)
  for name, got, want in zip(("num", "den"), _symmetric_readout(q, sym), _full_readout(q, full)):
    assert_close(got, want, dtype=jnp.float32, reduction_len=f * f, name=f"{name}: full -> symmetric")
  spread = symmetric_to_full(sym)
  for name, got, want in zip(("num", "den"), _full_readout(q, spread), _full_readout(q, full)):
    assert_close(got, want, dtype=jnp.float32, reduction_len=f * f, name=f"{name}: symmetric -> full")
  np.testing.assert_array_equal(spread.s2_BHFFD, jnp.swapaxes(spread.s2_BHFFD, 2, 3))
  for name, got, want in zip(BasedState._fields, full_to_symmetric(spread), sym):
    assert_close(got, want, dtype=jnp.float32, name=f"round trip {name}")


def test_reference_state_is_the_folded_full_sums(rng):
  """The reference's final state equals the full-layout sums Σ phi(k) vᵀ folded by full_to_symmetric."""
  b, t, h, f, d = 2, 9, 2, 4, 3
  q, k, v = normal(rng, (b, t, h, f)), normal(rng, (b, t, h, f)), normal(rng, (b, t, h, d))
  _, final = reference.based_chunked(q, k, v, chunk=4, return_final_state=True)
  phi_k = reference.taylor_features(k)  # [B, T, H, 1 + F + F²]
  s_BHXD, z_BHX = jnp.einsum("bthx,bthd->bhxd", phi_k, v), phi_k.sum(axis=1)
  full = BasedFullState(s_BHXD[:, :, 0], s_BHXD[:, :, 1:1 + f], s_BHXD[:, :, 1 + f:].reshape(b, h, f, f, d),
                        z_BHX[:, :, 0], z_BHX[:, :, 1:1 + f], z_BHX[:, :, 1 + f:].reshape(b, h, f, f))
  for name, got, want in zip(BasedState._fields, final, full_to_symmetric(full)):
    assert_close(got, want, dtype=jnp.float32, reduction_len=t, name=name)


def test_old_layout_states_are_refused_with_the_converter(rng):
  b, h, f, d = 2, 2, 4, 8
  q, k, v = normal(rng, (b, 3, h, f)), normal(rng, (b, 3, h, f)), normal(rng, (b, 3, h, d))
  full = BasedFullState.zeros(b, h, f, d)
  with pytest.raises(ValueError, match=r"state is a BasedFullState.*\(2, 2, 4, 4, 8\).*full_to_symmetric"):
    based_decode_step(q[:, 0], k[:, 0], v[:, 0], full)
  # Old arrays in a BasedState (an old cache or checkpoint loaded by position).
  with pytest.raises(ValueError, match=r"initial_state.s2_BHUD has shape \(2, 2, 4, 4, 8\).*full_to_symmetric"):
    based_linear_attention(q, k, v, initial_state=BasedState(*full))
  with pytest.raises(ValueError, match=r"initial_state is a BasedFullState"):
    based_linear_attention(q, k, v, initial_state=full)
  # Converted, it is taken (and the zero state gives the stateless output).
  y = based_linear_attention(q, k, v, initial_state=full_to_symmetric(full))
  assert_close(y, based_linear_attention(q, k, v), dtype=jnp.float32)


def test_state_is_153_rows_at_f16():
  state = jax.eval_shape(lambda: BasedState.zeros(1, 1, 16, 64))
  assert state.s0_BHD.shape[-1] == state.s2_BHUD.shape[-1] == 64  # one order-0 row of D
  assert 1 + state.s1_BHFD.shape[2] + state.s2_BHUD.shape[2] == 153  # 1 + F + F(F+1)/2 rows, 273 in full
