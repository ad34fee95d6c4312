"""The train state, created already sharded.

The model is first built abstractly (`nnx.eval_shape`: shapes and axis names, no memory); the shardings follow
from the names (train/mesh.py); then one `jax.jit` with those output shardings runs the real initialisation, so
every device computes only its own slices and no device ever holds a full copy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from train.mesh import replicated, state_shardings


@dataclasses.dataclass(frozen=True)
class Setup:
  """What the steps need besides the state: the model's structure and where everything lives."""
  graphdef: nnx.GraphDef
  rest: Any  # non-parameter model state (constant during training), a pure dict of arrays
  abstract_params: nnx.State  # Variables (with their types and axis names) over ShapeDtypeStructs
  shardings: dict  # NamedShardings shaped like the state dict
  num_params: int


def abstract_model(model_fn: Callable[[], nnx.Module]) -> nnx.Module:
  """Shapes, dtypes and axis names only (outside any mesh: the names are logical, not mesh axes)."""
  with nnx.use_eager_sharding(False):
    return nnx.eval_shape(model_fn)


def create_state(model_fn: Callable[[], nnx.Module], optimizer: optax.GradientTransformation, mesh: Mesh,
                 seed: int) -> tuple[dict, Setup]:
  """The sharded train state {params, opt_state, step, rng, skipped} and its `Setup`."""
  graphdef, abs_params, abs_rest = nnx.split(abstract_model(model_fn), nnx.Param, ...)
  param_sh = state_shardings(abs_params, mesh)
  rest_sh = state_shardings(abs_rest, mesh)
  abs_opt = jax.eval_shape(optimizer.init, nnx.to_pure_dict(abs_params))
  rep = replicated(mesh)
  opt_sh = optax.tree_map_params(optimizer, lambda _, sh: sh, abs_opt, param_sh,
                                 transform_non_params=lambda _: rep)
  shardings = dict(params=param_sh, opt_state=opt_sh, step=rep, rng=rep, skipped=rep)

  def init():
    with nnx.use_eager_sharding(False):
      model = model_fn()
    _, params, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(params)
    state = dict(params=params, opt_state=optimizer.init(params), step=jnp.int32(0),
                 rng=jax.random.key_data(jax.random.key(seed)), skipped=jnp.int32(0))
    return state, nnx.to_pure_dict(rest)

  with jax.set_mesh(mesh):
    state, rest = jax.jit(init, out_shardings=(shardings, rest_sh))()
  num_params = sum(x.size for x in jax.tree.leaves(state["params"]))
  return state, Setup(graphdef, rest, abs_params, shardings, num_params)


def abstract_state(setup: Setup, state: dict) -> dict:
  """ShapeDtypeStructs with shardings, the target for restoring a checkpoint."""
  return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), state, setup.shardings)
