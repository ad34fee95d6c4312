"""The train step: token-normalised gradient accumulation, skipped non-finite steps, the weight-decay mask."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxlm.layers.ssm_param import SSMParam
from train.config import OptimConfig
from train.optimizer import decay_mask, lr_schedule
from train.step import IGNORE, make_train_step

V, D, T = 11, 6, 5


def _forward(params, batch):
  return params["emb"][batch["inputs"]] @ params["out"]  # [B, T, V]


def _state(rng, optimizer):
  params = dict(emb=jnp.asarray(rng.standard_normal((V, D)), jnp.float32),
                out=jnp.asarray(rng.standard_normal((D, V)), jnp.float32))
  return dict(params=params, opt_state=optimizer.init(params), step=jnp.int32(0),
              rng=jax.random.key_data(jax.random.key(0)), skipped=jnp.int32(0))


def _batch(rng, rows, micro):
  inputs = rng.integers(0, V - 1, (rows, T))  # token V-1 is kept for the NaN test
  labels = rng.integers(0, V, (rows, T))
  labels[rng.random((rows, T)) < 0.5] = IGNORE  # rows hold different numbers of labelled tokens
  split = lambda x: jnp.asarray(x.reshape(micro, rows // micro, T))
  return dict(inputs=split(inputs), labels=split(labels))


def test_micro_batches_give_the_big_batch_update(rng):
  optimizer = optax.sgd(0.5)
  state = _state(rng, optimizer)
  batch = _batch(rng, 8, 1)
  step = jax.jit(make_train_step(_forward, optimizer))
  one, m1 = step(state, batch)
  four, m4 = step(state, jax.tree.map(lambda x: x.reshape(4, 2, T), batch))
  np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(four["params"]), jax.tree.leaves(one["params"])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # the loss is the mean over labelled tokens, not a mean of per-micro-batch means
  labels = np.asarray(batch["labels"][0])
  logits = np.asarray(_forward(state["params"], {"inputs": batch["inputs"][0]}), np.float64)
  logz = np.log(np.exp(logits).sum(-1))
  mask = labels >= 0
  gold = np.take_along_axis(logits, np.where(mask, labels, 0)[..., None], -1)[..., 0]
  np.testing.assert_allclose(m1["loss"], ((logz - gold) * mask).sum() / mask.sum(), rtol=1e-5)
  assert float(m1["tokens"]) == mask.sum()


def test_non_finite_step_is_skipped_and_counted(rng):
  optimizer = optax.adamw(1e-2)
  state = _state(rng, optimizer)
  state["params"]["emb"] = state["params"]["emb"].at[V - 1].set(jnp.nan)
  step = jax.jit(make_train_step(_forward, optimizer))
  bad = _batch(rng, 4, 2)
  bad["inputs"] = bad["inputs"].at[0, 0, 0].set(V - 1)
  after, metrics = step(state, bad)
  assert not bool(metrics["finite"]) and int(after["skipped"]) == 1 and int(after["step"]) == 1
  for a, b in zip(jax.tree.leaves((after["params"], after["opt_state"])),
                  jax.tree.leaves((state["params"], state["opt_state"]))):
    np.testing.assert_array_equal(a, b)  # nothing applied, Adam's moments untouched
  good, metrics = step(after, _batch(rng, 4, 2))
  assert bool(metrics["finite"]) and int(good["skipped"]) == 1
  assert not np.array_equal(good["params"]["out"], after["params"]["out"])


class _Model(nnx.Module):
  def __init__(self, rngs):
    self.proj = nnx.Linear(4, 8, use_bias=True, rngs=rngs)
    self.norm = nnx.RMSNorm(8, rngs=rngs)
    self.decay = SSMParam(jnp.ones((8, 4)))
    self.embed = nnx.Param(jnp.ones((16, 8)))


def test_decay_mask_skips_norms_biases_and_ssm_params():
  params = nnx.state(nnx.eval_shape(lambda: _Model(nnx.Rngs(0))), nnx.Param)
  mask = decay_mask(params)
  assert mask == {"proj": {"kernel": True, "bias": False}, "norm": {"scale": False}, "decay": False,
                  "embed": True}


def test_schedule_warms_up_then_decays():
  schedule = lr_schedule(OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1), 110)
  assert float(schedule(0)) == 0.0 and float(schedule(10)) == 1.0
  assert float(schedule(60)) < 1.0 and abs(float(schedule(110)) - 0.1) < 1e-6


def test_chunked_and_labelled_losses_equal_the_full_logits_loss(rng):
  """loss_chunk > 0 (the train step's fused loss, train/loss.py; chunks that do not divide T, the last one padded)
  and the labelled-positions loss (logits only where rows have labels; rows with fewer labels padded), alone and
  composed, give the same update as the whole logits tensor, and the eval step the same per-row sums: the LM's
  features · head_EV are its logits, tied and untied heads alike (tied: the gradient reaches the embedding through
  head_EV's transpose)."""
  from jaxlm.models import LM, load_preset
  from train.state import create_state
  from train.mesh import make_mesh
  from train.config import MeshConfig
  from train.step import make_eval_step, make_forward
  import dataclasses
  for tie in (True, False):
    config = dataclasses.replace(load_preset("transformer-tiny"), tie_embeddings=tie)
    optimizer = optax.sgd(1.0)  # the update is the gradient (Adam's g/|g| would magnify rounding near 0)
    state, setup = create_state(lambda: LM(config, rngs=nnx.Rngs(0)), optimizer, make_mesh(MeshConfig()), 0)
    tokens = rng.integers(0, 256, (2, 2, 13))
    labels = rng.integers(0, 256, (2, 2, 13))
    labels[rng.random(labels.shape) < 0.6] = IGNORE
    most = int((labels >= 0).sum(-1).max())
    batch = dict(inputs=jnp.asarray(tokens, jnp.int32), labels=jnp.asarray(labels, jnp.int32))
    results, evals = {}, {}
    for chunk, labelled in ((0, 0), (4, 0), (0, most), (2, most)):
      forward = make_forward(setup.graphdef, setup.rest, loss_chunk=chunk, labelled=labelled)
      results[chunk, labelled] = jax.jit(make_train_step(forward, optimizer))(state, batch)
      evals[chunk, labelled] = jax.jit(make_eval_step(forward))(state["params"], jax.tree.map(lambda x: x[0], batch))
    full, m_full = results.pop((0, 0))
    for key, sums in evals.items():
      for name in ("loss", "correct", "tokens"):
        np.testing.assert_allclose(sums[name], evals[0, 0][name], rtol=1e-6, err_msg=f"{key} {name}")
    for key, (other, m_other) in results.items():
      np.testing.assert_allclose(m_other["loss"], m_full["loss"], rtol=1e-6, err_msg=str(key))
      np.testing.assert_allclose(m_other["accuracy"], m_full["accuracy"], rtol=1e-6, err_msg=str(key))
      np.testing.assert_allclose(m_other["grad_norm"], m_full["grad_norm"], rtol=1e-5, err_msg=str(key))
      assert float(m_other["tokens"]) == float(m_full["tokens"]) == (labels >= 0).sum()
      for a, b in zip(jax.tree.leaves(other["params"]), jax.tree.leaves(full["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=str(key))


def test_mqar_data_bounds_the_labels_per_row():
  """The labelled-positions loss is exact only if no row has more labels than the data says (train and eval
  apart: their settings differ)."""
  from train.config import TrainConfig, MQARDataConfig, MQARSetting, DataConfig
  from train.data import build_data
  settings = [MQARSetting(seq_len=32, num_kv_pairs=4, num_examples=64), MQARSetting(seq_len=64, num_kv_pairs=8,
                                                                                     num_examples=64)]
  config = TrainConfig(data=DataConfig(kind="mqar", mqar=MQARDataConfig(vocab_size=128, train=settings,
                                                                        test=settings[:1])), batch_size=8)
  data = build_data(config, 128)
  assert (data.train_labels_per_row, data.eval_labels_per_row) == (8, 4)


def test_accumulation_reduces_over_data_once_per_step():
  """micro_batches=2 on a (data=2, fsdp=2, tensor=2) mesh of 8 host devices (a process of its own: XLA_FLAGS must
  be set before jax starts): the compiled step reduces gradients over `data` only after the micro-batch loop, never
  inside it, and its update equals micro_batches=1 on the same rows."""
  import json
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
             PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, os.path.join(root, "tests", "train", "accumulation_worker.py")],
                        capture_output=True, text=True, env=env, timeout=600, cwd=root)
  assert proc.returncode == 0, proc.stderr[-4000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  two, one = result["2"], result["1"]
  assert two["reductions"]["inside"] == 0, two["reductions"]
  assert two["reductions"]["outside"] > 0, two["reductions"]  # the parser does see reductions over `data`
  np.testing.assert_allclose(two["loss"], one["loss"], rtol=1e-6)
  np.testing.assert_allclose(two["grad_norm"], one["grad_norm"], rtol=1e-5)
  for a, b in zip(two["params"], one["params"]):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _fused_inputs(rng, scale):
  B, T, E, V = 3, 11, 8, 37
  x_BTE = jnp.asarray(rng.standard_normal((B, T, E)) * scale, jnp.float32)
  w_EV = jnp.asarray(rng.standard_normal((E, V)), jnp.float32)
  labels_BT = rng.integers(0, V, (B, T))
  pick = rng.random((B, T)) < 0.3
  labels_BT[pick] = np.asarray(jnp.argmax(x_BTE @ w_EV, -1))[pick]
  labels_BT[rng.random((B, T)) < 0.4] = IGNORE
  return x_BTE, w_EV, jnp.asarray(labels_BT, jnp.int32)


def _oracle_sums(x_BTE, w_EV, labels_BT):
  from train.step import token_stats
  loss, correct, mask = token_stats(jnp.einsum("bte,ev->btv", x_BTE, w_EV, preferred_element_type=jnp.float32),
                                    labels_BT)
  return loss.sum(), correct.sum(), mask.sum()


def test_fused_loss_equals_token_stats_and_its_gradient(rng):
  """train/loss.py's fused_token_sums against token_stats of the whole logits: loss sum, correct and labelled
  counts, and the gradient in x and W of a sum that weights the loss by a non-unit cotangent and includes the
  counts (whose gradient is zero). Scale 40 puts logits past float32's exp range (the max subtraction matters);
  chunk 4 does not divide T=11, chunk 11 is one chunk."""
  from train.loss import fused_token_sums
  for scale in (1.0, 40.0):
    x_BTE, w_EV, labels_BT = _fused_inputs(rng, scale)
    want = _oracle_sums(x_BTE, w_EV, labels_BT)
    assert 0 < float(want[1]) < float(want[2])  # some but not all labelled tokens are correct
    objective = lambda sums: 2.5 * sums[0] + sums[1] + sums[2]
    want_dx, want_dw = jax.grad(lambda x, w: objective(_oracle_sums(x, w, labels_BT)), (0, 1))(x_BTE, w_EV)
    for chunk in (4, 11):
      fused = jax.jit(lambda x, w: fused_token_sums(x, w, labels_BT, chunk))
      got = fused(x_BTE, w_EV)
      np.testing.assert_allclose(got[0], want[0], rtol=1e-6, err_msg=f"{scale=} {chunk=}")
      assert float(got[1]) == float(want[1]) and float(got[2]) == float(want[2])
      dx, dw = jax.jit(jax.grad(lambda x, w: objective(fused(x, w)), (0, 1)))(x_BTE, w_EV)
      tol = 1e-6 * float(jnp.abs(want_dw).max())
      np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=tol, err_msg=f"{scale=} {chunk=}")
      np.testing.assert_allclose(dw, want_dw, rtol=1e-5, atol=tol, err_msg=f"{scale=} {chunk=}")
  # bf16 inputs (the train step's compute dtype): gradients come back in bf16, near the float32 oracle's
  x_BTE, w_EV, labels_BT = _fused_inputs(rng, 1.0)
  want_dx, want_dw = jax.grad(lambda x, w: _oracle_sums(x, w, labels_BT)[0], (0, 1))(x_BTE, w_EV)
  half = lambda a: a.astype(jnp.bfloat16)
  dx, dw = jax.grad(lambda x, w: fused_token_sums(x, w, labels_BT, 4)[0], (0, 1))(half(x_BTE), half(w_EV))
  assert dx.dtype == dw.dtype == jnp.bfloat16
  np.testing.assert_allclose(dx.astype(jnp.float32), want_dx, atol=0.05 * float(jnp.abs(want_dx).max()))
  np.testing.assert_allclose(dw.astype(jnp.float32), want_dw, atol=0.05 * float(jnp.abs(want_dw).max()))


def _equations(jaxpr):
  """The equations of a jaxpr and of the jaxprs nested in it (scan bodies, jit calls)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          yield from _equations(sub)


def test_fused_loss_backward_computes_no_logits(rng):
  """The gradient of the fused loss holds one x·W product per chunk (the forward's, in the scan body) where the
  jax.checkpoint form of chunked_token_stats holds two (its backward recomputes the chunk's logits), and no array
  bigger than one chunk's logits [B, C, V]."""
  from train.loss import fused_token_sums
  from train.step import Features, chunked_token_stats
  x_BTE, w_EV, labels_BT = _fused_inputs(rng, 1.0)
  B, chunk, V = x_BTE.shape[0], 4, w_EV.shape[1]
  fused = jax.make_jaxpr(jax.grad(lambda x, w: fused_token_sums(x, w, labels_BT, chunk)[0], (0, 1)))(x_BTE, w_EV)
  remat = jax.make_jaxpr(jax.grad(lambda x, w: chunked_token_stats(Features(x, w, chunk), labels_BT)[0].sum(),
                                  (0, 1)))(x_BTE, w_EV)
  logits_products = lambda jaxpr: sum(eqn.primitive.name == "dot_general" and eqn.outvars[0].aval.shape == (B, chunk, V)
                                      for eqn in _equations(jaxpr))
  assert logits_products(fused.jaxpr) == 1
  assert logits_products(remat.jaxpr) == 2
  assert max(v.aval.size for eqn in _equations(fused.jaxpr) for v in eqn.outvars) <= B * chunk * V
