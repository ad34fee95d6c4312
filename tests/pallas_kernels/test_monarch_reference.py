"""Monarch oracles and public api against an independent numpy float64 construction: the dense matrix
blockdiag(w2) · Perm · blockdiag(w1) with the permutation written out as a 0/1 matrix."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from pallas_kernels.monarch import api, reference
from tests.tolerances import assert_close, float64, normal, relative_error

IMPLEMENTATIONS = ["xla", "reference"]
FORMS = {"einsum": reference.monarch_multiply, "dense": reference.monarch_dense_multiply}

# (w1 shape [K, Q, P], w2 shape [L, S, R]) with L·R = K·Q.
FACTOR_SHAPES = {
    "square_n16_b4": ((4, 4, 4), (4, 4, 4)),
    "wide_n16_m32_b4": ((4, 4, 4), (4, 8, 4)),
    "narrow_n24_m12_b2": ((2, 6, 12), (2, 6, 6)),  # fly's MonarchLinear shapes: rank 3 per sub-block
    "rank2_n12_m8_b2": ((2, 4, 6), (2, 4, 4)),
    "unequal_blocks": ((2, 6, 4), (3, 5, 4)),      # L != K: 12 intermediates read as 3 blocks of 4
    "few_channels": ((4, 2, 3), (8, 2, 1)),        # Q < L: some sub-blocks are zero
}


def blockdiag_np(w_BOI: np.ndarray) -> np.ndarray:
  blocks, rows, cols = w_BOI.shape
  out = np.zeros((blocks * rows, blocks * cols))
  for b in range(blocks):
    out[b * rows:(b + 1) * rows, b * cols:(b + 1) * cols] = w_BOI[b]
  return out


def permutation_np(size: int, out_blocks: int) -> np.ndarray:
  """Row l·R + r (slot r of second-stage block l) picks intermediate r·L + l."""
  per_block = size // out_blocks
  perm = np.zeros((size, size))
  for l in range(out_blocks):
    for r in range(per_block):
      perm[l * per_block + r, r * out_blocks + l] = 1.0
  return perm


def dense_np(w1, w2) -> np.ndarray:
  w1, w2 = np.asarray(w1, np.float64), np.asarray(w2, np.float64)
  return blockdiag_np(w2) @ permutation_np(w1.shape[0] * w1.shape[1], w2.shape[0]) @ blockdiag_np(w1)


def random_factors(rng, w1_shape, w2_shape, dtype=jnp.float32):
  return normal(rng, w1_shape, dtype), normal(rng, w2_shape, dtype)


def class_shapes(n, m, nblocks, rank):
  """Factor shapes of the Monarch class dense_to_monarch projects onto."""
  return (nblocks, rank * nblocks, n // nblocks), (nblocks, m // nblocks, rank * nblocks)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("shapes", FACTOR_SHAPES)
def test_forms_match_numpy(rng, shapes, form):
  w1, w2 = random_factors(rng, *FACTOR_SHAPES[shapes])
  n = w1.shape[0] * w1.shape[2]
  x = normal(rng, (2, 3, n))
  expected = np.asarray(x, np.float64) @ dense_np(w1, w2).T
  y = jax.jit(FORMS[form])(x, w1, w2)
  assert y.dtype == x.dtype
  assert_close(y, expected, dtype=jnp.float32, reduction_len=w1.shape[2] * w2.shape[2])


@pytest.mark.parametrize("shapes", FACTOR_SHAPES)
def test_to_dense_matches_numpy(rng, shapes):
  w1, w2 = random_factors(rng, *FACTOR_SHAPES[shapes])
  assert_close(api.monarch_to_dense(w1, w2), dense_np(w1, w2), dtype=jnp.float32, reduction_len=w2.shape[2])


def test_one_block_is_a_product_of_dense_matrices(rng):
  w1, w2 = random_factors(rng, (1, 5, 7), (1, 6, 5))
  x = normal(rng, (4, 7))
  expected = np.asarray(x, np.float64) @ (np.asarray(w2[0], np.float64) @ np.asarray(w1[0], np.float64)).T
  assert_close(reference.monarch_multiply(x, w1, w2), expected, dtype=jnp.float32, reduction_len=35)


@pytest.mark.parametrize("n,m,nblocks,rank", [(16, 16, 4, 1), (16, 32, 4, 1), (24, 12, 2, 1), (24, 12, 2, 3)])
def test_projection_recovers_a_monarch_matrix(rng, n, m, nblocks, rank):
  w1, w2 = random_factors(rng, *class_shapes(n, m, nblocks, rank))
  dense = api.monarch_to_dense(w1, w2)
  v1, v2 = api.dense_to_monarch(dense, nblocks, rank)
  assert (v1.shape, v2.shape) == (w1.shape, w2.shape)
  assert_close(api.monarch_to_dense(v1, v2), dense_np(w1, w2), dtype=jnp.float32, reduction_len=n * m)


def blocks_tail_energy_np(dense: np.ndarray, nblocks: int, rank: int) -> float:
  """Σ over [S, P] sub-blocks of the squared singular values beyond `rank` (Eckart–Young's optimal error²)."""
  m, n = dense.shape
  s, p = m // nblocks, n // nblocks
  total = 0.0
  for l in range(nblocks):
    for k in range(nblocks):
      sigma = np.linalg.svd(dense[l * s:(l + 1) * s, k * p:(k + 1) * p], compute_uv=False)
      total += float(np.sum(sigma[rank:] ** 2))
  return total


@pytest.mark.parametrize("n,m,nblocks,rank", [(16, 16, 4, 1), (16, 32, 4, 1), (24, 12, 2, 1), (24, 12, 2, 2)])
def test_projection_is_the_best_fit(rng, n, m, nblocks, rank):
  dense = normal(rng, (m, n))
  dense64 = np.asarray(dense, np.float64)
  projected = np.asarray(reference.monarch_project(dense, nblocks, rank), np.float64)
  error = np.sum((dense64 - projected) ** 2)
  np.testing.assert_allclose(error, blocks_tail_energy_np(dense64, nblocks, rank), rtol=1e-4)
  # No member of the class fits better: random ones, and small moves away from the projection's own factors.
  w1, w2 = api.dense_to_monarch(dense, nblocks, rank)
  for _ in range(4):
    v1, v2 = random_factors(rng, w1.shape, w2.shape)
    assert error < np.sum((dense64 - dense_np(v1, v2)) ** 2)
    d1, d2 = random_factors(rng, w1.shape, w2.shape)
    nearby = dense_np(w1 + 1e-2 * d1, w2 + 1e-2 * d2)
    assert error <= np.sum((dense64 - nearby) ** 2) * (1 + 1e-6)
  # A projection maps its own image to itself.
  twice = reference.monarch_project(jnp.asarray(projected, jnp.float32), nblocks, rank)
  assert relative_error(twice, projected) < 1e-5


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("shapes", ["wide_n16_m32_b4", "narrow_n24_m12_b2", "unequal_blocks"])
def test_gradients(rng, shapes, form):
  w1_shape, w2_shape = FACTOR_SHAPES[shapes]
  with float64():
    w1, w2 = random_factors(rng, w1_shape, w2_shape, jnp.float64)
    x = normal(rng, (2, w1_shape[0] * w1_shape[2]), jnp.float64)
    check_grads(FORMS[form], (x, w1, w2), order=1, modes=("rev",))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shapes", ["square_n16_b4", "wide_n16_m32_b4", "narrow_n24_m12_b2"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_api_matches_numpy(rng, implementation, shapes, dtype):
  w1, w2 = random_factors(rng, *FACTOR_SHAPES[shapes], dtype)
  x = normal(rng, (2, 5, w1.shape[0] * w1.shape[2]), dtype)
  expected = np.asarray(x, np.float64) @ dense_np(w1, w2).T
  fn = jax.jit(functools.partial(api.monarch_linear, implementation=implementation))
  y = fn(x, w1, w2)
  assert y.dtype == dtype
  assert_close(y, expected, dtype=dtype, reduction_len=w1.shape[2] * w2.shape[2])


def test_api_auto_and_unknown_implementation(rng):
  w1, w2 = random_factors(rng, *FACTOR_SHAPES["square_n16_b4"])
  x = normal(rng, (3, 16))
  auto = api.monarch_linear(x, w1, w2)
  assert_close(auto, np.asarray(x, np.float64) @ dense_np(w1, w2).T, dtype=jnp.float32, reduction_len=16)
  with pytest.raises(ValueError, match="implementation"):
    api.monarch_linear(x, w1, w2, implementation="no_such_kernel")


@pytest.mark.parametrize("x_shape,w1_shape,w2_shape,match", [
    ((2, 15), (4, 4, 4), (4, 4, 4), "x.shape"),          # in_features not nblocks·block_in
    ((2, 16), (4, 4, 4), (4, 4, 3), "w2"),                # w2 reads 12 of w1's 16 outputs
    ((2, 16), (4, 4, 4), (3, 4, 4), "w2"),
    ((2, 16), (16, 4), (4, 4, 4), "w1"),                  # rank 2 factor
    ((2, 16), (4, 4, 4), (4, 4, 4, 1), "w2"),
])
def test_api_rejects_bad_shapes(rng, x_shape, w1_shape, w2_shape, match):
  with pytest.raises(ValueError, match=match):
    api.monarch_linear(normal(rng, x_shape), normal(rng, w1_shape), normal(rng, w2_shape))


@pytest.mark.parametrize("bad", ["x", "w1", "w2"])
def test_api_rejects_bad_dtypes(rng, bad):
  arrays = {"x": normal(rng, (2, 16)), "w1": normal(rng, (4, 4, 4)), "w2": normal(rng, (4, 4, 4))}
  arrays[bad] = arrays[bad].astype(jnp.int32)
  with pytest.raises(ValueError, match=bad):
    api.monarch_linear(arrays["x"], arrays["w1"], arrays["w2"])


@pytest.mark.parametrize("n,m,nblocks", [(16, 32, 4), (24, 12, 2)])
def test_init_shapes_and_bounds(n, m, nblocks):
  w1, w2 = api.monarch_init(jax.random.key(n * m + nblocks), n, m, nblocks)
  mid = min(n, m) // nblocks
  assert w1.shape == (nblocks, mid, n // nblocks) and w2.shape == (nblocks, m // nblocks, mid)
  for w in (w1, w2):
    bound = 1.0 / np.sqrt(w.shape[-1])
    assert np.all(np.abs(np.asarray(w)) <= bound) and np.max(np.abs(np.asarray(w))) > 0.5 * bound
  y = api.monarch_linear(normal(np.random.default_rng(0), (3, n)), w1, w2)
  assert y.shape == (3, m)


@pytest.mark.parametrize("args,match", [
    ((15, 16, 4), "in_features"), ((16, 18, 4), "out_features"), ((16, 16, 0), "nblocks")])
def test_init_rejects_indivisible_features(args, match):
  with pytest.raises(ValueError, match=match):
    api.monarch_init(jax.random.key(0), *args)


@pytest.mark.parametrize("shape,nblocks,rank,match", [
    ((16, 16), 4, 5, "rank"), ((16, 16), 4, 0, "rank"), ((18, 16), 4, 1, "out_features"),
    ((16, 18), 4, 1, "in_features"), ((16,), 4, 1, "dense")])
def test_dense_to_monarch_rejects_bad_arguments(rng, shape, nblocks, rank, match):
  with pytest.raises(ValueError, match=match):
    api.dense_to_monarch(normal(rng, shape), nblocks, rank)
