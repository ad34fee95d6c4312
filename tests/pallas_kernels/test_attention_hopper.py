"""The Hopper (Mosaic GPU) attention forward: it lowers for sm90 on this CPU-only machine (jax.export traces and
lowers the kernel to Mosaic GPU MLIR, which checks shapes, layouts, wgmma operands and the shared-memory budget),
its support check refuses what it does not cover, and on an sm90 GPU it matches the float32 reference in outputs,
lse and all three gradients (the backward is the portable kernel's).

Letters: B batch, T query length, S key length, H query heads, K kv heads, D head dim.
"""

from unittest import mock

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.attention import api, hopper
from tests.pallas_kernels.test_attention_kernel import _check_against_reference

# Shapes and options that must lower; defaults B=2, T=S=256, H=4, K=2, D=128, bfloat16.
LOWERING = {
    "noncausal_d128": dict(),
    "causal_d128": dict(causal=True),
    "causal_d64": dict(causal=True, D=64),
    "gqa_causal": dict(causal=True, H=32, K=8),
    "window_256": dict(causal=True, window=256, T=1024, S=1024),
    "window_both_sides_f16": dict(window=100, window_right=30, dtype=jnp.float16),
    "suffix_queries": dict(causal=True, T=200, S=1000),
    "odd_length_d64": dict(causal=True, T=37, S=37, D=64),
    "softcap_mqa": dict(softcap=30.0, K=1, D=64),
    "segments": dict(causal=True, segments=True, T=200, S=300),
}


def _shapes(B=2, T=256, S=256, H=4, K=2, D=128, dtype=jnp.bfloat16, segments=False, **options):
  q, kv = jax.ShapeDtypeStruct((B, T, H, D), dtype), jax.ShapeDtypeStruct((B, S, K, D), dtype)
  ids = (jax.ShapeDtypeStruct((B, T), jnp.int32), jax.ShapeDtypeStruct((B, S), jnp.int32)) if segments else ()
  return (q, kv, kv, *ids), options


@pytest.mark.parametrize("name", LOWERING)
def test_forward_lowers_for_sm90(name):
  args, options = _shapes(**LOWERING[name])

  def forward(q, k, v, *ids):
    segments = dict(segment_ids=ids[0], kv_segment_ids=ids[1]) if ids else {}
    return hopper.flash_attention(q, k, v, return_lse=True, **segments, **options)

  text = jax.export.export(jax.jit(forward), platforms=("cuda",))(*args).mlir_module()
  assert text.count("mosaic_gpu") >= 1, "expected the Mosaic GPU kernel in the module"


def test_forward_and_backward_lower_for_gpu():
  """The custom_vjp wires the Hopper forward to the portable backward (Triton dq and dk/dv kernels on GPU)."""
  args, options = _shapes(**LOWERING["gqa_causal"])

  def loss(q, k, v):
    out, lse = hopper.flash_attention(q, k, v, return_lse=True, **options)
    return jnp.sum(out.astype(jnp.float32)) + jnp.sum(lse)

  with mock.patch.object(jax, "default_backend", lambda: "gpu"):  # the portable backward picks Triton
    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("mosaic_gpu") >= 1 and text.count("triton") >= 2


def test_block_sizes_are_checked():
  with pytest.raises(ValueError, match="shared memory"):
    hopper.BlockSizes(num_stages=4).check(head_dim=128, itemsize=2)
  with pytest.raises(ValueError, match="multiples of 64"):
    hopper.BlockSizes(block_k=96).check(head_dim=64, itemsize=2)
  for head_dim in (64, 128):
    hopper.BlockSizes.for_shape(head_dim=head_dim).check(head_dim, itemsize=2)


def test_support_check_names_what_it_refuses():
  ok = dict(backend="gpu", head_dim=128, dtype=jnp.bfloat16)
  with mock.patch.object(hopper, "_is_sm90", lambda: True):
    assert hopper.supports(**ok) is None
    assert hopper.supports(**dict(ok, dtype=jnp.float16, segmented=True, softcapped=True)) is None
    assert "float32" in hopper.supports(**dict(ok, dtype=jnp.float32))
    assert "head_dim=80" in hopper.supports(**dict(ok, head_dim=80))
    assert "backend='cpu'" in hopper.supports(**dict(ok, backend="cpu"))
  with mock.patch.object(hopper, "_is_sm90", lambda: False):
    assert "sm90" in hopper.supports(**ok)


def test_auto_takes_hopper_first_on_gpu_only():
  names = api.ATTENTION.names
  assert names.index("hopper") < names.index("pallas")
  options = dict(head_dim=128, dtype=jnp.bfloat16, causal=True)
  if jax.default_backend() != "gpu":
    assert api.ATTENTION.select("auto", **options).name == "reference"
    with pytest.raises(ValueError, match="hopper"):
      api.ATTENTION.select("hopper", **options)
  else:
    assert api.ATTENTION.select("auto", **options).name == ("hopper" if hopper._is_sm90() else "pallas")
    assert api.ATTENTION.select("auto", **dict(options, dtype=jnp.float32)).name == "pallas"


_on_sm90 = pytest.mark.skipif(jax.default_backend() != "gpu" or not hopper._is_sm90(),
                              reason="needs an sm90 (Hopper) GPU")

# Cases the Hopper kernel covers (16-bit, D 64/128); the sizes cross block and CTA edges.
CASES = {
    "causal_d128": dict(causal=True, T=300, S=300, D=128, dtype=jnp.bfloat16),
    "noncausal_d64_f16": dict(T=200, S=333, D=64, dtype=jnp.float16),
    "gqa_causal_window": dict(causal=True, window=100, T=400, S=400, H=8, K=2, D=128, dtype=jnp.bfloat16),
    "window_both_sides": dict(window=50, window_right=20, T=260, S=260, D=64, dtype=jnp.bfloat16),
    "suffix_queries": dict(causal=True, T=70, S=333, D=128, dtype=jnp.bfloat16),
    "more_queries_than_keys": dict(causal=True, T=300, S=150, D=64, dtype=jnp.float16),
    "empty_rows": dict(causal=True, T=12, S=5, D=64, dtype=jnp.bfloat16),  # queries before the first key see nothing
    "mqa_softcap": dict(softcap=5.0, H=4, K=1, T=100, S=200, D=64, dtype=jnp.bfloat16),
    "segments": dict(causal=True, segments=True, T=64, S=300, D=128, dtype=jnp.bfloat16),
    "long_causal": dict(causal=True, T=1100, S=1100, H=2, K=1, D=128, dtype=jnp.bfloat16),
}


@pytest.mark.gpu
@_on_sm90
@pytest.mark.parametrize("case", list(CASES))
def test_hopper_matches_reference(rng, case):
  kernel_fn = lambda *args, **kw: api.attention(*args, implementation="hopper", **kw)
  _check_against_reference(rng, kernel_fn, CASES[case])


@pytest.mark.gpu
@_on_sm90
def test_small_key_blocks_and_deep_ring(rng):
  """block_k = 64 with three stages: more key blocks per CTA, so the ring wraps and the producer waits on frees."""
  blocks = hopper.BlockSizes(block_k=64, num_stages=3)
  kernel_fn = lambda *args, **kw: hopper.flash_attention(*args, block_sizes=blocks, **kw)
  _check_against_reference(rng, kernel_fn, dict(causal=True, window=300, T=700, S=800, D=64, dtype=jnp.bfloat16))
