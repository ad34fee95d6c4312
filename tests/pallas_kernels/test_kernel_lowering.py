"""The portable kernels lower for TPU (jax.export, serialised Mosaic) and for GPU (Triton), forward and backward,
on this CPU-only machine: the CI check that one Pallas source serves every backend."""

import functools
from unittest import mock

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.attention import pallas as attention_pallas
from pallas_kernels.based import pallas as based_pallas
from pallas_kernels.based import parallel as based_parallel
from pallas_kernels.long_conv import pallas as long_conv_pallas
from pallas_kernels.lolcats import pallas as lolcats_pallas


def _lowers(fn, args, platform: str) -> str:
  """The lowered module's text, with the kernel's backend choice forced to `platform`."""
  backend = {"cuda": "gpu"}.get(platform, platform)
  with mock.patch.object(jax, "default_backend", lambda: backend):
    if platform == "tpu":
      return jax.export.export(jax.jit(fn), platforms=("tpu",))(*args).mlir_module()
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def _forward_and_backward(fn):
  """A function returning the outputs and the gradients wrt the float arguments of `fn`."""
  def both(*args):
    out, vjp = jax.vjp(fn, *args)
    return out, vjp(jax.tree.map(jnp.ones_like, out))
  return both


ATTENTION_OPTIONS = {
    "causal": dict(causal=True),
    "noncausal_softcap": dict(softcap=30.0),
    "window_segments": dict(causal=True, window=64, segment_ids=True),
    "gqa_window_right": dict(window=32, window_right=16, kv_heads=1),
}


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("name", ATTENTION_OPTIONS)
def test_attention_lowers(platform, name):
  options = dict(ATTENTION_OPTIONS[name])
  kv_heads = options.pop("kv_heads", 2)
  with_segments = options.pop("segment_ids", False)
  batch, seq, heads, dim = 2, 256, 4, 128
  q = jax.ShapeDtypeStruct((batch, seq, heads, dim), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((batch, seq, kv_heads, dim), jnp.bfloat16)
  segs = (jax.ShapeDtypeStruct((batch, seq), jnp.int32),) if with_segments else ()

  def attention(q, k, v, *segment_ids):
    seg = segment_ids[0] if segment_ids else None
    return attention_pallas.flash_attention(q, k, v, segment_ids=seg, **options)

  def fwd_bwd(q, k, v, *segment_ids):
    return _forward_and_backward(lambda q, k, v: attention(q, k, v, *segment_ids))(q, k, v)

  text = _lowers(fwd_bwd, (q, kv, kv, *segs), platform)
  marker = "tpu_custom_call" if platform == "tpu" else "triton"
  assert text.count(marker) >= 3, f"expected forward, dq and dkv kernels in the {platform} module"


BASED_OPTIONS = {
    "normalized": dict(),
    "unnormalized_segments": dict(normalize=False, segment_ids=True),
    "f24_dv128": dict(feature_dim=24, value_dim=128),
}


@pytest.mark.parametrize("kernel", [functools.partial(based_pallas.based_chunked, chunk=64),
                                    based_parallel.based_parallel], ids=["chunked", "parallel"])
@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("name", BASED_OPTIONS)
def test_based_lowers(platform, name, kernel):
  options = dict(BASED_OPTIONS[name])
  f, d = options.pop("feature_dim", 16), options.pop("value_dim", 64)
  with_segments = options.pop("segment_ids", False)
  batch, seq, heads = 2, 256, 4
  qk = jax.ShapeDtypeStruct((batch, seq, heads, f), jnp.bfloat16)
  v = jax.ShapeDtypeStruct((batch, seq, heads, d), jnp.bfloat16)
  segs = (jax.ShapeDtypeStruct((batch, seq), jnp.int32),) if with_segments else ()

  def fwd_bwd(q, k, v, *segment_ids):
    seg = segment_ids[0] if segment_ids else None
    based = functools.partial(kernel, segment_ids=seg, **options)
    return _forward_and_backward(based)(q, k, v)

  text = _lowers(fwd_bwd, (qk, qk, v, *segs), platform)
  marker = "tpu_custom_call" if platform == "tpu" else "triton"
  assert text.count(marker) >= 3, f"expected forward, dq and dkv kernels in the {platform} module"


# long_conv: one pass (N = 2048 on chip) and three passes (N = 16384: an outer factor of 32 on GPU, 16 on TPU,
# around the on-chip transform), with both gates and the skip, and without any.
LONG_CONV_OPTIONS = {
    "one_pass_gated": (1000, True),
    "three_passes_gated": (5000, True),
    "one_pass_plain": (1000, False),
}


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("name", LONG_CONV_OPTIONS)
def test_long_conv_lowers(platform, name):
  length, gated = LONG_CONV_OPTIONS[name]
  batch, channels = 2, 256
  u = jax.ShapeDtypeStruct((batch, length, channels), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((length, channels), jnp.float32)
  skip = jax.ShapeDtypeStruct((channels,), jnp.float32)
  args = (u, k, skip, u, u) if gated else (u, k)
  text = _lowers(_forward_and_backward(long_conv_pallas.gated_long_conv), args, platform)
  marker = "tpu_custom_call" if platform == "tpu" else "triton"
  passes = 2 if length < 4096 else 3 + 4  # forward and backward; three passes: 3 forward, 4 backward
  assert text.count(marker) >= passes, f"expected {passes} kernels in the {platform} module"


# lolcats: GQA with a D that Triton pads (96 -> 128) and hedgehog features X = 2·64, and MHA at the smallest window.
LOLCATS_OPTIONS = {"gqa_w64": (64, 4, 2, 96, 128), "mha_w16": (16, 2, 2, 64, 32)}


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("name", LOLCATS_OPTIONS)
def test_lolcats_lowers(platform, name):
  window, heads, kv_heads, d, x = LOLCATS_OPTIONS[name]
  batch, seq = 2, 256
  q = jax.ShapeDtypeStruct((batch, seq, heads, d), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((batch, seq, kv_heads, d), jnp.bfloat16)
  f = jax.ShapeDtypeStruct((batch, seq, heads, x), jnp.bfloat16)
  kernel = functools.partial(lolcats_pallas.lolcats_chunked, window=window)
  text = _lowers(_forward_and_backward(kernel), (q, kv, kv, f, f), platform)
  marker = "tpu_custom_call" if platform == "tpu" else "triton"
  assert text.count(marker) >= 3, f"expected forward, dq and dkv kernels in the {platform} module"
