"""Stage 2, low-rank linearizing: LoRA adapters on the mixers' projections trained on the next-token loss, every
other parameter frozen (the feature maps included, as in LoLCATs); then the adapters are merged into the weights.

The step differentiates with respect to the adapters only (`is_lora_param`), so the optimizer's state is as small
as they are; the loss is train/step.py's token cross-entropy (labels < 0 ignored, optionally chunked).

Letters: B batch, T length.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import optax
from flax import nnx

from train.step import Features, summed_token_stats


def token_loss(model, inputs_BT: jax.Array, labels_BT: jax.Array, loss_chunk: int) -> tuple[jax.Array, jax.Array]:
  """(summed cross-entropy, labelled tokens) of `model` on a batch; no segment ids (train/linearize/data.py)."""
  if loss_chunk:
    out = Features(model.features(inputs_BT), model.head_EV(), loss_chunk)
  else:
    out = model(inputs_BT)
  loss, _, tokens = summed_token_stats(out, labels_BT)  # chunked: the fused loss, no logits recomputed
  return loss, tokens


def make_lora_step(graph: nnx.GraphDef, optimizer: optax.GradientTransformation, loss_chunk: int) -> Callable:
  """(adapters, opt_state, frozen, batch) -> (adapters, opt_state, metrics); jit it."""

  def loss_fn(adapters, frozen, batch):
    total, tokens = token_loss(nnx.merge(graph, adapters, frozen), batch["inputs"], batch["labels"], loss_chunk)
    return total / jax.numpy.maximum(tokens, 1.0), tokens

  def step(adapters, opt_state, frozen, batch):
    (loss, tokens), grads = jax.value_and_grad(loss_fn, has_aux=True)(adapters, frozen, batch)
    updates, opt_state = optimizer.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state, dict(loss=loss, tokens=tokens,
                                                                 grad_norm=optax.tree.norm(grads))

  return step
