"""The op contract's shared pieces: fail-closed dispatch, validation messages, per-shard execution."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from pallas_kernels.common import sharding, validation
from pallas_kernels.common.dispatch import Dispatcher, Implementation, require
from tests.tolerances import assert_close, normal


def _only_even(*, length, **_):
  return require(length % 2 == 0, f"{length=} is odd")


DISPATCH = Dispatcher("toy", (
    Implementation("fast", lambda x: x * 2.0, supports=_only_even),
    Implementation("gpu_only", lambda x: x * 3.0, backends=("gpu",)),
    Implementation("interpret", lambda x: x * 4.0, in_auto=False),
    Implementation("kernel", lambda x: x * 5.0, auto_backends=("tpu",)),
    Implementation("reference", lambda x: x * 2.0),
))


def test_auto_picks_first_supported_and_falls_back():
  assert DISPATCH.select("auto", length=4).name == "fast"
  assert DISPATCH.select("auto", length=5).name == ("gpu_only" if jax.default_backend() == "gpu"
                                                   else "reference")


def test_named_implementation_runs_or_says_why():
  assert DISPATCH.select("interpret", length=5).name == "interpret"
  assert DISPATCH.select("kernel", length=5).name == "kernel"  # runs anywhere when named
  with pytest.raises(ValueError, match="length=5 is odd"):
    DISPATCH.select("fast", length=5)
  with pytest.raises(ValueError, match="implementation='nope'"):
    DISPATCH.select("nope", length=4)
  if jax.default_backend() != "gpu":
    with pytest.raises(ValueError, match="backend"):
      DISPATCH.select("gpu_only", length=4)


def test_auto_prefers_restricts_auto_only():
  short = lambda *, length, **_: require(length <= 8, f"{length=} > 8")
  dispatch = Dispatcher("toy", (Implementation("short", lambda x: x, auto_prefers=short),
                                Implementation("reference", lambda x: x)))
  assert dispatch.select("auto", length=8).name == "short"
  assert dispatch.select("auto", length=9).name == "reference"
  assert dispatch.select("short", length=9).name == "short"


def test_dispatch_calls_the_selected_function(rng):
  x = normal(rng, (3,))
  np.testing.assert_allclose(DISPATCH("interpret", {"length": 3}, x), 4.0 * np.asarray(x), rtol=1e-6)


def test_with_implementation_inserts_ahead_of_reference():
  extended = DISPATCH.with_implementation(Implementation("new", lambda x: x))
  assert extended.names == ("fast", "gpu_only", "interpret", "kernel", "new", "reference")
  with pytest.raises(ValueError, match="duplicate"):
    extended.with_implementation(Implementation("new", lambda x: x))


@pytest.mark.parametrize("check, args, match", [
    (validation.check_rank, ("q", jnp.zeros((2, 3)), 4), "q must have rank 4"),
    (validation.check_dtype, ("k", jnp.zeros(2, jnp.int32)), "k has dtype int32"),
    (validation.check_heads_divide, (6, 4), "num_heads=6"),
    (validation.check_positive, ("window", 0), "window must be positive"),
    (validation.check_in, ("mode", "x", ("a", "b")), "mode='x'"),
    (validation.check_segment_ids, ("segment_ids", jnp.array([[0, 1, 0]]), 1, 3), "segment_ids must be non-decr"),
    (validation.check_segment_ids, ("segment_ids", jnp.zeros((1, 3)), 1, 3), "segment_ids must be an integer"),
    (validation.check_segment_ids, ("segment_ids", jnp.zeros((1, 4), jnp.int32), 1, 3), "segment_ids must have"),
    (validation.check_lengths, ("lengths", jnp.array([3, 9]), 2, 8), r"lengths must lie in \[0, 8\]"),
])
def test_validation_names_the_argument(check, args, match):
  with pytest.raises(ValueError, match=match):
    check(*args)


def test_validation_accepts_good_input():
  validation.check_segment_ids("segment_ids", jnp.array([[0, 0, 1]]), 1, 3)
  validation.check_lengths("lengths", jnp.array([0, 8]), 2, 8)
  validation.check_same_dtype(q=jnp.zeros(1), k=jnp.zeros(1))
  with pytest.raises(ValueError, match="dtypes must match"):
    validation.check_same_dtype(q=jnp.zeros(1), k=jnp.zeros(1, jnp.bfloat16))


def test_per_shard_without_mesh_is_the_function_itself():
  fn = lambda x: x + 1
  assert sharding.per_shard(fn, in_specs=P(), out_specs=P()) is fn


def test_per_shard_runs_each_block_with_a_mesh(rng):
  devices = jax.devices()
  mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  spec = sharding.heads_spec("data", None)
  x = jax.device_put(normal(rng, (2 * len(devices), 5, 2, 4)), jax.sharding.NamedSharding(mesh, spec))
  # A per-row normalisation: any cross-shard mixing along batch would change the result.
  row_softmax = functools.partial(jax.nn.softmax, axis=1)
  fn = sharding.per_shard(row_softmax, in_specs=(spec,), out_specs=spec, mesh=mesh)
  assert_close(jax.jit(fn)(x), row_softmax(x), dtype=jnp.float32, reduction_len=5)


def test_block_sizes_reach_the_kernel_through_the_public_op(rng):
  """api.attention's block_sizes= tunes the running kernel (the result is the same function; a block size the
  kernel cannot take is refused by that kernel) and a knob class of another implementation is refused by name."""
  from pallas_kernels.attention import api, hopper, pallas
  q, k, v = (normal(rng, (1, 96, 2, 64)) for _ in range(3))
  ref = api.attention(q, k, v, causal=True, implementation="reference")
  small = api.attention(q, k, v, causal=True, implementation="pallas",
                        block_sizes=pallas.BlockSizes(block_q=32, block_k=32, block_q_dq=32, block_k_dq=32,
                                                      block_q_dkv=32, block_k_dkv=32))
  assert_close(small, ref, dtype=jnp.float32, reduction_len=64)
  with pytest.raises(ValueError, match="takes .*pallas.BlockSizes, got .*hopper.BlockSizes"):
    api.attention(q, k, v, implementation="pallas", block_sizes=hopper.BlockSizes())
  with pytest.raises(ValueError, match="no block_sizes"):
    api.attention(q, k, v, implementation="reference", block_sizes=pallas.BlockSizes())
