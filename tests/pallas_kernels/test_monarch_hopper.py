"""The Hopper Monarch forward (pallas_kernels/monarch/hopper.py). On CPU: its schedule, replayed step by step in
numpy over the slabs the kernel reads, equals the dense matrix (the permutation folded into the slabs, the chunk
and block bookkeeping); it lowers for CUDA with its backward; it refuses what it does not cover. On an H100
(marked gpu): the kernel against the float32 oracle, forward and gradients, through the api by name."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.common import mosaic
from pallas_kernels.monarch import api, block_pairs, hopper, reference
from tests.pallas_kernels.test_monarch_reference import dense_np
from tests.tolerances import assert_close, normal

# name -> (w1 shape [K, Q, P], w2 shape [L, S, R], tokens); C = Q / L channels per pair.
SHAPES = {
    "c2_groups_of_32": ((4, 8, 80), (4, 96, 8), 37),        # C 2: 32 input blocks' slabs would share a chunk
    "c16_k_c_not_a_chunk": ((2, 32, 64), (2, 70, 32), 5),    # K·C = 32: one chunk, half padding; S 70
    "c48_padded_to_64": ((3, 96, 64), (2, 128, 144), 130),   # L != K, C 48 -> 64, two token tiles
    "c64": ((4, 256, 64), (4, 64, 256), 19),
    "c128_two_chunks_per_block": ((4, 512, 128), (4, 192, 512), 3),
}


def _replay(x, w1, w2, blocks):
  """The kernel's schedule in float64 numpy: stage 1 step by step through hopper._first_step and the first-factor
  slabs, u rounded to nothing, then stage 2 through the second-factor slabs."""
  plan = hopper._plan(w1.shape, w2.shape, x.dtype, blocks)
  k, _, p = w1.shape
  l, s, _ = w2.shape
  p_pad, s_pad = plan.p_steps * hopper.CHUNK, plan.y_steps * blocks.block_y
  x_TKP = np.pad(np.asarray(x, np.float64).reshape(-1, k, p), ((0, 0), (0, 0), (0, p_pad - p)))
  a_LKPC, b_LKCS = block_pairs.forward_pairs(w1, w2, c_pad=plan.c_pad, p_pad=p_pad, s_pad=s_pad)
  first = np.asarray(hopper._first_slabs(a_LKPC, plan), np.float64)
  second = np.asarray(hopper._second_slabs(b_LKCS, plan), np.float64)
  assert first.shape == (l, plan.chunks, plan.group, p_pad, hopper.CHUNK)
  assert second.shape == (l, plan.chunks, hopper.CHUNK, s_pad)
  per_chunk = plan.group * plan.p_steps
  outputs = []
  for block in range(l):
    chunks = []
    for r in range(plan.chunks):
      acc = 0.0
      for i in range(per_chunk):
        step_r, g, pc, kk = (int(v) for v in hopper._first_step(plan, r * per_chunk + i))
        assert step_r == r
        cols = slice(pc * hopper.CHUNK, (pc + 1) * hopper.CHUNK)
        acc = acc + x_TKP[:, kk, cols] @ first[block, r, g, cols]
      chunks.append(acc)
    u = np.concatenate(chunks, axis=1)
    outputs.append(u @ second[block].reshape(-1, s_pad))
  return np.stack(outputs, axis=1)[:, :, :s].reshape(x.shape[0], l * s)


@pytest.mark.parametrize("block_y", [64, 128])
@pytest.mark.parametrize("name", SHAPES)
def test_the_schedule_over_its_slabs_is_the_dense_product(rng, name, block_y):
  w1_shape, w2_shape, tokens = SHAPES[name]
  x, w1, w2 = normal(rng, (tokens, w1_shape[0] * w1_shape[2])), normal(rng, w1_shape), normal(rng, w2_shape)
  got = _replay(x, w1, w2, hopper.BlockSizes(block_y=block_y))
  np.testing.assert_allclose(got, np.asarray(x, np.float64) @ dense_np(w1, w2).T, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not mosaic.interpreter_available() or jax.default_backend() != "cpu",
                    reason="the interpreter on CPU (jax 0.10.2 has it); on a GPU the kernel itself runs below")
@pytest.mark.parametrize("name", SHAPES)
def test_the_kernel_in_the_interpreter_is_the_dense_product(rng, name):
  """The kernel body itself (its barriers, TMA copies, rings and wgmmas), run on CPU by Mosaic GPU's interpreter,
  in bf16 against the float64 dense product."""
  w1_shape, w2_shape, tokens = SHAPES[name]
  x, w1, w2 = (normal(rng, shape, jnp.bfloat16)
               for shape in ((tokens, w1_shape[0] * w1_shape[2]), w1_shape, w2_shape))
  with mosaic.interpreted():
    got = hopper.monarch_multiply(x, w1, w2)
  want = np.asarray(x, np.float64) @ dense_np(w1, w2).T
  assert_close(got, want, dtype=jnp.bfloat16, reduction_len=w1_shape[2] * w2_shape[2], scale=2.0)


@pytest.mark.parametrize("name", ["c2_groups_of_32", "c128_two_chunks_per_block"])
def test_lowers_for_cuda_with_its_backward(name):
  w1_shape, w2_shape, tokens = SHAPES[name]
  args = (jax.ShapeDtypeStruct((2, tokens, w1_shape[0] * w1_shape[2]), jnp.bfloat16),
          jax.ShapeDtypeStruct(w1_shape, jnp.bfloat16), jax.ShapeDtypeStruct(w2_shape, jnp.bfloat16))
  loss = lambda x, w1, w2: jnp.sum(hopper.monarch_multiply(x, w1, w2).astype(jnp.float32))
  text = jax.export.export(jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))), platforms=("cuda",))(*args)
  text = text.mlir_module()
  # The forward is the one Mosaic GPU kernel; the backward is XLA's.
  assert text.count("stablehlo.custom_call @mosaic_gpu") == 1


def test_refuses_what_it_does_not_cover(rng):
  x, w1, w2 = normal(rng, (8, 256)), normal(rng, (4, 256, 64)), normal(rng, (4, 64, 256))
  with pytest.raises(ValueError, match="float32 is not bfloat16"):
    hopper.monarch_multiply(x, w1, w2)
  with pytest.raises(ValueError, match="block_y=96"):
    hopper.monarch_multiply(x.astype(jnp.bfloat16), w1, w2, block_sizes=hopper.BlockSizes(block_y=96))
  options = dict(backend="gpu", dtype=jnp.dtype(jnp.bfloat16), nblocks=4, out_nblocks=4, block_mid=2048,
                 block_in=1024, block_out=1024)  # 4096 -> 4096 nb4: an intermediate of 2048 per output block
  assert "shared memory" in hopper.supports(**options)
  assert "not backend='cpu'" in hopper.supports(**dict(options, backend="cpu", block_mid=512))
  with pytest.raises(ValueError, match="hopper"):
    api.monarch_linear(x.astype(jnp.bfloat16), w1, w2, implementation="hopper")  # on CPU: not this backend


GPU_SHAPES = {"headline_nb4": (2048, 8192, 4), "headline_nb8": (2048, 8192, 8), "down_nb4": (8192, 2048, 4),
              "gpt2_medium_nb4": (1024, 4096, 4)}


@pytest.mark.gpu
@pytest.mark.skipif(not mosaic.is_sm90(), reason="needs an sm90 (Hopper) GPU")
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("name", GPU_SHAPES)
def test_gpu_kernel_matches_the_oracle(rng, name, dtype):
  n, m, nblocks = GPU_SHAPES[name]
  w1, w2 = (w.astype(dtype) for w in api.monarch_init(jax.random.key(0), n, m, nblocks))
  x = normal(rng, (3, 371, n), dtype)  # 1113 tokens: a partial last tile
  cotangent = normal(rng, (3, 371, m))
  kernel = functools.partial(api.monarch_linear, implementation="hopper")
  upcast = [a.astype(jnp.float32) for a in (x, w1, w2)]
  assert_close(jax.jit(kernel)(x, w1, w2), reference.monarch_multiply(*upcast), dtype=dtype,
               reduction_len=w1.shape[2] * w2.shape[2], scale=2.0)
  loss = lambda fn, x, w1, w2: jnp.sum(fn(x, w1, w2).astype(jnp.float32) * cotangent)
  grads = jax.jit(jax.grad(functools.partial(loss, kernel), argnums=(0, 1, 2)))(x, w1, w2)
  expected = jax.grad(functools.partial(loss, reference.monarch_multiply), argnums=(0, 1, 2))(*upcast)
  for label, got, want, reduction in zip(("dx", "dw1", "dw2"), grads, expected,
                                         (w1.shape[2] * w2.shape[2], 1113 * w2.shape[1], 1113 * w1.shape[1])):
    assert_close(got, want, dtype=dtype, reduction_len=reduction, name=label, scale=2.0)
