"""H3 and Hyena on the long_conv kernel: a mixer built with implementation="pallas" keeps the reference's outputs and
gradients (wrt its input and every parameter) within kernel tolerance, and prefill (which runs the op) + step-by-
step decode (the recurrences, which never call it) continue the kernel's parallel forward. On CPU the kernel runs in
interpret mode; on the GPU machine the same test runs it through Triton. (tests/jaxlm/test_kernel_switch.py switches
attention and BASED in whole models.)

Letters: B batch, T length, E model width.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.layers.h3 import H3, H3Config
from jaxlm.layers.hyena import Hyena, HyenaConfig
from tests.tolerances import assert_close, normal

B, T, E, PROMPT = 2, 12, 16, 7
CONFIGS = {
    "h3": (H3, lambda implementation: H3Config(E, state_dim=8, implementation=implementation)),
    "hyena_order3": (Hyena, lambda implementation: HyenaConfig(E, max_length=16, order=3, filter_order=8, emb_dim=5,
                                                               implementation=implementation)),
}


def _mixer(name: str, implementation: str):
  cls, config = CONFIGS[name]
  with nnx.use_eager_sharding(False):  # logical axis names without a mesh: annotate, do not place
    return cls(config(implementation), rngs=nnx.Rngs(0))


def _outputs_and_grads(mixer, x_BTE, cotangent_BTE):
  """The parallel output and the gradients of <out, cotangent> wrt x and every parameter, one jitted program."""
  graph, params = nnx.split(mixer)

  def loss(params, x):
    out = nnx.merge(graph, params)(x)
    return jnp.sum(out * cotangent_BTE), out

  (d_params, dx), out = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(params, x_BTE)
  return out, dx, d_params


def _decoded(mixer, x_BTE):
  """The outputs of prefill on PROMPT tokens [B, PROMPT, E], then of one decode step per later token [B, T - PROMPT,
  E]."""
  lengths = jnp.full((B,), PROMPT, jnp.int32)
  prompt_out, cache = nnx.jit(lambda m, x: m.prefill(x, m.init_cache(B, T), lengths))(mixer, x_BTE[:, :PROMPT])
  decode = nnx.jit(lambda m, x, c: m.decode(x, c))
  outputs = []
  for t in range(PROMPT, T):
    out, cache = decode(mixer, x_BTE[:, t], cache)
    outputs.append(out)
  return prompt_out, jnp.stack(outputs, axis=1)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_mixer_on_the_kernel_matches_reference(name, rng):
  x, cotangent = normal(rng, (B, T, E)), normal(rng, (B, T, E))
  out_ref, dx_ref, d_params_ref = _outputs_and_grads(_mixer(name, "reference"), x, cotangent)
  mixer = _mixer(name, "pallas")
  out, dx, d_params = _outputs_and_grads(mixer, x, cotangent)
  tolerance = dict(dtype=jnp.float32, reduction_len=T * E)
  assert_close(out, out_ref, **tolerance, name="output")
  assert_close(dx, dx_ref, **tolerance, name="d x")
  # One scale for every parameter: rounding is relative to the gradients, not to a parameter whose gradient is
  # small.
  got, want = jax.tree.leaves(d_params), jax.tree.leaves(d_params_ref)
  scale = max(float(jnp.max(jnp.abs(w))) for w in want)
  paths = [path for path, _ in nnx.to_flat_state(d_params_ref)]
  assert len(got) == len(want) == len(paths) > 5
  for path, g, w in zip(paths, got, want):
    assert_close(g / scale, w / scale, **tolerance, name=f"d {'.'.join(map(str, path))}")
  prompt_out, decoded = _decoded(mixer, x)
  assert_close(prompt_out, out[:, :PROMPT], **tolerance, name="prefill vs parallel")
  assert_close(decoded, out[:, PROMPT:], **tolerance, name="decode vs parallel")
  assert not np.allclose(np.asarray(out[:, 0]), np.asarray(out[:, -1]))  # a real signal
