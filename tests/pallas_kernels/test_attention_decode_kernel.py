"""Flash-decoding kernels (pallas_kernels/attention/decode.py) against reference.attention_decode and a numpy
float64 loop: float32 and bfloat16, GQA 4:1 and MQA, ragged lengths with 0 and full, windows, soft-cap, several
splits; the ring-buffer variant against the reference on the unrolled cache; slots outside the visible range do
not matter; and the kernels lower for GPU (Triton) and export for TPU (Mosaic).

Runs in interpret mode on CPU and through Triton on a GPU. Letters: B batch, S cache slots (W ring slots),
H query heads, K kv heads, D head dim.
"""

import unittest.mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.attention import reference as ref
from pallas_kernels.attention.decode import BlockSizes, attention_decode, attention_decode_ring
from tests.tolerances import assert_close, normal

# Several splits and blocks per split (S=48: 3 splits of 16 slots, the last partly past some lengths).
SPLIT = BlockSizes(block_k=16, num_splits=3)
HEADS = {"gqa4": (8, 2), "mqa": (4, 1)}

# Jitted as a model calls them; also compiles each interpret-mode kernel once per configuration.
_OPTIONS = ("scale", "softcap", "window", "block_sizes")
decode = jax.jit(attention_decode, static_argnames=_OPTIONS)
decode_ring = jax.jit(attention_decode_ring, static_argnames=_OPTIONS)


def reference_decode(*args, **kwargs):
  """reference.attention_decode with exact float32 products (XLA on GPU may otherwise use TF32)."""
  with jax.default_matmul_precision("highest"):
    return ref.attention_decode(*args, **kwargs)


def numpy_decode(q, k, v, lengths, *, window=None, softcap=None):
  """out_BHD in float64 by a loop over (b, h), from the definition: position p = lengths - 1 sees s <= p,
  p - s < window."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  B, H, D = q.shape
  S, K = k.shape[1], k.shape[2]
  out = np.zeros((B, H, D))
  for b in range(B):
    p = int(lengths[b]) - 1
    keys = [s for s in range(S) if s <= p and (window is None or p - s < window)]
    for h in range(H):
      if not keys:
        continue
      kv = h // (H // K)
      logits = np.array([q[b, h] @ k[b, s, kv] for s in keys]) / np.sqrt(D)
      if softcap is not None:
        logits = softcap * np.tanh(logits / softcap)
      w = np.exp(logits - logits.max())
      out[b, h] = (w / w.sum()) @ v[b, keys, kv]
  return out


def _inputs(rng, *, B, S, H, K, D=16, dtype=jnp.float32, scale=1.0):
  return (normal(rng, (B, H, D), dtype, scale), normal(rng, (B, S, K, D), dtype, scale),
          normal(rng, (B, S, K, D), dtype))


def _lengths(rng, S):
  """Ragged: empty, one token, something in between, full."""
  return jnp.array([0, 1, int(rng.integers(2, S)), S], jnp.int32)


# (dtype, heads, window, softcap, block sizes): each interpret-mode compilation costs seconds, so the options are
# spread over a few cases rather than crossed.
DECODE_CASES = {
    "f32_gqa4_full_default_blocks": (jnp.float32, "gqa4", None, None, None),
    "bf16_gqa4_window_softcap_split": (jnp.bfloat16, "gqa4", 20, 2.0, SPLIT),
    "f32_mqa_window_split": (jnp.float32, "mqa", 5, None, SPLIT),
    "bf16_mqa_softcap_default_blocks": (jnp.bfloat16, "mqa", None, 2.0, None),
}


@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_decode_matches_reference(rng, case):
  dtype, heads, window, softcap, blocks = DECODE_CASES[case]
  H, K = HEADS[heads]
  S = 48
  q, k, v = _inputs(rng, B=4, S=S, H=H, K=K, dtype=dtype, scale=2.0)
  lengths = _lengths(rng, S)
  out = decode(q, k, v, lengths, window=window, softcap=softcap, block_sizes=blocks)
  assert out.dtype == q.dtype and out.shape == q.shape
  assert_close(out, reference_decode(q, k, v, lengths, window=window, softcap=softcap), dtype=dtype,
               reduction_len=S, name="vs reference")
  assert_close(out, numpy_decode(q, k, v, lengths, window=window, softcap=softcap), dtype=dtype,
               reduction_len=S, name="vs numpy float64")
  np.testing.assert_array_equal(np.asarray(out[0], np.float32), 0.0)  # length 0: nothing visible


def test_decode_scale_and_unaligned_shapes(rng):
  """S and D that are no whole number of blocks or powers of two (the wrapper pads), G = 3, explicit scale."""
  q, k, v = _inputs(rng, B=2, S=37, H=6, K=2, D=12)
  lengths = jnp.array([37, 20], jnp.int32)
  expected = reference_decode(q, k, v, lengths, scale=0.3, window=25)
  out = decode(q, k, v, lengths, scale=0.3, window=25, block_sizes=SPLIT)
  assert_close(out, expected, dtype=jnp.float32, reduction_len=37)


def test_decode_ignores_slots_outside_the_window(rng):
  """Slots at or past a row's length, or before its window, may hold anything: the output does not move."""
  S, window = 48, 5  # the shapes and options of DECODE_CASES["f32_mqa_window_split"]: no new compilation
  q, k, v = _inputs(rng, B=4, S=S, H=4, K=1)
  lengths = _lengths(rng, S)
  slots = jnp.arange(S)
  hidden = (slots[None, :] >= lengths[:, None]) | (slots[None, :] <= lengths[:, None] - 1 - window)
  poison = hidden[:, :, None, None]
  k2 = jnp.where(poison, 1e3 * normal(rng, k.shape), k)
  v2 = jnp.where(poison, 1e3 * normal(rng, v.shape), v)
  out = decode(q, k, v, lengths, window=window, block_sizes=SPLIT)
  out2 = decode(q, k2, v2, lengths, window=window, block_sizes=SPLIT)
  np.testing.assert_allclose(np.asarray(out2), np.asarray(out), rtol=1e-6, atol=1e-6)
  # and a visible slot does move it
  newest = (slots[None, :] == lengths[:, None] - 1)[:, :, None, None]
  out3 = decode(q, k, jnp.where(newest, v + 1.0, v), lengths, window=window, block_sizes=SPLIT)
  assert np.all(np.abs(np.asarray(out3 - out)[1:]) > 0)


def _ring(k_full, lengths, ring_len, rng):
  """The ring buffer a decoder would hold: slot w has the newest position p < length with p ≡ w (mod W);
  never-written slots hold random values."""
  B, _, K, D = k_full.shape
  ring = np.array(normal(rng, (B, ring_len, K, D)), np.float32)
  full = np.asarray(k_full)
  for b in range(B):
    for p in range(int(lengths[b])):
      ring[b, p % ring_len] = full[b, p]
  return jnp.asarray(ring, k_full.dtype)


# (dtype, heads, window, softcap, block sizes)
RING_CASES = {
    "f32_gqa4_window_W_split": (jnp.float32, "gqa4", None, None, BlockSizes(block_k=16, num_splits=2)),
    "bf16_mqa_window_11_softcap_default_blocks": (jnp.bfloat16, "mqa", 11, 2.5, None),
}


@pytest.mark.parametrize("case", list(RING_CASES))
def test_ring_matches_reference_on_unrolled_cache(rng, case):
  dtype, heads, window, softcap, blocks = RING_CASES[case]
  H, K = HEADS[heads]
  W, S = 32, 100
  q, k_full, v_full = _inputs(rng, B=5, S=S, H=H, K=K, dtype=dtype)
  # empty, before the ring fills, exactly full, wrapped once mid-ring, wrapped several times
  lengths = jnp.array([0, 7, W, W + int(rng.integers(1, W)), S], jnp.int32)
  k_ring, v_ring = _ring(k_full, lengths, W, rng), _ring(v_full, lengths, W, rng)
  expected = reference_decode(q, k_full, v_full, lengths, window=W if window is None else window,
                                  softcap=softcap)
  out = decode_ring(q, k_ring, v_ring, lengths, window=window, softcap=softcap, block_sizes=blocks)
  assert_close(out, expected, dtype=dtype, reduction_len=W)


def test_ring_window_longer_than_ring_raises(rng):
  q, k, v = _inputs(rng, B=2, S=16, H=4, K=2)
  with pytest.raises(ValueError, match="window"):
    attention_decode_ring(q, k, v, jnp.array([40, 13], jnp.int32), window=17)


def _gqa_call(ring: bool):
  q = jnp.zeros((2, 8, 64), jnp.bfloat16)
  cache = jnp.zeros((2, 256, 2, 64), jnp.bfloat16)
  lengths = jnp.array([3, 200], jnp.int32)
  if ring:
    fn = lambda q, k, v, n: attention_decode_ring(q, k, v, n, window=100, softcap=30.0)
  else:
    fn = lambda q, k, v, n: attention_decode(q, k, v, n, window=100, softcap=30.0)
  return fn, (q, cache, cache, lengths)


@pytest.mark.parametrize("ring", [False, True], ids=["linear", "ring"])
def test_lowers_for_gpu_triton(ring):
  fn, args = _gqa_call(ring)
  with unittest.mock.patch.object(jax, "default_backend", return_value="gpu"):
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert "attention_decode" in text


@pytest.mark.parametrize("ring", [False, True], ids=["linear", "ring"])
def test_exports_for_tpu(ring):
  fn, args = _gqa_call(ring)
  with unittest.mock.patch.object(jax, "default_backend", return_value="tpu"):
    exported = jax.export.export(jax.jit(fn), platforms=("tpu",))(*args)
  assert "tpu_custom_call" in exported.mlir_module()
