"""Attention oracles against an independent numpy float64 loop, each other, gradients, masking behaviour
(causality, windows, bottom-right alignment, decode) and the public api's validation.

Letters: B batch, T query length, S key length, H query heads, K kv heads, D head dim.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from pallas_kernels.attention import api
from pallas_kernels.attention import reference as ref
from tests.tolerances import assert_close, float64, normal

IMPLEMENTATIONS = ["reference"]
ATTENTION_ONLY = ["reference_chunked"]  # implementations of api.attention with no attention_decode counterpart

# jit-compiled once per configuration: fewer, larger compilations than op-by-op, and shows the forms trace.
_STATIC = ("causal", "window", "window_right", "scale", "softcap", "return_lse", "chunk_size")
FORMS = {
    "quadratic": jax.jit(ref.attention, static_argnames=_STATIC[:-1]),
    # 5 does not divide the test lengths, so the last chunk is padded
    "chunked": jax.jit(functools.partial(ref.attention_chunked, chunk_size=5), static_argnames=_STATIC),
}

# Shapes default to B=2, T=S=12, H=K=2, D=8; "segments" is "random" (packed documents), or "mismatched"
# (query segment 1 has no keys, so those rows see nothing).
CASES = {
    "full": dict(),
    "causal_odd_length": dict(causal=True, T=13, S=13),
    "window": dict(window=3),
    "causal_window": dict(causal=True, window=3),
    "window_both_sides": dict(window=3, window_right=2),
    "window_right_only": dict(window_right=0),
    "mqa_window": dict(causal=True, H=4, K=1, window=5),
    "gqa_segments": dict(causal=True, H=4, K=2, segments="random"),
    "segments_bidirectional": dict(segments="random", window=4, window_right=1),
    "segments_mismatched": dict(segments="mismatched"),
    "softcap_scale": dict(causal=True, softcap=1.5, scale=0.7, input_scale=3.0),
    "suffix_queries": dict(causal=True, T=5, S=13, segments="random", window=4),
    "more_queries_than_keys": dict(causal=True, T=8, S=5),  # p(t) < 0 for t < 3: empty rows
}
SHAPE_KEYS = ("B", "T", "S", "H", "K", "D", "segments", "input_scale")


def numpy_attention(q, k, v, *, causal=False, window=None, window_right=None, segment_ids=None,
                    kv_segment_ids=None, scale=None, softcap=None):
  """(out_BTHD, lse_BHT) in float64 by a loop over (b, h, t), written from the definition."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  B, T, H, D = q.shape
  S, K = k.shape[1], k.shape[2]
  scale = 1.0 / np.sqrt(D) if scale is None else scale
  if segment_ids is not None and kv_segment_ids is None:
    kv_segment_ids = segment_ids
  out, lse = np.zeros((B, T, H, D)), np.full((B, H, T), -np.inf)
  s = np.arange(S)
  for b in range(B):
    for h in range(H):
      kv_head = h // (H // K)
      for t in range(T):
        p = S - T + t
        visible = np.ones(S, bool)
        if causal:
          visible &= s <= p
        if window is not None:
          visible &= p - s < window
        if window_right is not None:
          visible &= s - p <= window_right
        if segment_ids is not None:
          visible &= np.asarray(kv_segment_ids)[b] == np.asarray(segment_ids)[b, t]
        if not visible.any():
          continue
        logits = scale * (k[b, visible, kv_head] @ q[b, t, h])
        if softcap is not None:
          logits = softcap * np.tanh(logits / softcap)
        weights = np.exp(logits - logits.max())
        out[b, t, h] = weights @ v[b, visible, kv_head] / weights.sum()
        lse[b, h, t] = logits.max() + np.log(weights.sum())
  return out, lse


def make_inputs(rng, case, dtype=jnp.float32):
  """(q, k, v, kwargs for attention) for a CASES entry."""
  shape = dict(B=2, T=12, S=12, H=2, K=2, D=8, segments=None, input_scale=1.0)
  shape.update({key: value for key, value in case.items() if key in SHAPE_KEYS})
  B, T, S, H, K, D = (shape[key] for key in "BTSHKD")
  q = normal(rng, (B, T, H, D), dtype, shape["input_scale"])
  k = normal(rng, (B, S, K, D), dtype, shape["input_scale"])
  v = normal(rng, (B, S, K, D), dtype)
  kwargs = {key: value for key, value in case.items() if key not in SHAPE_KEYS}
  if shape["segments"] == "random":
    kv_seg = np.sort(rng.integers(0, 3, (B, S)), axis=1).astype(np.int32)
    kwargs["segment_ids"] = jnp.asarray(kv_seg[:, S - T:])
    if T != S:
      kwargs["kv_segment_ids"] = jnp.asarray(kv_seg)
  elif shape["segments"] == "mismatched":
    kwargs["segment_ids"] = jnp.asarray(np.repeat([[0] * 3 + [1] * 4 + [2] * (T - 7)], B, axis=0), jnp.int32)
    kwargs["kv_segment_ids"] = jnp.asarray(np.repeat([[0] * 5 + [2] * (S - 5)], B, axis=0), jnp.int32)
  return q, k, v, kwargs


def assert_lse_close(actual, expected, *, dtype, reduction_len):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  empty = np.isneginf(expected)
  np.testing.assert_array_equal(np.isneginf(actual), empty, err_msg="lse is -inf exactly on rows with no keys")
  assert_close(np.where(empty, 0.0, actual), np.where(empty, 0.0, expected), dtype=dtype,
               reduction_len=reduction_len, name="lse")


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("case", list(CASES))
def test_forms_match_numpy(rng, case, form):
  q, k, v, kwargs = make_inputs(rng, CASES[case])
  out, lse = FORMS[form](q, k, v, return_lse=True, **kwargs)
  expected_out, expected_lse = numpy_attention(q, k, v, **kwargs)
  assert out.dtype == q.dtype and lse.dtype == jnp.float32
  assert_close(out, expected_out, dtype=jnp.float32, reduction_len=k.shape[1])
  assert_lse_close(lse, expected_lse, dtype=jnp.float32, reduction_len=k.shape[1])
  if np.isneginf(expected_lse).any():  # empty rows are exactly zero, not merely small
    assert (np.asarray(out)[np.isneginf(expected_lse).transpose(0, 2, 1)] == 0).all()


def test_chunked_form_matches_quadratic_form(rng):
  q, k, v, kwargs = make_inputs(rng, dict(CASES["suffix_queries"], H=4, K=1, softcap=2.0))
  out, lse = FORMS["quadratic"](q, k, v, return_lse=True, **kwargs)
  for chunk_size in (1, 4, 32):
    chunked_out, chunked_lse = FORMS["chunked"](q, k, v, return_lse=True, chunk_size=chunk_size, **kwargs)
    assert_close(chunked_out, out, dtype=jnp.float32, reduction_len=k.shape[1])
    assert_lse_close(chunked_lse, lse, dtype=jnp.float32, reduction_len=k.shape[1])


GRADIENT_CASES = {
    "gqa_segments_softcap": dict(causal=True, H=4, K=2, segments="random", softcap=1.5),
    "suffix_window_both_sides": dict(T=5, S=9, window=3, window_right=1, segments="random"),
    "more_queries_than_keys": CASES["more_queries_than_keys"],
}


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("case", list(GRADIENT_CASES))
def test_gradients_match_finite_differences(rng, case, form):
  with float64():
    q, k, v, kwargs = make_inputs(rng, dict(GRADIENT_CASES[case], B=1, D=4), jnp.float64)

    def out_and_finite_lse(q, k, v):
      out, lse = FORMS[form](q, k, v, return_lse=True, **kwargs)
      return out, jnp.where(jnp.isfinite(lse), lse, 0.0)

    check_grads(out_and_finite_lse, (q, k, v), order=1, modes=("rev",))


def test_gradients_of_empty_rows_are_zero_not_nan(rng):
  q, k, v, kwargs = make_inputs(rng, CASES["segments_mismatched"])
  out_weights = normal(rng, q.shape)

  for form in FORMS:
    def loss(q, k, v):
      out, lse = FORMS[form](q, k, v, return_lse=True, **kwargs)
      return jnp.sum(out * out_weights) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

    dq, dk, dv = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    for grad in (dq, dk, dv):
      assert np.isfinite(np.asarray(grad)).all()
    empty_T = np.asarray(kwargs["segment_ids"])[0] == 1
    assert (np.asarray(dq)[:, empty_T] == 0).all() and (np.asarray(dq)[:, ~empty_T] != 0).any()


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("T, S, window", [(8, 8, None), (5, 9, 3)])
def test_output_depends_only_on_visible_keys(rng, T, S, window, form):
  """d out[t] / d (k, v)[s] is exactly zero for keys hidden by the causal mask or the window."""
  q, k, v, _ = make_inputs(rng, dict(B=1, T=T, S=S, H=2, K=1, D=4))
  attend = functools.partial(FORMS[form], causal=True, window=window)
  jac_k, jac_v = jax.jacrev(attend, argnums=(1, 2))(q, k, v)  # [B,T,H,D, B,S,K,D]
  dependence_k_TS, dependence_v_TS = (np.abs(np.asarray(j)).sum(axis=(0, 2, 3, 4, 6, 7)) for j in (jac_k, jac_v))
  p = (S - T + np.arange(T))[:, None]
  s = np.arange(S)[None, :]
  visible_TS = (s <= p) & ((p - s < window) if window is not None else True)
  for dependence_TS in (dependence_k_TS, dependence_v_TS):
    assert (dependence_TS[~visible_TS] == 0).all()
  assert (dependence_v_TS[visible_TS] > 0).all()
  assert (dependence_k_TS[visible_TS] > 0).any()  # a row with one visible key has a constant softmax in k


@pytest.mark.parametrize("form", list(FORMS))
def test_suffix_queries_equal_last_rows_of_full_sequence(rng, form):
  q, k, v, kwargs = make_inputs(rng, dict(T=13, S=13, H=4, K=2, causal=True, window=4, segments="random"))
  full = FORMS[form](q, k, v, **kwargs)
  for T in (1, 4):  # the queries are the last T tokens: their own segment ids, every key's ids
    kwargs_T = dict(kwargs, segment_ids=kwargs["segment_ids"][:, -T:], kv_segment_ids=kwargs["segment_ids"])
    assert_close(FORMS[form](q[:, -T:], k, v, **kwargs_T), full[:, -T:], dtype=jnp.float32, reduction_len=13)


@pytest.mark.parametrize("window, softcap, H, K", [(None, None, 2, 2), (3, 2.0, 4, 1)])
def test_decode_equals_last_row_of_causal_attention(rng, window, softcap, H, K):
  B, S, D = 4, 9, 8
  lengths = jnp.asarray([0, 1, 6, S], jnp.int32)  # ragged, including an empty row and a full cache
  q = normal(rng, (B, H, D))
  k_cache, v_cache = normal(rng, (B, S, K, D)), normal(rng, (B, S, K, D))
  out = ref.attention_decode(q, k_cache, v_cache, lengths, window=window, softcap=softcap, scale=0.5)
  assert out.shape == q.shape and out.dtype == q.dtype
  for b, length in enumerate(np.asarray(lengths)):
    if length == 0:
      assert (np.asarray(out[b]) == 0).all()
      continue
    row = (q[b:b + 1, None], k_cache[b:b + 1, :length], v_cache[b:b + 1, :length])
    kwargs = dict(causal=True, window=window, softcap=softcap, scale=0.5)
    assert_close(out[b], FORMS["quadratic"](*row, **kwargs)[0, 0], dtype=jnp.float32, reduction_len=S)
    assert_close(out[b], numpy_attention(*row, **kwargs)[0][0, 0], dtype=jnp.float32, reduction_len=S)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS + ATTENTION_ONLY)
@pytest.mark.parametrize("case", [dict(causal=True, H=4, K=2, softcap=1.5, scale=0.7), CASES["suffix_queries"],
                                  dict(CASES["segments_mismatched"], window=4, window_right=2)])
def test_api_matches_numpy(rng, case, implementation, dtype):
  q, k, v, kwargs = make_inputs(rng, case, dtype)
  out, lse = api.attention(q, k, v, return_lse=True, implementation=implementation, **kwargs)
  expected_out, expected_lse = numpy_attention(q, k, v, **kwargs)  # on the dtype-rounded inputs
  assert out.dtype == dtype and out.shape == q.shape and lse.dtype == jnp.float32
  assert_close(out, expected_out, dtype=dtype, reduction_len=k.shape[1])
  assert_lse_close(lse, expected_lse, dtype=dtype, reduction_len=k.shape[1])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_api_decode_matches_numpy(rng, implementation, dtype):
  q = normal(rng, (2, 4, 8), dtype)
  k_cache, v_cache = normal(rng, (2, 11, 2, 8), dtype), normal(rng, (2, 11, 2, 8), dtype)
  lengths = jnp.asarray([3, 11], jnp.int32)
  out = api.attention_decode(q, k_cache, v_cache, lengths, window=5, implementation=implementation)
  assert out.dtype == dtype and out.shape == q.shape
  for b, length in enumerate(np.asarray(lengths)):
    expected = numpy_attention(q[b:b + 1, None], k_cache[b:b + 1, :length], v_cache[b:b + 1, :length],
                               causal=True, window=5)[0][0, 0]
    assert_close(out[b], expected, dtype=dtype, reduction_len=11)


def test_api_auto_jit_and_unknown_implementation(rng):
  q, k, v, kwargs = make_inputs(rng, dict(causal=True, segments="random"))
  expected = numpy_attention(q, k, v, **kwargs)[0]
  assert_close(api.attention(q, k, v, **kwargs), expected, dtype=jnp.float32, reduction_len=12)
  # Fail-closed on every backend: a head dim no kernel covers falls back to the reference, never to the chunked
  # oracle (which is only taken by name).
  assert api.ATTENTION.select("auto", head_dim=512).name == "reference"
  jitted = jax.jit(functools.partial(api.attention, causal=True))  # segment ids traced: value checks skipped
  assert_close(jitted(q, k, v, segment_ids=kwargs["segment_ids"]), expected, dtype=jnp.float32, reduction_len=12)
  with pytest.raises(ValueError, match="implementation"):
    api.attention(q, k, v, implementation="nope")
  with pytest.raises(ValueError, match="implementation"):
    api.attention_decode(q[:, 0], k, v, jnp.asarray([1, 2]), implementation="nope")


Q, KV = (2, 6, 4, 8), (2, 6, 2, 8)
_q, _kv = jnp.ones(Q), jnp.ones(KV)  # validation never reads values
_seg = jnp.zeros(Q[:2], jnp.int32)


@pytest.mark.parametrize("args, kwargs, match", [
    ((jnp.ones(Q[1:]), _kv, _kv), {}, "q must have rank 4"),
    ((_q, jnp.ones(KV[1:]), _kv), {}, "k must have rank 4"),
    ((_q.astype(jnp.int32), _kv, _kv), {}, "q has dtype int32"),
    ((_q, _kv.astype(jnp.bfloat16), _kv), {}, "dtypes must match.*'k': 'bfloat16'"),
    ((_q, jnp.ones((1, 6, 2, 8)), _kv), {}, r"k.shape\[0\] \(batch\)"),
    ((_q, jnp.ones((2, 6, 2, 4)), jnp.ones((2, 6, 2, 4))), {}, r"k.shape\[3\] \(head dim\)"),
    ((_q, _kv, jnp.ones((2, 5, 2, 8))), {}, "v must have shape"),
    ((_q, jnp.ones((2, 6, 3, 8)), jnp.ones((2, 6, 3, 8))), {}, "num_heads=4.*num_kv_heads=3"),
    ((_q, _kv, _kv), dict(window=0), "window must be an integer >= 1"),
    ((_q, _kv, _kv), dict(window=2.5), "window must be an integer >= 1"),
    ((_q, _kv, _kv), dict(window_right=-1), "window_right must be an integer >= 0"),
    ((_q, _kv, _kv), dict(softcap=0.0), "softcap must be positive"),
    ((_q, _kv, _kv), dict(scale=-1.0), "scale must be positive"),
    ((_q, _kv, _kv), dict(segment_ids=_seg[:, :5]), "segment_ids must have shape"),
    ((_q, _kv, _kv), dict(segment_ids=_seg.astype(jnp.float32)), "segment_ids must be an integer"),
    ((_q, _kv, _kv), dict(segment_ids=jnp.asarray([[0, 0, 1, 1, 0, 2]] * 2)), "segment_ids must be non-decr"),
    ((_q, _kv, _kv), dict(segment_ids=_seg, kv_segment_ids=_seg[:, :4]), "kv_segment_ids must have shape"),
    ((_q, _kv, _kv), dict(kv_segment_ids=_seg), "kv_segment_ids was given without segment_ids"),
    ((_q[:, :3], _kv, _kv), dict(segment_ids=_seg[:, :3]), "kv_segment_ids is required when q_len=3"),
])
def test_attention_rejects_bad_inputs(args, kwargs, match):
  with pytest.raises(ValueError, match=match):
    api.attention(*args, **kwargs)


_lengths = jnp.asarray([1, 6], jnp.int32)


@pytest.mark.parametrize("args, kwargs, match", [
    ((_q, _kv, _kv, _lengths), {}, "q must have rank 3"),
    ((_q[:, 0], _kv[0], _kv, _lengths), {}, "k_cache must have rank 4"),
    ((_q[:, 0], _kv, jnp.ones((2, 6, 1, 8)), _lengths), {}, "v_cache must have shape"),
    ((_q[:, 0], jnp.ones((2, 6, 3, 8)), jnp.ones((2, 6, 3, 8)), _lengths), {}, "num_heads=4"),
    ((_q[:, 0], _kv, _kv, _lengths[:1]), {}, "lengths must have shape"),
    ((_q[:, 0], _kv, _kv, _lengths.astype(jnp.float32)), {}, "lengths must be an integer"),
    ((_q[:, 0], _kv, _kv, jnp.asarray([1, 7])), {}, r"lengths must lie in \[0, 6\]"),
    ((_q[:, 0], _kv, _kv, jnp.asarray([-1, 2])), {}, r"lengths must lie in \[0, 6\]"),
    ((_q[:, 0], _kv, _kv, _lengths), dict(window=0), "window must be an integer >= 1"),
    ((_q[:, 0], _kv, _kv, _lengths), dict(softcap=-2.0), "softcap must be positive"),
])
def test_attention_decode_rejects_bad_inputs(args, kwargs, match):
  with pytest.raises(ValueError, match=match):
    api.attention_decode(*args, **kwargs)
