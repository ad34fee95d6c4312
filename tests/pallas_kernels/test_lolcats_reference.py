"""LoLCATs reference forms, decode state and feature maps against an independent float64 numpy oracle.

The oracle loops over (batch, head, query): softmax weights a·exp(s - m) over the keys t - w < s <= t (m their
max), linear weights b·f·g over the keys s <= t - w, y their weighted mean of v. Letters: B batch, T length,
H heads, K kv heads, D head dim, X feature width.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.lolcats import (LolcatsState, evicted_key, lolcats_attention, lolcats_decode_step,
                                    lolcats_prefill_state)
from pallas_kernels.lolcats import features, reference
from tests.tolerances import assert_close, float64, normal

FORMS = {"quadratic": reference.lolcats_quadratic, "recurrent": reference.lolcats_recurrent}


def numpy_lolcats(q, k, v, fq, fk, *, window, a, b):
  q, k, v, fq, fk, a, b = (np.asarray(x, np.float64) for x in (q, k, v, fq, fk, a, b))
  batch, length, heads, d = q.shape
  groups = heads // k.shape[2]
  y = np.zeros(q.shape)
  for bi in range(batch):
    for h in range(heads):
      for t in range(length):
        win = np.arange(max(0, t - window + 1), t + 1)
        lin = np.arange(0, max(0, t - window + 1))
        s = k[bi, win, h // groups] @ q[bi, t, h] / np.sqrt(d)
        w_win = a[h] * np.exp(s - s.max())
        w_lin = b[h] * (fk[bi, lin, h] @ fq[bi, t, h])
        weights = np.concatenate([w_win, w_lin])
        values = np.concatenate([v[bi, win, h // groups], v[bi, lin, h // groups]])
        y[bi, t, h] = weights @ values / weights.sum()
  return y


def _inputs(rng, *, B=2, T=23, H=4, K=2, D=8, F=4, dtype=jnp.float32):
  q, k, v = normal(rng, (B, T, H, D), dtype), normal(rng, (B, T, K, D), dtype), normal(rng, (B, T, K, D), dtype)
  w_q, w_k = normal(rng, (H, D, F), jnp.float32, 0.5), normal(rng, (H, D, F), jnp.float32, 0.5)
  fq, fk = features.hedgehog_features(q, w_q), features.hedgehog_features(jnp.repeat(k, H // K, axis=2), w_k)
  a = jax.nn.sigmoid(normal(rng, (H,), jnp.float32))
  return q, k, v, fq, fk, a, 1.0 - a


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("window", [1, 5, 64])
def test_forms_match_numpy(rng, form, window):
  q, k, v, fq, fk, a, b = _inputs(rng)
  want = numpy_lolcats(q, k, v, fq, fk, window=window, a=a, b=b)
  with float64():
    args = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v, fq, fk)]
    got = FORMS[form](*args, window=window, window_factor=jnp.asarray(np.asarray(a, np.float64)),
                      linear_factor=jnp.asarray(np.asarray(b, np.float64)))
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-10, atol=1e-10)


def test_factors_fold_into_query_features(rng):
  """Only b/a matters: (a, b) and (1, b/a·fq) give the same y (what the kernel path relies on)."""
  q, k, v, fq, fk, a, b = _inputs(rng)
  y = reference.lolcats_quadratic(q, k, v, fq, fk, window=6, window_factor=a, linear_factor=b)
  folded = reference.lolcats_quadratic(q, k, v, fq * (b / a)[:, None], fk, window=6)
  assert_close(folded, y, dtype=jnp.float32, reduction_len=q.shape[1])


@pytest.mark.parametrize("implementation", ["reference", "recurrent"])
def test_api_bf16_matches_float32(rng, implementation):
  q, k, v, fq, fk, a, b = _inputs(rng, dtype=jnp.bfloat16)
  got = lolcats_attention(q, k, v, fq, fk, window=7, window_factor=a, linear_factor=b,
                          implementation=implementation)
  assert got.dtype == jnp.bfloat16
  want = reference.lolcats_quadratic(*(x.astype(jnp.float32) for x in (q, k, v, fq, fk)), window=7,
                                     window_factor=a, linear_factor=b)
  assert_close(got, want, dtype=jnp.bfloat16, reduction_len=q.shape[1])


def test_prefill_then_decode_equals_parallel(rng):
  """Rows with prompts past the window and shorter than it: prefill's state, then decode steps that evict through
  evicted_key and the key feature map, give the parallel outputs, and end in the state prefill builds directly."""
  window, H, K, steps = 6, 4, 2, 8
  q, k, v, _, _, a, b = _inputs(rng, T=17, H=H, K=K)
  w_q, w_k = normal(rng, (H, 8, 4), jnp.float32, 0.5), normal(rng, (H, 8, 4), jnp.float32, 0.5)
  phi_k = lambda x: features.hedgehog_features(jnp.repeat(x, H // K, axis=-2), w_k)
  fq, fk = features.hedgehog_features(q, w_q), phi_k(k)
  factors = dict(window_factor=a, linear_factor=b)
  want = lolcats_attention(q, k, v, fq, fk, window=window, **factors)
  lengths = jnp.asarray([9, 3], jnp.int32)
  state = lolcats_prefill_state(k, v, fk, lengths, window=window)
  rows = jnp.arange(2)
  for i in range(steps):
    take = lambda x: x[rows, lengths + i]
    y, state = lolcats_decode_step(take(q), take(k), take(v), take(fq), phi_k(evicted_key(state)), state,
                                   **factors)
    assert_close(y, want[rows, lengths + i], dtype=jnp.float32, reduction_len=17, name=f"step {i}")
  direct = lolcats_prefill_state(k, v, fk, lengths + steps, window=window)
  for name, got, exp in zip(LolcatsState._fields, state, direct):
    assert_close(got, exp, dtype=jnp.float32, reduction_len=17, name=name)


def test_causal(rng):
  q, k, v, fq, fk, _, _ = _inputs(rng, T=12)
  t0 = 7
  grads = jax.grad(lambda *x: jnp.sum(reference.lolcats_quadratic(*x, window=3)[:, t0]), argnums=(0, 1, 2, 3, 4))(
      q, k, v, fq, fk)
  for g in grads:
    assert np.all(np.asarray(g)[:, t0 + 1:] == 0)
    assert np.any(np.asarray(g)[:, :t0 + 1] != 0)


def test_feature_maps(rng):
  x, w = normal(rng, (2, 5, 3, 8)), normal(rng, (3, 8, 4), scale=0.5)
  phi = features.hedgehog_features(x, w)
  assert phi.shape == (2, 5, 3, features.feature_width("hedgehog", 4))
  assert np.all(np.asarray(phi) > 0)
  np.testing.assert_allclose(np.asarray(phi).reshape(2, 5, 3, 2, 4).sum(-1), 1.0, rtol=1e-6)
  phi_t = features.projected_taylor_features(x, w)
  assert phi_t.shape[-1] == features.feature_width("taylor", 4)
  y = jnp.einsum("bthd,hdf->bthf", x, w)
  s = jnp.einsum("bthf,bshf->bhts", y, y) / 2.0  # √F = 2
  np.testing.assert_allclose(np.asarray(jnp.einsum("bthx,bshx->bhts", phi_t, phi_t)),
                             np.asarray(1 + s + s * s / 2), rtol=1e-4, atol=1e-4)


def test_api_validation(rng):
  q, k, v, fq, fk, a, _ = _inputs(rng)
  with pytest.raises(ValueError, match="window"):
    lolcats_attention(q, k, v, fq, fk, window=0)
  with pytest.raises(ValueError, match="num_heads"):
    lolcats_attention(q[:, :, :3], k, v, fq[:, :, :3], fk[:, :, :3])
  with pytest.raises(ValueError, match="window_factor"):
    lolcats_attention(q, k, v, fq, fk, window_factor=a[:2])
  with pytest.raises(ValueError, match="fk"):
    lolcats_attention(q, k, v, fq, fk[..., :3])
  with pytest.raises(ValueError, match="window=5 not in"):
    lolcats_attention(q, k, v, fq, fk, window=5, implementation="pallas")
