"""The Hopper (Mosaic GPU) attention forward and backward: they lower for sm90 on this CPU-only machine
(jax.export traces and lowers the kernels to Mosaic GPU MLIR, which checks shapes, layouts, wgmma operands and the
shared-memory budget), the backward's block ranges cover every visible pair, the support check refuses what the
kernels do not cover, on CPU Mosaic GPU's interpreter runs the kernels' bodies against the reference, and on an
sm90 GPU they match the float32 reference in outputs, lse and all three gradients.

Letters: B batch, T query length, S key length, H query heads, K kv heads, D head dim.
"""

import functools
from unittest import mock

import jax
import jax.numpy as jnp
import pytest

import numpy as np

from pallas_kernels.attention import api, hopper, hopper_backward
from pallas_kernels.attention import reference as ref
from pallas_kernels.attention.masking import MaskSpec
from pallas_kernels.common import mosaic
from pallas_kernels.common.layout import round_up
from tests.pallas_kernels import mosaic_interpreter
from tests.pallas_kernels.test_attention_kernel import _check_against_reference, _inputs
from tests.tolerances import assert_close, normal

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
    "gqa_segments_window_d64": dict(window=70, segments=True, T=300, S=300, H=8, K=2, D=64),
    "segments_skipping_documents": dict(causal=True, segments=True, T=200, S=300,
                                        block_sizes=hopper.BlockSizes(skip_other_documents=True)),
    "right_window_only_softcap": dict(window_right=40, softcap=20.0, T=130, S=190),
    "persistent_segments": dict(causal=True, segments=True, T=1024, S=1024,
                                block_sizes=hopper.BlockSizes(persistent_ctas=132)),
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


@pytest.mark.parametrize("name", LOWERING)
def test_forward_and_backward_lower_for_sm90(name):
  """The custom_vjp wires the Hopper forward to the Hopper dQ and dK/dV kernels (no Triton left)."""
  args, options = _shapes(**LOWERING[name])

  def loss(q, k, v, *ids):
    segments = dict(segment_ids=ids[0], kv_segment_ids=ids[1]) if ids else {}
    out, lse = hopper.flash_attention(q, k, v, return_lse=True, **segments, **options)
    return jnp.sum(out.astype(jnp.float32)) + jnp.sum(jnp.where(jnp.isinf(lse), 0.0, lse))

  text = jax.export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=("cuda",))(*args).mlir_module()
  for kernel in ("fwd", "dq", "dkv"):
    assert f"flash_attention_hopper_{kernel}_mosaic_gpu" in text, f"no Mosaic GPU {kernel} kernel"
  assert "triton" not in text


def _visible_pairs(mask: MaskSpec, t_pad: int, s_pad: int):
  """[t_pad, s_pad] booleans: the pairs the reference sees (padding rows see nothing)."""
  q_pos = np.arange(t_pad)[:, None] + mask.q_offset
  visible = np.asarray(mask.visible(jnp.asarray(q_pos), jnp.arange(s_pad)[None, :]))
  return visible & (np.arange(t_pad)[:, None] < mask.q_len)


RANGE_CASES = [(37, 37), (300, 300), (70, 333), (300, 150), (12, 5), (1100, 1100), (700, 800)]
MASKS = [dict(causal=True), dict(causal=False), dict(causal=True, window=100), dict(causal=False, window=50,
         window_right=20), dict(causal=False, window_right=30), dict(causal=True, window=1),
         dict(causal=False, window=64, window_right=0)]


@pytest.mark.parametrize("lengths", RANGE_CASES)
@pytest.mark.parametrize("mask_options", MASKS)
def test_backward_block_ranges_cover_visible_pairs(lengths, mask_options):
  """Each consumer's blocks [lo, hi) hold every pair its rows/keys see, lie in its CTA's streamed range, and the
  blocks it runs unmasked, [full_lo, full_hi), hide nothing from a real row."""
  q_len, kv_len = lengths
  mask = MaskSpec(scale=1.0, softcap=None, q_offset=kv_len - q_len, q_len=q_len, kv_len=kv_len,
                  **dict(dict(window=None, window_right=None), **mask_options))
  blocks, cta_rows, wg_rows = hopper_backward.BlockSizes(), 128, 64
  t_pad, s_pad = round_up(q_len, cta_rows), round_up(kv_len, cta_rows)
  plan = hopper_backward._Plan(mask=mask, blocks=blocks, heads=1, kv_heads=1, head_dim=64, dtype=jnp.bfloat16,
                               t_pad=t_pad, s_pad=s_pad, segmented=False)
  visible = _visible_pairs(mask, t_pad, s_pad)
  for transposed, step in ((False, blocks.block_k_dq), (True, blocks.block_q_dkv)):
    pairs = visible.T if transposed else visible  # rows: what a consumer owns; columns: what it streams
    for start in range(0, pairs.shape[0], cta_rows):
      if transposed:
        cta = hopper_backward._Cta(0, 0, start, *mask.q_block_range(start, cta_rows, step))
        ranges = hopper_backward._dkv_query_blocks
      else:
        cta = hopper_backward._Cta(0, 0, start, *mask.kv_block_range(start, cta_rows, step))
        ranges = hopper_backward._dq_key_blocks
      for first in (start, start + wg_rows):
        lo, full_lo, full_hi, hi = (int(x) for x in ranges(plan, cta, first))
        assert int(cta.lo) <= lo <= full_lo <= full_hi <= hi <= int(cta.hi)
        for j in range(pairs.shape[1] // step):
          tile = pairs[first:first + wg_rows, j * step:(j + 1) * step]
          assert lo <= j < hi or not tile.any(), f"{transposed=} {first=}: block {j} sees pairs, not in [{lo}, {hi})"
          if full_lo <= j < full_hi:  # padding query rows have P = 0 and need no mask; padding keys do
            real = tile[:, :max(0, q_len - j * step)] if transposed else tile[:max(0, q_len - first)]
            assert real.all(), f"{transposed=} {first=}: block {j} runs unmasked but hides pairs"


def test_block_sizes_are_checked():
  with pytest.raises(ValueError, match="shared memory"):
    hopper.BlockSizes(num_stages=4).check(head_dim=128, itemsize=2)
  with pytest.raises(ValueError, match="multiples of 64"):
    hopper.BlockSizes(block_k=96).check(head_dim=64, itemsize=2)
  for head_dim in (64, 128):
    hopper.BlockSizes.for_shape(head_dim=head_dim).check(head_dim, itemsize=2)


def test_backward_block_sizes_are_checked():
  with pytest.raises(ValueError, match="shared memory"):
    hopper_backward.BlockSizes(block_q_dkv=128, num_stages=4).check(head_dim=128, itemsize=2)
  with pytest.raises(ValueError, match="64 or 128"):
    hopper_backward.BlockSizes(block_k_dq=96).check(head_dim=64, itemsize=2)
  with pytest.raises(ValueError, match="at least 2"):
    hopper_backward.BlockSizes(num_stages=1).check(head_dim=64, itemsize=2)
  for head_dim in (64, 128):
    hopper_backward.BlockSizes.for_shape(head_dim=head_dim).check(head_dim, itemsize=2)


def test_support_check_names_what_it_refuses():
  ok = dict(backend="gpu", head_dim=128, dtype=jnp.bfloat16)
  with mock.patch.object(mosaic, "is_sm90", lambda: True):
    assert hopper.supports(**ok) is None
    assert hopper.supports(**dict(ok, dtype=jnp.float16, segmented=True, softcapped=True)) is None
    assert "float32" in hopper.supports(**dict(ok, dtype=jnp.float32))
    assert hopper.supports(**dict(ok, head_dim=80)) is None  # zero-padded to 128 (test_attention_head_dims.py)
    assert "head_dim=256" in hopper.supports(**dict(ok, head_dim=256))
    assert "backend='cpu'" in hopper.supports(**dict(ok, backend="cpu"))
  with mock.patch.object(mosaic, "is_sm90", lambda: False):
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
    assert api.ATTENTION.select("auto", **options).name == ("hopper" if mosaic.is_sm90() else "pallas")
    assert api.ATTENTION.select("auto", **dict(options, dtype=jnp.float32)).name == "pallas"


# The kernels' bodies on CPU, forward and both backward kernels, by Mosaic GPU's interpreter
# (tests/pallas_kernels/mosaic_interpreter.py): small, about 30 s each.
INTERPRETED = {
    "gqa_causal_documents": dict(causal=True, segments=True, T=130, S=200, H=2, K=1, D=64, dtype=jnp.bfloat16),
    "window_both_sides_softcap_f16": dict(window=50, window_right=20, softcap=10.0, T=70, S=140, H=1, K=1, D=128,
                                          dtype=jnp.float16),
    # 64-key blocks: the first CTA's 128 rows lie in one document [0, 170), whose key blocks are [0, 3) with block 1
    # wholly inside (run without the element mask) and block 2 shared with the next document (masked).
    "one_document_cta_noncausal_k64": dict(documents=(170, 86), T=256, S=256, B=1, H=2, K=1, D=64,
                                           dtype=jnp.bfloat16, block_sizes=hopper.BlockSizes(block_k=64)),
    # The persistent forward: 3 CTAs over 4 and 6 query tiles, one K/V ring across a CTA's tiles whose slot count
    # runs on from tile to tile (3 stages at D 64, 2 at D 128, key ranges of different lengths).
    "persistent_gqa_causal_documents": dict(causal=True, segments=True, T=130, S=200, B=1, H=2, K=1, D=64,
                                            dtype=jnp.bfloat16,
                                            block_sizes=hopper.BlockSizes(num_stages=3, persistent_ctas=3)),
    "persistent_window_d128": dict(window=100, T=300, S=300, B=1, H=2, K=2, D=128, dtype=jnp.bfloat16,
                                   block_sizes=hopper.BlockSizes(persistent_ctas=3)),
}


@mosaic_interpreter.on_cpu
@pytest.mark.parametrize("case", INTERPRETED)
def test_kernels_in_the_interpreter_match_reference(rng, case):
  case = dict(INTERPRETED[case])
  kernel = functools.partial(hopper.flash_attention, block_sizes=case.pop("block_sizes", None))
  if "documents" in case:
    ids = jnp.asarray(np.repeat(np.arange(len(case["documents"])), case.pop("documents"))[None], jnp.int32)
    case.update(segment_ids=ids, kv_segment_ids=ids)
  with mosaic_interpreter.interpreted():
    _check_against_reference(rng, kernel, case)


_on_sm90 = pytest.mark.skipif(jax.default_backend() != "gpu" or not mosaic.is_sm90(),
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
    "gqa_segments_window": dict(window=70, segments=True, T=300, S=300, H=8, K=2, D=64, dtype=jnp.bfloat16),
    "causal_softcap_d128_f16": dict(causal=True, softcap=10.0, T=200, S=260, D=128, dtype=jnp.float16),
    "right_window_only": dict(window_right=40, T=190, S=130, D=128, dtype=jnp.bfloat16),
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


@pytest.mark.gpu
@_on_sm90
@pytest.mark.parametrize("ctas", [7, 132])
@pytest.mark.parametrize("case", ["long_causal", "gqa_segments_window", "causal_d128", "empty_rows"])
def test_persistent_forward_matches_reference(rng, case, ctas):
  """The persistent forward (BlockSizes.persistent_ctas): a few CTAs walking many tiles, and one per SM."""
  blocks = hopper.BlockSizes(persistent_ctas=ctas, num_stages=3 if CASES[case]["D"] <= 64 else 2)
  kernel_fn = lambda *args, **kw: hopper.flash_attention(*args, block_sizes=blocks, **kw)
  _check_against_reference(rng, kernel_fn, CASES[case])


@pytest.mark.gpu
@_on_sm90
@pytest.mark.parametrize("case", ["gqa_causal_window", "mqa_softcap", "segments"])
def test_backward_with_long_steps_and_short_ring(rng, case):
  """128-long pipeline steps in both backward kernels with a 2-deep ring, against the reference's vjp."""
  (q, k, v), options, dtype = _inputs(rng, **CASES[case])
  blocks = hopper_backward.BlockSizes(block_q_dkv=128, block_k_dq=128, num_stages=2)
  out, lse = jax.jit(lambda q, k, v: hopper.flash_attention(q, k, v, return_lse=True, **options))(q, k, v)
  d_out, d_lse = normal(rng, out.shape, dtype), normal(rng, lse.shape, jnp.float32)
  backward = jax.jit(lambda *args: hopper_backward.flash_attention_backward(*args, block_sizes=blocks, **options))
  got = backward(q, k, v, out, lse, d_out, d_lse)
  upcast = [x.astype(jnp.float32) for x in (q, k, v)]
  reference_vjp = jax.jit(lambda q, k, v, d_out, d_lse: jax.vjp(
      lambda *qkv: ref.attention(*qkv, return_lse=True, **options), q, k, v)[1]((d_out, d_lse)))
  want = reference_vjp(*upcast, d_out.astype(jnp.float32), d_lse)
  for name, g, w in zip(("dq", "dk", "dv"), got, want):
    assert_close(g, w, dtype=dtype, reduction_len=k.shape[1], name=name, scale=4.0)


@pytest.mark.gpu
@_on_sm90
def test_backward_is_causal(rng):
  """With causal masks, a loss on the first rows has exactly zero gradient for every later key and value."""
  (q, k, v), options, _ = _inputs(rng, causal=True, T=520, S=520, H=4, K=2, D=128, dtype=jnp.bfloat16)
  first = 200
  loss = lambda q, k, v: jnp.sum(hopper.flash_attention(q, k, v, causal=True)[:, :first].astype(jnp.float32))
  dq, dk, dv = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  assert not bool(jnp.any(dk[:, first:])) and not bool(jnp.any(dv[:, first:])), "later keys got gradients"
  assert not bool(jnp.any(dq[:, first:])), "later queries got gradients"
  assert bool(jnp.all(jnp.isfinite(dq))) and bool(jnp.any(dk[:, :first])), "no gradient reached the first keys"
