"""Attention (GQA/MQA, RoPE, sliding window, ring-buffer cache), MLPs, norms and embeddings: behaviour, not
snapshots. Decode after prefill equals the parallel form; RoPE depends on relative positions only; packed
documents do not see each other; a Monarch map equals its dense matrix."""

import unittest.mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.layers.attention import Attention, AttentionConfig, SlidingWindowConfig
from jaxlm.layers.embedding import Embedding
from jaxlm.layers.linear import MonarchLinear
from jaxlm.layers.mlp import build_mlp, default_hidden
from jaxlm.layers.norms import LayerNorm, RMSNorm
from jaxlm.layers.rotary import apply_rotary, segment_positions
from pallas_kernels.monarch import monarch_to_dense
from tests.tolerances import assert_close, normal

B, T, D = 2, 11, 32


def rngs(seed: int = 0) -> nnx.Rngs:
  # rbg keys compile far faster than threefry on CPU; the init distribution is the same.
  return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def make_attention(config: AttentionConfig, **kw) -> Attention:
  with nnx.use_eager_sharding(False):  # logical axis names without a mesh: annotate, do not place
    return Attention(config, rngs=rngs(), **kw)


ATTENTION = {
    "mha": AttentionConfig(D, num_heads=4),
    "gqa_partial_rope": AttentionConfig(D, num_heads=4, num_kv_heads=2, rotary_dim=4),
    "mqa_window3_ring": SlidingWindowConfig(D, num_heads=4, num_kv_heads=1, window=3),
    "window_longer_than_cache": SlidingWindowConfig(D, num_heads=2, window=64),
    "monarch_bias_no_rope": AttentionConfig(D, num_heads=4, projection="monarch", use_bias=True, rotary_dim=0),
    # Head dims the decode kernel pads (12 -> 16, 24 -> 32): the cache stores them padded, read in place.
    "head_dim24_decode_kernel": AttentionConfig(D, num_heads=4, num_kv_heads=2, head_dim=24,
                                                decode_implementation="pallas"),
    "head_dim12_window3_decode_kernel": SlidingWindowConfig(D, num_heads=2, head_dim=12, window=3,
                                                            decode_implementation="pallas"),
}


@pytest.mark.parametrize("name", list(ATTENTION))
def test_attention_decode_equals_parallel(name, rng):
  """prefill over ragged, poisoned prompts + one decode step at a time == the parallel form, row by row, also
  when the ring buffer (window 3) wraps several times."""
  layer = make_attention(ATTENTION[name])
  x = normal(rng, (B, T, D))
  full = jax.jit(lambda x: layer(x))(x)
  lengths = np.array([2, 5])
  prompt = np.array(x[:, :5])
  prompt[0, 2:] = rng.standard_normal((3, D))  # what the padding holds must not matter
  prefill = jax.jit(lambda x, c, n: layer.prefill(x, c, n))
  decode = jax.jit(lambda x, c: layer.decode(x, c))
  y, cache = prefill(jnp.asarray(prompt), layer.init_cache(B, T, jnp.float32), jnp.asarray(lengths))
  for b, n in enumerate(lengths):
    assert_close(y[b, :n], full[b, :n], dtype=jnp.float32, reduction_len=D, name=f"{name} prefill row {b}")
  rows = np.arange(B)
  for i in range(T - lengths.max()):
    y, cache = decode(x[rows, lengths + i], cache)
    assert_close(y, full[rows, lengths + i], dtype=jnp.float32, reduction_len=D, name=f"{name} decode step {i}")
  assert (np.asarray(cache.lengths_B) == lengths + T - lengths.max()).all()


def test_sliding_window_cache_is_window_sized():
  """Window slots whatever the length (the last axis is the decode kernel's head dim: the next test)."""
  layer = make_attention(SlidingWindowConfig(D, num_heads=4, window=3))
  assert layer.init_cache(B, 1000, jnp.float32).k_BSKD.shape == (B, 3, 4, layer.cache_head_dim())
  assert make_attention(AttentionConfig(D, num_heads=4)).init_cache(B, 7, jnp.float32).k_BSKD.shape[1] == 7


def test_cache_is_stored_at_the_decode_kernels_head_dim():
  """The portable decode kernel tiles powers of two under Triton (and interpret mode): a cache of head dim 24 is
  stored at 32 for it (zero columns), at 24 for the reference, which reads any width, and at 24 for Mosaic on TPU;
  auto pads where it takes the kernel (GPU), not where it takes the reference (CPU)."""
  cases = (("pallas", "cpu", 32), ("reference", "cpu", 24), ("pallas", "tpu", 24), ("auto", "gpu", 32),
           ("auto", "cpu", 24))
  for implementation, backend, width in cases:
    layer = make_attention(AttentionConfig(D, num_heads=4, head_dim=24, decode_implementation=implementation))
    with unittest.mock.patch.object(jax, "default_backend", return_value=backend):
      shape = jax.eval_shape(lambda: layer.init_cache(B, 7, jnp.float32)).k_BSKD.shape
    assert shape == (B, 7, 4, width), (implementation, backend)


def test_attention_window_limits_what_is_seen(rng):
  """With window w, output t does not change when inputs before t - w + 1 change; without it, it does."""
  x = normal(rng, (1, T, D))
  x2 = x.at[:, 0].set(normal(rng, (D,)))
  windowed = jax.jit(make_attention(SlidingWindowConfig(D, num_heads=4, window=3)))
  y, y2 = windowed(x), windowed(x2)
  np.testing.assert_array_equal(np.asarray(y[:, 3:]), np.asarray(y2[:, 3:]))
  assert not np.allclose(y[:, 2], y2[:, 2])
  full = jax.jit(make_attention(AttentionConfig(D, num_heads=4)))
  assert not np.allclose(full(x)[:, -1], full(x2)[:, -1])


def test_packed_documents_equal_separate_runs(rng):
  """A row packing two documents gives each the output it gets alone (positions restart at each document)."""
  layer = make_attention(AttentionConfig(D, num_heads=4, num_kv_heads=2))
  x = normal(rng, (1, T, D))
  split = 4
  segment_ids = jnp.asarray([[0] * split + [1] * (T - split)])
  packed = jax.jit(lambda x, s: layer(x, segment_ids=s))(x, segment_ids)
  alone = jax.jit(lambda x: layer(x))
  assert_close(packed[:, :split], alone(x[:, :split]), dtype=jnp.float32, reduction_len=D)
  assert_close(packed[:, split:], alone(x[:, split:]), dtype=jnp.float32, reduction_len=D)


def test_rotary_depends_on_relative_position_only(rng):
  """rope(q, p)·rope(k, s) == rope(q, p + c)·rope(k, s + c); rotated dims keep their norm; the tail of a partial
  rotary passes through unchanged."""
  q, k = normal(rng, (1, 1, 1, 16)), normal(rng, (1, 1, 1, 16))
  dot = lambda p, s: float(jnp.sum(apply_rotary(q, jnp.array([[p]]), rotary_dim=16) *  # noqa: E731
                                   apply_rotary(k, jnp.array([[s]]), rotary_dim=16)))
  assert dot(7, 3) == pytest.approx(dot(107, 103), rel=1e-4)
  assert dot(7, 3) != pytest.approx(dot(7, 4), rel=1e-3)
  partial = apply_rotary(q, jnp.array([[5]]), rotary_dim=8)
  np.testing.assert_array_equal(np.asarray(partial[..., 8:]), np.asarray(q[..., 8:]))
  assert float(jnp.linalg.norm(partial[..., :8])) == pytest.approx(float(jnp.linalg.norm(q[..., :8])), rel=1e-5)
  np.testing.assert_array_equal(np.asarray(apply_rotary(q, jnp.array([[5]]), rotary_dim=0)), np.asarray(q))


def test_segment_positions_restart_per_document():
  ids = jnp.array([[0, 0, 0, 1, 1, 2, 2, 2]])
  np.testing.assert_array_equal(np.asarray(segment_positions(ids)), [[0, 1, 2, 0, 1, 0, 1, 2]])


@pytest.mark.parametrize("bad, field", [
    (dict(num_heads=5), "num_heads"), (dict(num_heads=4, num_kv_heads=3), "num_kv_heads"),
    (dict(num_heads=4, rotary_dim=3), "rotary_dim"), (dict(num_heads=4, window=0), "window"),
    (dict(num_heads=4, projection="dense", softcap=-1.0), "softcap")])
def test_attention_config_errors_name_the_field(bad, field):
  with pytest.raises(ValueError, match=field):
    AttentionConfig(D, **bad)
  with pytest.raises(ValueError, match="window"):
    SlidingWindowConfig(D, num_heads=4, window=None)


def test_monarch_linear_equals_its_dense_matrix(rng):
  """MonarchLinear(x) = x Mᵀ + b with M the dense matrix of its two block-diagonal factors."""
  with nnx.use_eager_sharding(False):
    layer = MonarchLinear(16, 32, nblocks=4, rngs=rngs())
  assert layer.w1.shape == (4, 4, 4) and layer.w2.shape == (4, 8, 4)  # fly's shapes: 1/4 of dense per factor
  x = normal(rng, (3, 16))
  dense = monarch_to_dense(layer.w1[...], layer.w2[...])
  assert_close(layer(x), x @ dense.T + layer.bias[...], dtype=jnp.float32, reduction_len=16)


@pytest.mark.parametrize("kind", ["swiglu", "gelu", "monarch"])
def test_mlps_map_width_and_mix_channels(kind, rng):
  with nnx.use_eager_sharding(False):
    mlp = build_mlp(kind, D, 64, use_bias=kind != "swiglu", rngs=rngs())
  x = normal(rng, (B, 3, D))
  y = mlp(x)
  assert y.shape == x.shape and np.isfinite(np.asarray(y)).all()
  # Position-wise: each token's output depends on that token only.
  np.testing.assert_allclose(np.asarray(mlp(x[:, :1])), np.asarray(y[:, :1]), rtol=1e-5, atol=1e-6)
  assert build_mlp("none", D, rngs=rngs()) is None
  assert default_hidden("swiglu", 768) == 2048 and default_hidden("gelu", 768) == 3072


def test_norms_normalise_in_float32(rng):
  x = normal(rng, (B, T, D), scale=5.0) + 3.0
  with nnx.use_eager_sharding(False):
    rms_norm, layer_norm = RMSNorm(D, dtype=jnp.bfloat16), LayerNorm(D)
  rms = rms_norm(x.astype(jnp.bfloat16))
  assert rms.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.sqrt(np.mean(np.asarray(rms, np.float32) ** 2, -1)), 1.0, rtol=2e-2)
  ln = np.asarray(layer_norm(x))
  np.testing.assert_allclose(ln.mean(-1), 0.0, atol=1e-5)
  np.testing.assert_allclose(ln.std(-1), 1.0, rtol=1e-3)


def test_tied_head_is_embedding_transpose(rng):
  with nnx.use_eager_sharding(False):
    emb = Embedding(50, D, rngs=rngs())
  tokens = jnp.asarray(rng.integers(0, 50, (B, T)))
  np.testing.assert_array_equal(np.asarray(emb(tokens)), np.asarray(emb.embedding[...])[np.asarray(tokens)])
  x = normal(rng, (B, T, D))
  logits = emb.attend(x)
  assert logits.dtype == jnp.float32
  assert_close(logits, x @ emb.embedding[...].T, dtype=jnp.float32, reduction_len=D)
