"""Stage 1, attention transfer: train each LoLCATs mixer to reproduce its layer's softmax attention.

One pass of the frozen teacher: at layer l, with h_l the teacher's residual stream and x = Norm_l(h_l),

  y_l = Attention_l(x),   ŷ_l = Lolcats_l(x),   mse_l = mean((ŷ_l - y_l)²),   h_{l+1} = Block_l(h_l) (teacher's)

and the loss is the mean of mse_l over the layers. Gradients reach only the student's own parameters (feature maps,
window factors): x and y_l are functions of the frozen teacher alone, so nothing flows back through the stream and
the teacher's layers run forward only. LoLCATs compares the heads' outputs before W_o; we compare the mixers'
outputs, after the (shared, frozen) W_o, so the loss reads each layer through its public interface.

Letters: B batch, T length, E model width, L layers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxlm.models.lm import LM


def _teacher_layer(block: Any, h_BTE: jax.Array, y_BTE: jax.Array) -> jax.Array:
  """The rest of jaxlm/models/lm.py's Block after its mixer gave y: residual add, then the MLP sub-layer."""
  h_BTE = h_BTE + y_BTE.astype(h_BTE.dtype)
  if block.mlp is None:
    return h_BTE
  return h_BTE + block.mlp(block.mlp_norm(h_BTE)).astype(h_BTE.dtype)


def layer_mses(teacher: LM, student: LM, tokens_BT: jax.Array) -> jax.Array:
  """mse_l [L] float32 of each student mixer against its teacher layer's attention, on the teacher's stream."""
  h_BTE = teacher.embed(tokens_BT).astype(jnp.float32)
  mses = []
  for stack_t, stack_s in zip(teacher.stacks, student.stacks, strict=True):
    graph_t, state_t = nnx.split(stack_t.blocks)
    graph_s, state_s = nnx.split(stack_s.blocks)

    def body(h_BTE, states, graph_t=graph_t, graph_s=graph_s):
      block_t, block_s = nnx.merge(graph_t, states[0]), nnx.merge(graph_s, states[1])
      x_BTE = block_t.mixer_norm(h_BTE)
      y_BTE = jax.lax.stop_gradient(block_t.mixer(x_BTE))
      mse = jnp.mean(jnp.square(block_s.mixer(x_BTE).astype(jnp.float32) - y_BTE.astype(jnp.float32)))
      return _teacher_layer(block_t, h_BTE, y_BTE), mse

    h_BTE, mse_L = jax.lax.scan(body, h_BTE, (state_t, state_s))
    mses.append(mse_L)
  return jnp.concatenate(mses)


def make_transfer_step(student_graph: nnx.GraphDef, teacher_graph: nnx.GraphDef,
                       optimizer: optax.GradientTransformation) -> Callable:
  """(trainable, opt_state, frozen, tokens [B, T]) -> (trainable, opt_state, metrics); jit it. `frozen` is the
  student's state without its own parameters, which is the teacher's state exactly."""

  def loss_fn(trainable, frozen, tokens_BT):
    student = nnx.merge(student_graph, trainable, frozen)
    teacher = nnx.merge(teacher_graph, frozen)
    mse_L = layer_mses(teacher, student, tokens_BT)
    return mse_L.mean(), mse_L

  def step(trainable, opt_state, frozen, tokens_BT):
    (loss, mse_L), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, frozen, tokens_BT)
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, dict(loss=loss, grad_norm=optax.tree.norm(grads),
                                                                   mse_first=mse_L[0], mse_last=mse_L[-1])

  return step


def make_transfer_eval(student_graph: nnx.GraphDef, teacher_graph: nnx.GraphDef) -> Callable:
  """(trainable, frozen, tokens) -> mse_l [L]; jit it."""
  def mses(trainable, frozen, tokens_BT):
    return layer_mses(nnx.merge(teacher_graph, frozen), nnx.merge(student_graph, trainable, frozen), tokens_BT)
  return mses
