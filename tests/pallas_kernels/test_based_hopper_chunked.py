"""The Hopper (Mosaic GPU) chunked BASED forward: it lowers for sm90 on this CPU-only machine (jax.export traces and
lowers the kernel to Mosaic GPU MLIR, which checks shapes, layouts, wgmma operands and the shared-memory budget),
forward+backward lowers with the portable (Triton) backward, the support check refuses what it does not cover, and
on an sm90 GPU it matches the float32 reference in outputs, final states and gradients wrt q, k, v and the initial
state.

Letters: B batch, T length, H heads, F feature dim, D value dim.
"""

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.based import api, hopper_chunked, pallas
from pallas_kernels.based import reference as ref
from pallas_kernels.based.symmetric import BasedFullState, full_to_symmetric, on_full_layout, symmetric_to_full
from pallas_kernels.common import mosaic
from tests.pallas_kernels.test_based_kernel import _check_against_reference, _inputs
from tests.tolerances import assert_close, normal

# Shapes and options that must lower; defaults B=2, T=256, H=2, F=16, D=64, bfloat16, normalised, no state.
LOWERING = {
    "d64": dict(),
    "d128_unnormalized": dict(D=128, normalize=False),
    "f16_initial_state": dict(dtype=jnp.float16, initial_state=True),
    "odd_length_d128_state": dict(T=200, D=128, initial_state=True),
    "short": dict(T=5),
    "sequence_pieces": dict(T=1000, initial_state=True, pieces=4),
}


def _shapes(B=2, T=256, H=2, F=16, D=64, dtype=jnp.bfloat16, initial_state=False, normalize=True, pieces=None):
  qk, v = jax.ShapeDtypeStruct((B, T, H, F), dtype), jax.ShapeDtypeStruct((B, T, H, D), dtype)
  state = jax.eval_shape(lambda: BasedFullState.zeros(B, H, F, D)) if initial_state else None
  return (qk, qk, v, state), dict(normalize=normalize,
                                  block_sizes=hopper_chunked.BlockSizes(sequence_pieces=pieces))


def _call(q, k, v, state, **options):
  return hopper_chunked.based_chunked_hopper(q, k, v, initial_state=state, return_final_state=True, **options)


@pytest.mark.parametrize("name", LOWERING)
def test_forward_lowers_for_sm90(name):
  (q, k, v, state), options = _shapes(**LOWERING[name])
  fn = lambda q, k, v, state: _call(q, k, v, state, **options)
  text = jax.export.export(jax.jit(fn), platforms=("cuda",))(q, k, v, state).mlir_module()
  assert text.count("mosaic_gpu") >= 1, "expected the Mosaic GPU kernel in the module"


@pytest.mark.parametrize("name", ["odd_length_d128_state", "d64", "sequence_pieces"])
def test_forward_and_backward_lower_for_gpu(name):
  """The custom_vjp wires the Hopper forward to the portable backward (Triton kernels on GPU)."""
  (q, k, v, state), options = _shapes(**LOWERING[name])

  def loss(q, k, v, state):
    y, final = _call(q, k, v, state, **options)
    return jnp.sum(y.astype(jnp.float32)) + sum(jnp.sum(x) for x in final)

  argnums = (0, 1, 2, 3) if state is not None else (0, 1, 2)
  with mock.patch.object(jax, "default_backend", lambda: "gpu"):  # the portable backward picks Triton
    text = jax.jit(jax.grad(loss, argnums=argnums)).trace(q, k, v, state).lower(
        lowering_platforms=("cuda",)).as_text()
  assert text.count("mosaic_gpu") >= 1 and text.count("triton") >= 2


def test_expansion_matrices_build_the_taylor_features():
  """x·E_p ⊙ x·E_b lays out vec(x ⊗ x) in pieces of 64, x·E_4 holds x (checked in numpy, float64)."""
  e = hopper_chunked.expansion_matrices(np.float64)
  x = np.random.default_rng(0).normal(size=(3, 16))
  order2 = np.concatenate([(x @ e[p]) * (x @ e[-1]) for p in range(4)], axis=1)
  np.testing.assert_allclose(order2, (x[:, :, None] * x[:, None, :]).reshape(3, 256))
  np.testing.assert_allclose((x @ e[4])[:, :16], x)
  np.testing.assert_array_equal((x @ e[4])[:, 16:], 0.0)


def test_sequence_pieces_fill_one_wave_of_long_pieces():
  assert hopper_chunked.sequence_pieces(ctas=128, num_steps=16) == 1  # B8 H16 D64 T2048
  assert hopper_chunked.sequence_pieces(ctas=32, num_steps=128) == 4  # B2 H16 D64 T16384
  assert hopper_chunked.sequence_pieces(ctas=16, num_steps=512) == 8  # B1 H16 D64 T65536
  assert hopper_chunked.sequence_pieces(ctas=16, num_steps=12) == 1  # too short to split


def full_state_cotangent(rng, state: BasedFullState) -> BasedFullState:
  """A random cotangent of a full-layout state, symmetric in (i, j) as the full states are: the layouts agree on
  those (an antisymmetric part has no symmetric-layout counterpart)."""
  c = BasedFullState(*(normal(rng, x.shape, jnp.float32) for x in state))
  return c._replace(s2_BHFFD=(c.s2_BHFFD + jnp.swapaxes(c.s2_BHFFD, 2, 3)) / 2,
                    z2_BHFF=(c.z2_BHFF + jnp.swapaxes(c.z2_BHFF, 2, 3)) / 2)


@pytest.mark.parametrize("pieces", [None, 4])
def test_portable_backward_from_a_given_forward_matches_reference(rng, pieces):
  """pallas.based_chunked_backward (the Hopper forward's gradients: portable kernels, interpret mode on CPU) from
  the reference's y and normaliser: dq, dk, dv and the initial state's gradient, also in sequence pieces. States
  are in the full layout the kernels carry (the reference's through the exact converters)."""
  (q, k, v, sym_state), options, _ = _inputs(rng, T=128, initial_state=True)
  state = symmetric_to_full(sym_state)
  cotangent_y = normal(rng, v.shape, jnp.float32)
  cotangent_state = full_state_cotangent(rng, state)

  def quadratic(q, k, v, state):
    y, final = ref.based_quadratic(q, k, v, initial_state=full_to_symmetric(state), return_final_state=True)
    return y, symmetric_to_full(final)

  (y, _), pullback = jax.vjp(quadratic, q, k, v, state)
  # den: the unnormalised output for values of ones and the normaliser state as the value state.
  z_state = sym_state._replace(s0_BHD=sym_state.z0_BH[..., None], s1_BHFD=sym_state.z1_BHF[..., None],
                               s2_BHUD=sym_state.z2_BHU[..., None])
  den = ref.based_quadratic(q, k, jnp.ones((*v.shape[:3], 1)), initial_state=z_state, normalize=False)[..., 0]
  got = pallas.based_chunked_backward(q, k, v, y, den, cotangent_y, cotangent_state, initial_state=state,
                                      normalize=True, eps=1e-6, chunk=options["chunk"], sequence_pieces=pieces)
  want = pullback((cotangent_y, cotangent_state))
  for name, g, w in zip(("dq", "dk", "dv", "d initial_state"), got, want):
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(w)):
      assert_close(a, b, dtype=jnp.float32, reduction_len=q.shape[1], name=name)


def test_auto_preference_wants_a_full_wave_after_the_sequence_split():
  assert hopper_chunked.preferred(batch=8, length=2048, heads=16, value_dim=64) is None
  assert hopper_chunked.preferred(batch=4, length=100, heads=16, value_dim=128) is None
  assert hopper_chunked.preferred(batch=2, length=16384, heads=16, value_dim=64) is None  # 4 pieces
  assert hopper_chunked.preferred(batch=1, length=65536, heads=16, value_dim=64) is None  # 8 pieces
  assert "ctas=32" in hopper_chunked.preferred(batch=2, length=1024, heads=16, value_dim=64)  # too short to split


def test_auto_takes_it_on_sm90_for_16_bit_calls_with_a_full_wave():
  options = dict(batch=2, length=16384, heads=16, feature_dim=16, value_dim=64, chunk=64, dtype=jnp.bfloat16,
                 has_initial_state=True, return_final_state=True, has_segment_ids=False, normalize=True)
  with mock.patch.object(jax, "default_backend", lambda: "gpu"), mock.patch.object(mosaic, "is_sm90", lambda: True):
    assert api.DISPATCHER.select("auto", **options).name == "hopper"
    assert api.DISPATCHER.select("auto", **dict(options, length=1024)).name == "pallas"
    assert api.DISPATCHER.select("auto", **dict(options, dtype=jnp.float32)).name == "pallas"
    assert api.DISPATCHER.select("auto", **dict(options, has_segment_ids=True)).name == "pallas"
  with mock.patch.object(jax, "default_backend", lambda: "gpu"), mock.patch.object(mosaic, "is_sm90", lambda: False):
    assert api.DISPATCHER.select("auto", **options).name == "pallas"


def test_state_packing_round_trips():
  rng = np.random.default_rng(1)
  state = BasedFullState(*(jnp.asarray(rng.normal(size=x.shape), jnp.float32)
                           for x in BasedFullState.zeros(2, 3, 16, 64)))
  back = hopper_chunked._unpack_state(*hopper_chunked._pack_state(state))
  for name, a, b in zip(BasedFullState._fields, back, state):
    np.testing.assert_array_equal(a, b, err_msg=name)


def test_support_check_names_what_it_refuses():
  ok = dict(backend="gpu", dtype=jnp.bfloat16, feature_dim=16, value_dim=64, length=100, chunk=64,
            has_segment_ids=False, normalize=True)
  with mock.patch.object(mosaic, "is_sm90", lambda: True):
    assert hopper_chunked.supports(**ok) is None
    assert hopper_chunked.supports(**dict(ok, dtype=jnp.float16, value_dim=128, normalize=False)) is None
    assert "float32" in hopper_chunked.supports(**dict(ok, dtype=jnp.float32))
    assert "feature_dim=32" in hopper_chunked.supports(**dict(ok, feature_dim=32))
    assert "value_dim=96" in hopper_chunked.supports(**dict(ok, value_dim=96))
    assert "segment ids" in hopper_chunked.supports(**dict(ok, has_segment_ids=True))
    assert "chunk=7" in hopper_chunked.supports(**dict(ok, chunk=7))
    assert "backend='cpu'" in hopper_chunked.supports(**dict(ok, backend="cpu"))
  with mock.patch.object(mosaic, "is_sm90", lambda: False):
    assert "sm90" in hopper_chunked.supports(**ok)


_on_sm90 = pytest.mark.skipif(jax.default_backend() != "gpu" or not mosaic.is_sm90(),
                              reason="needs an sm90 (Hopper) GPU")

# Cases the kernel covers (F = 16, D 64/128, 16-bit); lengths cross the 128-token step.
CASES = {
    "d64_odd_length": dict(T=300, D=64, chunk=64, dtype=jnp.bfloat16),
    "d128_initial_state": dict(T=256, D=128, chunk=64, dtype=jnp.bfloat16, initial_state=True),
    "unnormalized_f16_state": dict(T=200, D=64, chunk=64, dtype=jnp.float16, normalize=False, initial_state=True),
    "short_d128_f16": dict(T=45, D=128, chunk=64, dtype=jnp.float16),
    "many_steps": dict(T=1100, H=3, D=64, chunk=64, dtype=jnp.bfloat16, initial_state=True),
}
# Sequence pieces forced (pieces of 2 steps; the last piece of T=600 is padding only).
PIECES_CASES = {
    "pieces_initial_state": dict(T=1000, D=128, chunk=64, dtype=jnp.bfloat16, initial_state=True),
    "pieces_padding_piece_unnormalized": dict(T=600, D=64, chunk=64, dtype=jnp.float16, normalize=False,
                                              initial_state=True),
}


@pytest.mark.gpu
@_on_sm90
@pytest.mark.parametrize("case", list(CASES))
def test_hopper_chunked_matches_reference(rng, case):
  """Through the symmetric-layout boundary api.py puts around it."""
  _check_against_reference(rng, on_full_layout(hopper_chunked.based_chunked_hopper), CASES[case])


@pytest.mark.gpu
@_on_sm90
@pytest.mark.parametrize("case", list(PIECES_CASES))
def test_sequence_pieces_match_reference(rng, case):
  blocks = hopper_chunked.BlockSizes(sequence_pieces=4)
  kernel = lambda *a, **kw: hopper_chunked.based_chunked_hopper(*a, block_sizes=blocks, **kw)
  _check_against_reference(rng, on_full_layout(kernel), PIECES_CASES[case])


@pytest.mark.gpu
@_on_sm90
@pytest.mark.parametrize("B,T", [(8, 2048), (2, 16384)])
def test_agrees_with_portable_kernel_at_model_scale(B, T):
  """Outputs and gradients agree with the portable kernel at the benchmark's shapes (many steps per CTA;
  both kernels split B2 T16384 into sequence pieces by shape). Timings: benchmarks/."""
  rng = np.random.default_rng(0)
  H, F, D = 16, 16, 64
  q, k = (jnp.asarray(rng.normal(size=(B, T, H, F)) * 0.5, jnp.bfloat16) for _ in range(2))
  v = jnp.asarray(rng.normal(size=(B, T, H, D)), jnp.bfloat16)
  cotangent = jnp.asarray(rng.normal(size=v.shape), jnp.float32)
  results = {}
  for name, fn in (("hopper", hopper_chunked.based_chunked_hopper), ("portable", pallas.based_chunked)):
    loss = lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v, chunk=64).astype(jnp.float32) * cotangent)
    y = jax.jit(lambda q, k, v, fn=fn: fn(q, k, v, chunk=64))(q, k, v)
    results[name] = (y, jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v))
  for name, got, want in zip(("y", "dq", "dk", "dv"), jax.tree.leaves(results["hopper"]),
                             jax.tree.leaves(results["portable"])):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.max(np.abs(got - want)) <= 2e-2 * np.max(np.abs(want)), name
