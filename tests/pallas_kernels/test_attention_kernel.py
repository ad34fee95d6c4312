"""Attention kernels against the reference: outputs, log-sum-exp and all three gradients, over a grid of options.

The same test body runs every kernel in KERNELS: the portable Pallas kernel in interpret mode on CPU (CI) and
through Triton on the GPU machine (kernel issues append "hopper" there). The oracle is the float32 reference on
the same (rounded) inputs; the reference itself is checked against numpy float64 in test_attention_reference.py.

Letters: B batch, T query length, S key length, H query heads, K kv heads, D head dim.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.attention import api, pallas
from pallas_kernels.attention import reference as ref
from pallas_kernels.common import mosaic
from tests.tolerances import assert_close, normal

KERNELS = ["pallas"]

# Defaults B=2, T=S=37, H=4, K=2, D=64, float32.
CASES = {
    "causal_d64": dict(causal=True, T=100, S=100),
    "softcap_d80_bf16": dict(softcap=5.0, D=80, dtype=jnp.bfloat16),
    "causal_window_d128": dict(causal=True, window=17, D=128, T=130, S=130, H=2, K=1),
    "mqa_segments": dict(causal=True, H=4, K=1, segments=True, T=64, S=64),
    "window_both_sides_f16": dict(window=9, window_right=4, T=50, S=50, dtype=jnp.float16),
    "suffix_queries_segments": dict(causal=True, T=7, S=45, segments=True),
    "empty_rows": dict(causal=True, T=12, S=5),  # queries before the first key see nothing
}


def _inputs(rng, *, B=2, T=37, S=37, H=4, K=2, D=64, dtype=jnp.float32, segments=False, **options):
  q, k, v = normal(rng, (B, T, H, D), dtype), normal(rng, (B, S, K, D), dtype), normal(rng, (B, S, K, D), dtype)
  if segments:
    kv_segment_ids = jnp.asarray(np.sort(rng.integers(0, 3, (B, S)), axis=1), jnp.int32)
    options.update(segment_ids=kv_segment_ids[:, S - T:], kv_segment_ids=kv_segment_ids)
  return (q, k, v), options, dtype


def _outputs_and_grads(attention, q, k, v, cotangent_o, cotangent_lse, **options):
  """(out, lse) and d(<out, c_o> + <lse, c_lse>)/d(q, k, v): the lse cotangent checks that path too. One jitted
  program: run eagerly, every op and kernel call compiles on its own (tens of seconds per case on the GPU)."""
  def loss(q, k, v):
    out, lse = attention(q, k, v, return_lse=True, **options)
    finite_lse = jnp.where(jnp.isinf(lse), 0.0, lse)
    return jnp.sum(out.astype(jnp.float32) * cotangent_o) + jnp.sum(finite_lse * cotangent_lse), (out, lse)

  grads, (out, lse) = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return out, lse, grads


def _check_against_reference(rng, kernel_fn, case):
  (q, k, v), options, dtype = _inputs(rng, **case)
  cotangent_o = normal(rng, q.shape, jnp.float32)
  cotangent_lse = normal(rng, (q.shape[0], q.shape[2], q.shape[1]), jnp.float32)
  got = _outputs_and_grads(kernel_fn, q, k, v, cotangent_o, cotangent_lse, **options)
  upcast = [x.astype(jnp.float32) for x in (q, k, v)]
  want = _outputs_and_grads(ref.attention, *upcast, cotangent_o, cotangent_lse, **options)
  length = k.shape[1]
  out, lse, grads = got
  assert_close(out, want[0], dtype=dtype, reduction_len=length, name="out")
  assert bool(jnp.all(jnp.isinf(lse) == jnp.isinf(want[1]))), "lse: -inf rows differ"
  assert_close(jnp.where(jnp.isinf(lse), 0.0, lse), jnp.where(jnp.isinf(want[1]), 0.0, want[1]), dtype=dtype,
               reduction_len=length, name="lse")
  for name, g, w in zip(("dq", "dk", "dv"), grads, want[2]):
    assert_close(g, w, dtype=dtype, reduction_len=length, name=name, scale=4.0)


@pytest.mark.parametrize("implementation", KERNELS)
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_reference(rng, case, implementation):
  kernel_fn = lambda *args, **kw: api.attention(*args, implementation=implementation, **kw)
  _check_against_reference(rng, kernel_fn, CASES[case])


@pytest.mark.parametrize("case", ["causal_window_d128", "suffix_queries_segments"])
def test_small_blocks_skip_masked_blocks_correctly(rng, case):
  """Many 16-row blocks: the loop bounds that skip fully masked blocks must not skip a visible one."""
  blocks = pallas.BlockSizes(16, 16, 16, 16, 16, 16)
  kernel_fn = lambda *args, **kw: pallas.flash_attention(*args, block_sizes=blocks, **kw)
  _check_against_reference(rng, kernel_fn, CASES[case])


def test_auto_takes_the_kernel_only_where_it_is_fast():
  chosen = api.ATTENTION.select("auto", head_dim=64).name
  assert chosen == ("pallas" if jax.default_backend() in ("gpu", "tpu") else "reference")
  with pytest.raises(ValueError, match="head_dim=512"):
    api.ATTENTION.select("pallas", head_dim=512)


@pytest.mark.gpu
@pytest.mark.parametrize("implementation", ["pallas", "hopper"])
def test_kernel_memory_is_linear_in_sequence_length(implementation):
  """Forward+backward at S=65536 keeps no S×S buffer: the compiled temp memory is far below S² bytes."""
  if implementation == "hopper" and not mosaic.is_sm90():
    pytest.skip("the hopper kernels need an sm90 GPU")
  seq, heads, dim = 65536, 4, 64
  shape = jax.ShapeDtypeStruct((1, seq, heads, dim), jnp.bfloat16)
  loss = lambda q, k, v: jnp.sum(api.attention(q, k, v, causal=True, implementation=implementation)
                                 .astype(jnp.float32))
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(shape, shape, shape).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp < 64 * seq * heads * dim, f"temp memory {temp} bytes is not linear in S={seq}"


@pytest.mark.parametrize("implementation", KERNELS)
def test_decode_through_api_matches_reference(rng, implementation):
  batch, max_len, heads, kv_heads, dim = 3, 40, 4, 2, 64
  q = normal(rng, (batch, heads, dim))
  k_cache, v_cache = normal(rng, (batch, max_len, kv_heads, dim)), normal(rng, (batch, max_len, kv_heads, dim))
  lengths = jnp.asarray([0, 17, max_len], jnp.int32)
  got = api.attention_decode(q, k_cache, v_cache, lengths, window=9, implementation=implementation)
  want = ref.attention_decode(q, k_cache, v_cache, lengths, window=9)
  assert_close(got, want, dtype=jnp.float32, reduction_len=max_len, name="decode out")
