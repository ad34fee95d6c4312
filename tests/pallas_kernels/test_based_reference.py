"""Based reference forms and public api against an independent float64 numpy oracle.

The oracle loops over (batch, head, query) and weighs each visible key by 1 + s + s²/2, s = q·k/√F; an initial
state is given to it as a prefix of keys/values seen by the row's first segment, and the expected BasedState is
built from the order-split sums written out here. Letters: B batch, T length, H heads, F feature dim, D value dim.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.based import BasedState, based_decode_step, based_linear_attention, reference
from tests.tolerances import assert_close, float64, normal

IMPLEMENTATIONS = ["reference", "quadratic", "recurrent"]
FORMS = {
    "quadratic": reference.based_quadratic,
    "chunked4": functools.partial(reference.based_chunked, chunk=4),
    "recurrent": reference.based_recurrent,
}


def numpy_based(q, k, v, *, normalize, eps=1e-6, segment_ids=None, prefix=None):
  """y[b, t, h] = Σ w v / (Σ w + eps) over keys s ≤ t of t's segment (and prefix keys for the first segment)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  batch, length, heads, f = q.shape
  seg = np.zeros((batch, length), int) if segment_ids is None else np.asarray(segment_ids)
  y = np.zeros(v.shape)
  for b in range(batch):
    for t in range(length):
      keys = np.nonzero((np.arange(length) <= t) & (seg[b] == seg[b, t]))[0]
      for h in range(heads):
        k_SF, v_SD = k[b, keys, h], v[b, keys, h]
        if prefix is not None and seg[b, t] == seg[b, 0]:
          k_SF = np.concatenate([np.asarray(prefix[0], np.float64)[b, :, h], k_SF])
          v_SD = np.concatenate([np.asarray(prefix[1], np.float64)[b, :, h], v_SD])
        s = k_SF @ q[b, t, h] / np.sqrt(f)
        w = 1.0 + s + s * s / 2.0
        y[b, t, h] = w @ v_SD / (w.sum() + eps) if normalize else w @ v_SD
  return y


def numpy_state(k, v):
  """The BasedState of all tokens of k [B, S, H, F], v [B, S, H, D], in float64: the order-2 rows are the upper
  triangle of k ⊗ k / (√2·√F), row by row, with the off-diagonal entries doubled in weight (× √2)."""
  k, v = np.asarray(k, np.float64), np.asarray(v, np.float64)
  f = k.shape[-1]
  k1 = k / f ** 0.25
  rows, cols = np.triu_indices(f)
  k2 = (k[..., rows] * k[..., cols] * np.where(rows == cols, 1.0, np.sqrt(2.0))) / (np.sqrt(2.0) * np.sqrt(f))
  return BasedState(v.sum(1), np.einsum("bshf,bshd->bhfd", k1, v), np.einsum("bshu,bshd->bhud", k2, v),
                    np.full(k.shape[0:1] + k.shape[2:3], float(k.shape[1])), k1.sum(1), k2.sum(1))


def expected_final_state(k, v, segment_ids, prefix):
  """Per row, the state of the last document's tokens, plus the prefix when the row is a single document."""
  rows = []
  for b, ids in enumerate(np.asarray(segment_ids)):
    pos = np.nonzero(ids == ids[-1])[0]
    k_b, v_b = np.asarray(k, np.float64)[b:b + 1, pos], np.asarray(v, np.float64)[b:b + 1, pos]
    if ids[0] == ids[-1]:
      k_b = np.concatenate([np.asarray(prefix[0], np.float64)[b:b + 1], k_b], 1)
      v_b = np.concatenate([np.asarray(prefix[1], np.float64)[b:b + 1], v_b], 1)
    rows.append(numpy_state(k_b, v_b))
  return BasedState(*(np.concatenate(parts) for parts in zip(*rows)))


def as_state(state, dtype=jnp.float32):
  return BasedState(*(jnp.asarray(x, dtype) for x in state))


def assert_state_close(actual, expected, *, reduction_len):
  for field, a, e in zip(BasedState._fields, actual, expected):
    assert_close(a, e, dtype=np.float32, reduction_len=reduction_len, name=field)


def random_qkv(rng, batch, length, heads, f, d, dtype=jnp.float32):
  return (normal(rng, (batch, length, heads, f), dtype), normal(rng, (batch, length, heads, f), dtype),
          normal(rng, (batch, length, heads, d), dtype))


def packed_segments(rng, length):
  """Row 0: several documents (one spanning chunk boundaries); row 1: a single document."""
  starts = rng.random(length) < 0.25
  starts[rng.integers(2, length - 6)] = True
  starts[0] = False
  row0 = 3 + np.cumsum(starts)
  return jnp.asarray(np.stack([row0, np.full(length, 7)]), jnp.int32)


@pytest.mark.parametrize("f", [4, 8, 16])
def test_taylor_features_dot_products(rng, f):
  q, k = normal(rng, (3, 5, f)), normal(rng, (3, 5, f))
  phi_q, phi_k = reference.taylor_features(q), reference.taylor_features(k)
  assert phi_q.shape == (3, 5, 1 + f + f * f) and phi_q.dtype == q.dtype
  s = np.einsum("btf,btf->bt", np.asarray(q, np.float64), np.asarray(k, np.float64)) / np.sqrt(f)
  dots = np.einsum("btx,btx->bt", np.asarray(phi_q, np.float64), np.asarray(phi_k, np.float64))
  assert_close(dots, 1.0 + s + s * s / 2.0, dtype=np.float32, reduction_len=f * f)


@pytest.mark.parametrize("chunk", [4, 8])
@pytest.mark.parametrize("f,d", [(4, 8), (8, 16)])
@pytest.mark.parametrize("normalize", [True, False])
def test_forms_match_numpy_and_each_other(rng, normalize, f, d, chunk):
  q, k, v = random_qkv(rng, 2, 13, 2, f, d)  # 13 is not a multiple of either chunk length
  expected = numpy_based(q, k, v, normalize=normalize)
  forms = {"quadratic": reference.based_quadratic(q, k, v, normalize=normalize),
           "chunked": reference.based_chunked(q, k, v, chunk=chunk, normalize=normalize),
           "recurrent": reference.based_recurrent(q, k, v, normalize=normalize)}
  for name, y in forms.items():
    assert y.dtype == v.dtype
    assert_close(y, expected, dtype=np.float32, reduction_len=13 * f, name=name)
    assert_close(y, forms["quadratic"], dtype=np.float32, reduction_len=13 * f, name=f"{name} vs quadratic")


@pytest.mark.parametrize("form", FORMS)
def test_initial_state_in_and_final_state_out(rng, form, normalize=True):
  fn = FORMS[form]
  q, k, v = random_qkv(rng, 2, 12, 2, 4, 8)
  _, k0, v0 = random_qkv(rng, 2, 5, 2, 4, 8)
  state0 = as_state(numpy_state(k0, v0))
  y, final = fn(q, k, v, normalize=normalize, initial_state=state0, return_final_state=True)
  assert_close(y, numpy_based(q, k, v, normalize=normalize, prefix=(k0, v0)), dtype=np.float32,
               reduction_len=17 * 4)
  assert_state_close(final, numpy_state(jnp.concatenate([k0, k], 1), jnp.concatenate([v0, v], 1)),
                     reduction_len=17)
  # Two halves with the state handed over equal one run.
  y1, mid = fn(q[:, :6], k[:, :6], v[:, :6], normalize=normalize, initial_state=state0, return_final_state=True)
  y2, end = fn(q[:, 6:], k[:, 6:], v[:, 6:], normalize=normalize, initial_state=mid, return_final_state=True)
  assert_close(jnp.concatenate([y1, y2], 1), y, dtype=np.float32, reduction_len=17 * 4, name="halves")
  assert_state_close(end, final, reduction_len=17)


@pytest.mark.parametrize("form", FORMS)
def test_segment_ids_reset_like_separate_documents(rng, form):
  fn = FORMS[form]
  q, k, v = random_qkv(rng, 2, 16, 2, 4, 8)
  _, k0, v0 = random_qkv(rng, 2, 3, 2, 4, 8)
  state0 = as_state(numpy_state(k0, v0))
  seg = packed_segments(rng, 16)
  y, final = fn(q, k, v, initial_state=state0, segment_ids=seg, return_final_state=True)
  assert_close(y, numpy_based(q, k, v, normalize=True, segment_ids=seg, prefix=(k0, v0)), dtype=np.float32,
               reduction_len=64)
  # Row 0's first and last documents, and row 1 (one document), each run on its own.
  ids = np.asarray(seg)
  row0_first, row0_last = np.nonzero(ids[0] == ids[0, 0])[0], np.nonzero(ids[0] == ids[0, -1])[0]
  for b, pos, with_state in [(0, row0_first, True), (0, row0_last, False), (1, np.arange(16), True)]:
    init = jax.tree.map(lambda x: x[b:b + 1], state0) if with_state else None  # noqa: B023
    y_doc, final_doc = fn(q[b:b + 1, pos], k[b:b + 1, pos], v[b:b + 1, pos], initial_state=init,
                          return_final_state=True)
    assert_close(y[b:b + 1, pos], y_doc, dtype=np.float32, reduction_len=64, name=f"row {b} tokens {pos}")
    if pos[-1] == 15:  # the row's final state is its last document's, with the initial state only in row 1
      assert_state_close(jax.tree.map(lambda x: x[b:b + 1], final), final_doc, reduction_len=16)  # noqa: B023


@pytest.mark.parametrize("normalize", [True, False])
def test_decode_steps_equal_parallel(rng, normalize):
  q, k, v = random_qkv(rng, 2, 9, 2, 8, 8)
  _, k0, v0 = random_qkv(rng, 2, 4, 2, 8, 8)
  state = as_state(numpy_state(k0, v0))
  y, final = based_linear_attention(q, k, v, normalize=normalize, chunk=4, initial_state=state,
                                    return_final_state=True)
  steps = []
  for t in range(9):
    y_t, state = based_decode_step(q[:, t], k[:, t], v[:, t], state, normalize=normalize)
    steps.append(y_t)
  assert_close(jnp.stack(steps, 1), y, dtype=np.float32, reduction_len=13 * 8)
  assert_state_close(state, final, reduction_len=13)


@pytest.mark.parametrize("form", FORMS)
def test_causality(rng, form):
  q, k, v = random_qkv(rng, 1, 8, 1, 4, 3)
  jacs = jax.jit(jax.jacrev(FORMS[form], argnums=(0, 1, 2)))(q, k, v)  # each [1, T, 1, D, 1, S, 1, F|D]
  for argnum, jac in enumerate(jacs):
    per_ts = np.abs(np.asarray(jac)[0, :, 0, :, 0, :, 0, :]).sum(axis=(1, 3))
    assert (per_ts[np.triu_indices(8, 1)] == 0).all(), f"argument {argnum}: output depends on a later token"
    assert (np.diag(per_ts) > 0).all(), f"argument {argnum}: output ignores its own token"
    # y_t reads q only at t, but k and v at every s ≤ t.
    earlier = per_ts[np.tril_indices(8, -1)]
    assert (earlier == 0).all() if argnum == 0 else (earlier > 0).any(), f"argument {argnum}"


@pytest.mark.parametrize("form,normalize", [(form, True) for form in FORMS] + [("chunked4", False)])
def test_gradients_float64(rng, form, normalize):
  """⟨∇L, t⟩ equals the central difference of L = Σ w·y along a random t, for each of q, k, v, initial_state."""
  with float64():
    q, k, v = random_qkv(rng, 1, 6, 1, 4, 3, jnp.float64)
    _, k0, v0 = random_qkv(rng, 1, 3, 1, 4, 3, jnp.float64)
    args = (q, k, v, as_state(numpy_state(k0, v0), jnp.float64))
    w = normal(rng, v.shape, jnp.float64)
    loss = jax.jit(lambda q, k, v, state: jnp.sum(w * FORMS[form](q, k, v, normalize=normalize,
                                                                   initial_state=state)))
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(*args)
    for i, name in enumerate(["q", "k", "v", "initial_state"]):
      t = jax.tree.map(lambda x: normal(rng, x.shape, jnp.float64), args[i])
      moved = [loss(*args[:i], jax.tree.map(lambda x, d, h=h: x + h * d, args[i], t), *args[i + 1:])
               for h in (1e-5, -1e-5)]
      analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads[i]), jax.tree.leaves(t)))
      # Central differences at h = 1e-5 are good to ~1e-9 relative, well below any real gradient bug.
      assert_close(analytic, (moved[0] - moved[1]) / 2e-5, dtype=np.float64, name=f"d loss / d {name}", scale=1e6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_api_matches_numpy(rng, implementation, dtype):
  q, k, v = random_qkv(rng, 2, 13, 2, 8, 8, dtype)
  _, k0, v0 = random_qkv(rng, 2, 3, 2, 8, 8, dtype)
  seg = packed_segments(rng, 13)
  y, final = based_linear_attention(q, k, v, chunk=4, initial_state=as_state(numpy_state(k0, v0)),
                                    segment_ids=seg, return_final_state=True, implementation=implementation)
  assert y.dtype == dtype and final.s2_BHUD.dtype == jnp.float32
  expected = numpy_based(q, k, v, normalize=True, segment_ids=seg, prefix=(k0, v0))
  assert_close(y, expected, dtype=dtype, reduction_len=16)
  assert_state_close(final, expected_final_state(k, v, seg, (k0, v0)), reduction_len=16)


def test_api_auto_and_unknown_implementation(rng):
  q, k, v = random_qkv(rng, 1, 5, 2, 4, 4)
  y = based_linear_attention(q, k, v)
  assert_close(y, numpy_based(q, k, v, normalize=True), dtype=np.float32, reduction_len=5)
  with pytest.raises(ValueError, match="implementation"):
    based_linear_attention(q, k, v, implementation="no_such_kernel")
  with pytest.raises(ValueError, match="implementation"):
    based_decode_step(q[:, 0], k[:, 0], v[:, 0], BasedState.zeros(1, 2, 4, 4), implementation="no_such_kernel")


def _bad_calls():
  ok = dict(q=jnp.ones((2, 6, 2, 4)), k=jnp.ones((2, 6, 2, 4)), v=jnp.ones((2, 6, 2, 8)))
  state = BasedState.zeros(2, 2, 4, 8)
  return [
      (dict(ok, q=jnp.ones((2, 6, 4))), "q"),
      (dict(ok, k=jnp.ones((2, 6, 2, 5))), "k"),
      (dict(ok, v=jnp.ones((2, 6, 3, 8))), "v"),  # head count differs
      (dict(ok, v=jnp.ones((2, 5, 2, 8))), "v"),
      (dict(ok, q=jnp.ones((2, 6, 2, 4), jnp.int32), k=jnp.ones((2, 6, 2, 4), jnp.int32)), "q"),
      (dict(ok, v=jnp.ones((2, 6, 2, 8), jnp.bfloat16)), "dtypes"),
      (dict(ok, feature_dim=8), "feature_dim"),
      (dict(ok, q=jnp.ones((1, 2, 1, 65)), k=jnp.ones((1, 2, 1, 65)), v=jnp.ones((1, 2, 1, 4))), "feature_dim"),
      (dict(ok, chunk=0), "chunk"),
      (dict(ok, chunk=2.5), "chunk"),
      (dict(ok, eps=-1.0), "eps"),
      (dict(ok, initial_state=state._replace(s2_BHUD=jnp.zeros((2, 2, 4, 8)))), "initial_state.s2_BHUD"),
      (dict(ok, initial_state=state._replace(z0_BH=jnp.zeros((2, 2), jnp.bfloat16))), "initial_state.z0_BH"),
      (dict(ok, initial_state=tuple(state)), "initial_state"),
      (dict(ok, segment_ids=jnp.array([[0, 0, 1, 1, 0, 2]] * 2)), "segment_ids"),
      (dict(ok, segment_ids=jnp.zeros((2, 5), jnp.int32)), "segment_ids"),
      (dict(ok, segment_ids=jnp.zeros((2, 6), jnp.float32)), "segment_ids"),
  ]


@pytest.mark.parametrize("kwargs,argname", _bad_calls())
def test_validation_names_the_argument(kwargs, argname):
  with pytest.raises(ValueError, match=argname):
    based_linear_attention(**kwargs)


@pytest.mark.parametrize("change,argname", [
    (dict(q=jnp.ones((2, 2, 4, 1))), "q"), (dict(v=jnp.ones((2, 3, 8))), "v"), (dict(eps=-1e-3), "eps"),
    (dict(state=BasedState.zeros(2, 2, 4, 4)), "state.s0_BHD"),
])
def test_decode_step_validation(change, argname):
  args = dict(q=jnp.ones((2, 2, 4)), k=jnp.ones((2, 2, 4)), v=jnp.ones((2, 2, 8)),
              state=BasedState.zeros(2, 2, 4, 8))
  args.update(change)
  with pytest.raises(ValueError, match=argname):
    based_decode_step(**args)
