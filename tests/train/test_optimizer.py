"""The optimizer holds its peak learning rate as a value (train/optimizer.py): the update equals AdamW with the
learning-rate schedule as a constant, and runs that differ only in learning rate compile to one program (what
lets a sweep's compilation cache serve them)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from train.config import MeshConfig, OptimConfig
from train.mesh import make_mesh
from train.optimizer import decay_mask, lr_schedule, make_optimizer, peak_lr, unit_schedule
from train.state import create_state
from train.step import make_forward, make_train_step

CONFIG = OptimConfig(lr=3e-3, warmup_steps=2, min_lr_ratio=0.1, weight_decay=0.1, clip_norm=1.0)


def _params(rng):
  return {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32), "bias": jnp.asarray(rng.normal(size=3), jnp.float32)}


def test_update_equals_adamw_with_the_schedule_as_a_constant(rng):
  params = _params(rng)
  mask = {"w": True, "bias": False}
  ours = make_optimizer(CONFIG, 10, mask)
  want = optax.chain(optax.clip_by_global_norm(CONFIG.clip_norm),
                     optax.adamw(lr_schedule(CONFIG, 10), b1=CONFIG.b1, b2=CONFIG.b2, eps=CONFIG.eps,
                                 weight_decay=CONFIG.weight_decay, mask=mask))
  state, want_state = ours.init(params), want.init(params)
  assert float(peak_lr(state)) == np.float32(CONFIG.lr)
  for step in range(4):  # through the warmup into the decay
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    update, state = ours.update(grads, state, params)
    want_update, want_state = want.update(grads, want_state, params)
    for a, b in zip(jax.tree.leaves(update), jax.tree.leaves(want_update)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9, err_msg=f"step {step}")
    assert abs(float(lr_schedule(CONFIG, 10)(step)) - CONFIG.lr * float(unit_schedule(CONFIG, 10)(step))) < 1e-9


def test_runs_differing_in_lr_compile_to_one_program(rng):
  """Same model and batch, two learning rates: one HLO (the rate is an argument), different updates, and the
  step's reported lr is each run's."""
  from jaxlm.models import LM, load_preset
  model = load_preset("transformer-tiny")
  batch = dict(inputs=jnp.asarray(rng.integers(0, 256, (1, 2, 8)), jnp.int32),
               labels=jnp.asarray(rng.integers(0, 256, (1, 2, 8)), jnp.int32))
  texts, updated = {}, {}
  for lr in (1e-3, 1e-2):
    config = dataclasses.replace(CONFIG, lr=lr, warmup_steps=0)  # a warmup would make step 0 move nothing
    make_model = lambda: LM(model, rngs=nnx.Rngs(0))
    abs_params = nnx.split(nnx.eval_shape(make_model), nnx.Param, ...)[1]
    optimizer = make_optimizer(config, 10, decay_mask(abs_params))
    state, setup = create_state(make_model, optimizer, make_mesh(MeshConfig()), 0)
    step = jax.jit(make_train_step(make_forward(setup.graphdef, setup.rest), optimizer,
                                   schedule=unit_schedule(config, 10)))
    texts[lr] = step.lower(state, batch).as_text()
    new_state, metrics = step(state, batch)
    np.testing.assert_allclose(metrics["lr"], lr_schedule(config, 10)(0), rtol=1e-6)
    updated[lr] = new_state["params"]
  assert texts[1e-3] == texts[1e-2]
  moved = [np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in zip(*map(jax.tree.leaves, updated.values()))]
  assert max(moved) > 0
