"""The jitted train and eval steps, as pure functions of a state dict and a batch.

Letters: M micro-batches, B rows, T length, V vocabulary, R data replicas (the mesh's `data` axis).

Train step: the batch arrives as [M, B/M, T]; `lax.scan` runs forward+backward per micro-batch and sums the
token losses and gradients, then divides both by the total count of labelled tokens, so the result equals one
big batch whatever M is (loss normalised by tokens, not by rows or micro-batches). A step whose loss or gradient
norm is not finite leaves parameters and optimizer state untouched and increments `skipped`. With R > 1 data
replicas and M > 1, each replica sums its own rows' gradients over the micro-batches and the replicas' sums are
added once after the loop (`summed_grads_per_replica`), not once per micro-batch.

Labels < 0 are ignored (MQAR's non-query positions, document boundaries of packed text, padding). With
`loss_chunk` the train step's loss is train/loss.py's fused one (`summed_token_stats`); `token_stats` of the whole
logits is the oracle it is tested against.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from train.loss import fused_token_sums, split_chunks
from train.optimizer import peak_lr

IGNORE = -100
DATA_AXIS = "data"  # the mesh axis of pure data parallelism (train/mesh.py): parameters are replicated over it

State = dict[str, Any]  # {"params", "opt_state", "step", "rng", "skipped"}
Batch = dict[str, jax.Array]  # {"inputs", "labels", optional "segment_ids"}


def token_stats(logits_BTV: jax.Array, labels_BT: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-token cross-entropy, correctness (argmax == label) and label mask, all [B, T] float32."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  mask = labels_BT >= 0
  safe = jnp.where(mask, labels_BT, 0)
  log_z = jax.nn.logsumexp(logits_BTV, axis=-1)
  gold = jnp.take_along_axis(logits_BTV, safe[..., None], axis=-1)[..., 0]
  loss = jnp.where(mask, log_z - gold, 0.0)
  correct = jnp.where(mask, jnp.argmax(logits_BTV, axis=-1) == safe, False)
  return loss, correct.astype(jnp.float32), mask.astype(jnp.float32)


class Features(NamedTuple):
  """A forward's output for the loss computed from the final hidden states and the LM head, logits = x_BTE · w_EV,
  without the [B, T, V] logits of the whole batch."""
  x_BTE: jax.Array
  w_EV: jax.Array
  chunk: int  # positions whose logits exist at once (0: all of them)
  labelled: int = 0  # > 0: logits only at each row's first `labelled` labelled positions (see labelled_positions)


def labelled_positions(x_BTE: jax.Array, labels_BT: jax.Array, count: int) -> tuple[jax.Array, jax.Array]:
  """Each row's first `count` labelled positions, [B, count, E] and [B, count] (a row with fewer labels is padded
  with IGNORE). Exact when no row has more than `count` labels: the loss only ever reads labelled positions. MQAR
  labels 4-64 of 64-512 positions, so the LM head (most of a small model's FLOPs) shrinks 4-16x."""
  order_BC = jnp.argsort(labels_BT < 0, axis=1, stable=True)[:, :count]  # labelled first, in position order
  return (jnp.take_along_axis(x_BTE, order_BC[..., None], axis=1),
          jnp.take_along_axis(labels_BT, order_BC, axis=1))


def _at_labels(out: Features, labels_BT: jax.Array) -> tuple[Features, jax.Array]:
  """The features and labels at each row's labelled positions, where `out.labelled` asks for it."""
  if not out.labelled:
    return out, labels_BT
  x_BTE, labels_BT = labelled_positions(out.x_BTE, labels_BT, out.labelled)
  return out._replace(x_BTE=x_BTE, labelled=0), labels_BT


def chunked_token_stats(features: Features, labels_BT: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-token `token_stats` of x·w computed `chunk` positions at a time, for the eval step (which needs per-row
  sums) and per-token callers: at most [B, chunk, V] float32 logits exist at once. Each chunk is under
  jax.checkpoint, so a caller that differentiates it recomputes the logits in the backward; the train step takes
  `summed_token_stats`, whose fused loss does not."""
  w_EV, chunk = features.w_EV, features.chunk
  B, T, _ = features.x_BTE.shape
  x_JBCE, labels_JBC = split_chunks(features.x_BTE, labels_BT, chunk)

  @jax.checkpoint
  def one_chunk(x_BCE, labels_BC):
    logits_BCV = jnp.einsum("bce,ev->bcv", x_BCE, w_EV, preferred_element_type=jnp.float32)
    return token_stats(logits_BCV, labels_BC)

  stats = jax.lax.map(lambda pair: one_chunk(*pair), (x_JBCE, labels_JBC))
  return tuple(y.swapaxes(0, 1).reshape(B, -1)[:, :T] for y in stats)


def per_token_stats(out: jax.Array | Features, labels_BT: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Loss, correctness and label mask per token of a forward's output: logits, or Features (only their sums over
  tokens are defined then: with `labelled` they cover the gathered positions, not [B, T])."""
  if not isinstance(out, Features):
    return token_stats(out, labels_BT)
  out, labels_BT = _at_labels(out, labels_BT)
  if out.chunk:
    return chunked_token_stats(out, labels_BT)
  return token_stats(jnp.einsum("bte,ev->btv", out.x_BTE, out.w_EV, preferred_element_type=jnp.float32), labels_BT)


def summed_token_stats(out: jax.Array | Features, labels_BT: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(summed loss, correct tokens, labelled tokens) of a forward's output, float32 scalars: what the train step
  differentiates. Chunked Features take the fused loss (train/loss.py), whose backward reuses the gradient pieces
  its forward computed instead of recomputing each chunk's logits."""
  if isinstance(out, Features) and out.chunk:
    out, labels_BT = _at_labels(out, labels_BT)
    return fused_token_sums(out.x_BTE, out.w_EV, labels_BT, out.chunk)
  loss, correct, mask = per_token_stats(out, labels_BT)
  return loss.sum(), correct.sum(), mask.sum()


def cast_floats(tree: Any, dtype: Any) -> Any:
  """Floating leaves cast to `dtype` (bf16 compute over float32 master weights); None leaves them."""
  if dtype is None:
    return tree
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def make_forward(graphdef: nnx.GraphDef, rest: Any, *, compute_dtype: Any = None, loss_chunk: int = 0,
                 labelled: int = 0) -> Callable[[Any, Batch], jax.Array | Features]:
  """(params, batch) -> logits [B, T, V] float32, or with loss_chunk > 0 or labelled > 0 the model's Features (its
  `features` and `head_EV`) for the chunked / labelled-positions loss; params are cast to `compute_dtype` unless
  it is None. `labelled` must be at least the most labels any row has (the data counts them:
  Data.train_labels_per_row / eval_labels_per_row)."""
  def forward(params, batch):
    model = nnx.merge(graphdef, cast_floats(params, compute_dtype), rest)
    if loss_chunk or labelled:
      x_BTE = model.features(batch["inputs"], segment_ids=batch.get("segment_ids"))
      return Features(x_BTE, model.head_EV(), loss_chunk, labelled)
    return model(batch["inputs"], segment_ids=batch.get("segment_ids"))
  return forward


def has_shard_map(jaxpr: Any) -> bool:
  """Whether a jaxpr, or one nested in it, holds a shard_map (kernels run per shard: pallas_kernels/common)."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "shard_map":
      return True
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
        if hasattr(sub, "eqns") and has_shard_map(sub):
          return True
  return False


def data_replicas(param_shardings: Any, batch: Batch, forward: Callable, params: Any) -> Any:
  """The mesh whose `data` axis the step reduces gradients over once after the micro-batch loop, or None for one
  reduction per micro-batch. Once needs a sharded state (the mesh comes from its shardings), a `data` axis > 1,
  micro_batches > 1, micro-batch rows the axis divides, and a forward without per-shard kernels: their shard_map
  would see the replica axis unsplit and reshard activations around every kernel (measured on the CPU mesh: the
  data all-reduces came back into the loop). Finding those costs one more trace of the forward."""
  leaves = jax.tree.leaves(param_shardings)
  mesh = getattr(leaves[0], "mesh", None) if leaves else None
  if mesh is None or mesh.shape.get(DATA_AXIS, 1) <= 1:
    return None
  micro_batches, rows = jax.tree.leaves(batch)[0].shape[:2]
  if micro_batches <= 1 or rows % mesh.shape[DATA_AXIS]:
    return None
  micro = jax.tree.map(lambda x: x[0], batch)
  return None if has_shard_map(jax.make_jaxpr(forward)(params, micro).jaxpr) else mesh


def make_train_step(forward: Callable, optimizer: optax.GradientTransformation, param_shardings: Any = None,
                    schedule: optax.Schedule | None = None
                    ) -> Callable[[State, Batch], tuple[State, dict[str, jax.Array]]]:
  """The train step (state, batch[M, B/M, T]) -> (state, metrics); jit it with donated state.

  `param_shardings` pins the gradient accumulator to the parameters' layout; `schedule` (make_optimizer's unit
  schedule) adds the step's `lr`, times the peak the optimizer state holds.
  """

  def summed_loss(params, micro):
    loss, correct, tokens = summed_token_stats(forward(params, micro), micro["labels"])
    return loss, (tokens, correct)

  grad_fn = jax.value_and_grad(summed_loss, has_aux=True)

  def summed_grads(params, batch, layout):
    """Gradients, loss, labelled tokens and correct tokens, each summed over the micro-batches; the gradient
    accumulator is float32 in the parameters' `layout` (None: XLA's choice)."""
    def accumulate(carry, micro):
      grads, loss, tokens, correct = carry
      (l, (n, c)), g = grad_fn(params, micro)
      grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g)
      return (grads, loss + l, tokens + n, correct + c), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    if layout is not None:
      zeros = jax.lax.with_sharding_constraint(zeros, layout)
    init = (zeros, jnp.float32(0), jnp.float32(0), jnp.float32(0))
    return jax.lax.scan(accumulate, init, batch)[0]

  def summed_grads_per_replica(params, batch, mesh):
    """summed_grads with one gradient reduction over `data` per step instead of one per micro-batch (what XLA
    compiles summed_grads to: the loop body all-reduces each micro-batch's gradients over `data`). Each
    micro-batch's rows split into one group per data replica, data-major as the batch is laid out, so a group is
    one replica's rows; the gradient is taken per group (vmap) into an accumulator with a leading replica axis over
    `data`, where each device keeps its replica's partial sum; the sum over that axis after the loop is the one
    reduction. Per device the accumulator is as big as summed_grads' (params/(fsdp*tensor) float32): the replica
    axis is split over `data`, over which the parameters are replicated. The reduce-scatter over `fsdp` stays in
    the loop: deferring it would cost an unsharded accumulator."""
    R = mesh.shape[DATA_AXIS]
    layout = jax.tree.map(lambda sharding: NamedSharding(mesh, P(DATA_AXIS, *sharding.spec)), param_shardings)
    per_group = jax.vmap(grad_fn, in_axes=(None, 0))

    def accumulate(carry, micro):
      grads, loss, tokens, correct = carry
      groups = jax.tree.map(lambda x: x.reshape(R, x.shape[0] // R, *x.shape[1:]), micro)
      (l, (n, c)), g = per_group(params, groups)
      grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g)
      return (grads, loss + l, tokens + n, correct + c), None

    zeros = jax.tree.map(lambda p: jnp.zeros((R, *p.shape), jnp.float32), params)
    init = (jax.lax.with_sharding_constraint(zeros, layout), *(jnp.zeros(R, jnp.float32),) * 3)
    return jax.tree.map(lambda x: x.sum(0), jax.lax.scan(accumulate, init, batch)[0])

  def step(state: State, batch: Batch) -> tuple[State, dict[str, jax.Array]]:
    params = state["params"]
    mesh = data_replicas(param_shardings, batch, forward, params)
    if mesh is None:
      grads, loss_sum, tokens, correct = summed_grads(params, batch, param_shardings)
    else:
      grads, loss_sum, tokens, correct = summed_grads_per_replica(params, batch, mesh)
    denom = jnp.maximum(tokens, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    loss = loss_sum / denom
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    updates, opt_state = optimizer.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = dict(
        params=keep(new_params, params),
        opt_state=keep(opt_state, state["opt_state"]),
        step=state["step"] + 1,
        rng=state["rng"],
        skipped=state["skipped"] + jnp.where(finite, 0, 1).astype(state["skipped"].dtype),
    )
    metrics = dict(loss=loss, accuracy=correct / denom, tokens=tokens, grad_norm=grad_norm,
                   finite=finite, skipped=new_state["skipped"])
    if schedule is not None:
      metrics["lr"] = schedule(state["step"]) * peak_lr(state["opt_state"])
    return new_state, metrics

  return step


def make_eval_step(forward: Callable) -> Callable[[Any, Batch], dict[str, jax.Array]]:
  """(params, batch[B, T]) -> per-row sums: loss, correct and labelled tokens ([B] each)."""
  def step(params, batch):
    loss, correct, mask = per_token_stats(forward(params, batch), batch["labels"])
    return dict(loss=loss.sum(-1), correct=correct.sum(-1), tokens=mask.sum(-1))
  return step
