"""BASED kernels against the reference: outputs, final states and gradients wrt q, k, v and the initial state.

The same test body runs every kernel in KERNELS: the portable chunked Pallas kernel in interpret mode on CPU (CI)
and through Triton on the GPU machine. The oracle is the float32 quadratic reference on the same inputs (the
reference forms are checked against numpy float64 in test_based_reference.py).

Letters: B batch, T length, H heads, F feature dim, D value dim.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.based import api, pallas
from pallas_kernels.based import reference as ref
from tests.tolerances import assert_close, normal

KERNELS = ["pallas"]

# Defaults B=2, T=45 (not a multiple of the chunk), H=2, F=16, D=64, chunk 16, normalised, float32.
CASES = {
    "f16_dv64": dict(),
    "unnormalized_f8_dv128": dict(normalize=False, F=8, D=128),
    "f24_initial_state": dict(F=24, D=32, initial_state=True),
    "segments_initial_state": dict(segments=True, initial_state=True, T=70),
    "f32_chunk32_bf16": dict(F=32, D=16, chunk=32, dtype=jnp.bfloat16),
}


def _inputs(rng, *, B=2, T=45, H=2, F=16, D=64, chunk=16, dtype=jnp.float32, initial_state=False,
            segments=False, normalize=True):
  # q, k scaled so s = q·k/√F stays O(1), as after the model's projections.
  q, k = normal(rng, (B, T, H, F), dtype, 0.5), normal(rng, (B, T, H, F), dtype, 0.5)
  v = normal(rng, (B, T, H, D), dtype)
  options = dict(chunk=chunk, normalize=normalize)
  if segments:
    options["segment_ids"] = jnp.asarray(np.sort(rng.integers(0, 4, (B, T)), axis=1), jnp.int32)
  state = None
  if initial_state:
    prefix = lambda width: normal(rng, (B, 9, H, width), jnp.float32, 0.5)
    _, state = ref.based_chunked(prefix(F), prefix(F), prefix(D), chunk=4, return_final_state=True)
  return (q, k, v, state), options, dtype


def _loss_and_grads(based, q, k, v, state, cotangent_y, cotangent_state, **options):
  """y, the final state and the gradients of <y, c_y> + <final, c_final>, as one jitted program (eager dispatch
  compiles every op and kernel call on its own: tens of seconds per case on the GPU)."""
  def loss(q, k, v, state):
    y, final = based(q, k, v, initial_state=state, return_final_state=True, **options)
    return (jnp.sum(y.astype(jnp.float32) * cotangent_y)
            + sum(jnp.sum(a * c) for a, c in zip(final, cotangent_state))), (y, final)
  argnums = (0, 1, 2, 3) if state is not None else (0, 1, 2)
  grads, (y, final) = jax.jit(jax.grad(loss, argnums=argnums, has_aux=True))(q, k, v, state)
  return y, final, grads


def _check_against_reference(rng, kernel, case):
  (q, k, v, state), options, dtype = _inputs(rng, **case)
  batch, _, heads, f = q.shape
  cotangent_y = normal(rng, v.shape, jnp.float32)
  cotangent_state = [normal(rng, x.shape, jnp.float32) for x in ref.BasedState.zeros(batch, heads, f, v.shape[-1])]
  quadratic = lambda *a, chunk, **kw: ref.based_quadratic(*a, **kw)
  got = _loss_and_grads(kernel, q, k, v, state, cotangent_y, cotangent_state, **options)
  upcast = [x.astype(jnp.float32) for x in (q, k, v)]
  want = _loss_and_grads(quadratic, *upcast, state, cotangent_y, cotangent_state, **options)
  n = q.shape[1]
  assert_close(got[0], want[0], dtype=dtype, reduction_len=n, name="y", scale=2.0)
  for name, g, w in zip(ref.BasedState._fields, got[1], want[1]):
    assert_close(g, w, dtype=dtype, reduction_len=n, name=f"final {name}", scale=2.0)
  names = ("dq", "dk", "dv", "d initial_state")
  for name, g, w in zip(names, jax.tree.leaves(got[2]), jax.tree.leaves(want[2])):
    assert_close(g, w, dtype=dtype, reduction_len=n, name=name, scale=8.0)


@pytest.mark.parametrize("implementation", KERNELS)
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_reference(rng, case, implementation):
  kernel = lambda *a, **kw: api.based_linear_attention(*a, implementation=implementation, **kw)
  _check_against_reference(rng, kernel, CASES[case])


@pytest.mark.parametrize("case", ["f16_dv64", "f24_initial_state"])
def test_sequence_split_into_pieces_matches_reference(rng, case):
  """Pieces of the sequence run as separate programs from prefix-summed piece states (the GPU's long-sequence
  path, forced here): outputs, final state and gradients, incl. wrt the initial state."""
  blocks = pallas.BlockSizes(block_d=32, sequence_pieces=4)
  kernel = lambda *a, **kw: pallas.based_chunked(*a, block_sizes=blocks, **kw)
  _check_against_reference(rng, kernel, dict(CASES[case], T=128))


def test_sequence_split_refuses_what_it_cannot_model(rng):
  (q, k, v, _), options, _ = _inputs(rng, T=128, segments=True)
  with pytest.raises(ValueError, match="sequence_pieces=4"):
    pallas.based_chunked(q, k, v, block_sizes=pallas.BlockSizes(sequence_pieces=4), **options)


def test_auto_takes_the_kernel_only_where_covered():
  stateful = dict(length=128, feature_dim=16, value_dim=64, has_initial_state=True, return_final_state=True)
  chosen = api.DISPATCHER.select("auto", chunk=64, **stateful).name
  assert chosen == ("pallas" if jax.default_backend() in ("gpu", "tpu") else "reference")
  assert api.DISPATCHER.select("auto", chunk=7, **stateful).name == "reference"
  with pytest.raises(ValueError, match="feature_dim=48"):
    api.DISPATCHER.select("pallas", chunk=64, **dict(stateful, feature_dim=48))


@pytest.mark.parametrize("implementation", KERNELS)
def test_decode_step_through_api_matches_reference(rng, implementation):
  batch, heads, f, d = 2, 3, 16, 32
  _, state = ref.based_chunked(*(normal(rng, (batch, 5, heads, w), jnp.float32, 0.5) for w in (f, f, d)),
                               chunk=4, return_final_state=True)
  q, k = normal(rng, (batch, heads, f), jnp.float32, 0.5), normal(rng, (batch, heads, f), jnp.float32, 0.5)
  v = normal(rng, (batch, heads, d))
  got_y, got_state = api.based_decode_step(q, k, v, state, implementation=implementation)
  want_y, want_state = ref.based_step(q, k, v, state)
  assert_close(got_y, want_y, dtype=jnp.float32, reduction_len=6, name="y")
  for name, g, w in zip(ref.BasedState._fields, got_state, want_state):
    assert_close(g, w, dtype=jnp.float32, reduction_len=6, name=name)


PARALLEL_KERNELS = ["pallas_parallel"]
PARALLEL_CASES = {
    "f16_dv64": dict(),
    "unnormalized_segments_f8": dict(normalize=False, segments=True, F=8, T=70),
    "f24_dv32_bf16": dict(F=24, D=32, dtype=jnp.bfloat16),
}


@pytest.mark.parametrize("implementation", PARALLEL_KERNELS)
@pytest.mark.parametrize("case", list(PARALLEL_CASES))
def test_parallel_kernel_matches_reference(rng, case, implementation):
  """The stateless parallel kernel: output and gradients wrt q, k, v."""
  (q, k, v, _), options, dtype = _inputs(rng, **PARALLEL_CASES[case])
  cotangent_y = normal(rng, v.shape, jnp.float32)
  kernel = lambda *a: api.based_linear_attention(*a, implementation=implementation, **options)
  quadratic = lambda *a: ref.based_quadratic(*a, **{k: v for k, v in options.items() if k != "chunk"})
  loss = lambda fn: lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * cotangent_y)
  n = q.shape[1]
  assert_close(kernel(q, k, v), quadratic(*(x.astype(jnp.float32) for x in (q, k, v))), dtype=dtype,
               reduction_len=n, name="y", scale=2.0)
  got = jax.grad(loss(kernel), argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(loss(quadratic), argnums=(0, 1, 2))(*(x.astype(jnp.float32) for x in (q, k, v)))
  for name, g, w in zip(("dq", "dk", "dv"), got, want):
    assert_close(g, w, dtype=dtype, reduction_len=n, name=name, scale=8.0)


def test_auto_takes_the_parallel_kernel_for_short_stateless_calls_on_gpu():
  options = dict(chunk=64, feature_dim=16, value_dim=64, has_initial_state=False, return_final_state=False)
  backend = jax.default_backend()
  chunked = "pallas" if backend in ("gpu", "tpu") else "reference"
  short = api.DISPATCHER.select("auto", length=api.AUTO_PARALLEL_MAX_LENGTH, **options).name
  assert short == ("pallas_parallel" if backend == "gpu" else chunked)
  assert api.DISPATCHER.select("auto", length=api.AUTO_PARALLEL_MAX_LENGTH + 1, **options).name == chunked
  stateful = dict(options, return_final_state=True)
  assert api.DISPATCHER.select("auto", length=128, **stateful).name == chunked
  # By name it runs beyond auto's length, up to its own limit.
  assert api.DISPATCHER.select("pallas_parallel", length=api.PARALLEL_MAX_LENGTH, **options).name == "pallas_parallel"
  with pytest.raises(ValueError, match="length"):
    api.DISPATCHER.select("pallas_parallel", length=api.PARALLEL_MAX_LENGTH + 1, **options)
