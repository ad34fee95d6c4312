"""The decoder LM: token embedding, a stack of pre-norm blocks (mixer, then MLP), final norm, LM head.

  h_0 = W_emb[tokens] (+ W_pos[positions])
  h_{l+1} = h_l + Mixer_l(Norm(h_l)),   h_{l+1} += MLP_l(Norm(h_{l+1}))
  logits = Norm(h_last) W_embᵀ (tied) or Norm(h_last) W_head   (float32)

The residual stream is float32; mixers and MLPs compute in the config's dtype. Runs of identical consecutive
layers are built stacked (`nnx.vmap`, a leading "layers" axis on every parameter) and run with `jax.lax.scan`
over the split state, so compile time grows with the number of runs, not of layers. Decode keeps one cache per
layer and unrolls the layers, so each step updates the caches in place; `LMCache.lengths_B` counts the tokens
seen per row. `extend` continues the caches by a piece of a prompt (chunked prefill), unrolled the same way.

Each layer's mixer is built as `Mixer(config, *, dtype, param_dtype, rngs)` from the class that
jaxlm/models/registry.py's MIXERS names (imported there directly) and the config `ModelConfig.mixer_configs()`
made for it.

Letters: B batch, T length, E model width, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxlm.layers.embedding import Embedding, LMHead, PositionEmbedding
from jaxlm.layers.mlp import build_mlp
from jaxlm.layers.norms import build_norm
from jaxlm.layers.rotary import default_positions
from jaxlm.models.config import ModelConfig
from jaxlm.models.registry import MIXERS
from pallas_kernels.common.sharding import current_mesh


class LMCache(NamedTuple):
  layers: tuple[tuple[Any, ...], ...]  # per run of layers: one mixer cache per layer
  lengths_B: jax.Array  # tokens seen per row (int32)


class Block(nnx.Module):
  """x + Mixer(Norm(x)), then + MLP(Norm(x)): one pre-norm decoder layer."""

  def __init__(self, config: ModelConfig, mixer: str, *, rngs: nnx.Rngs):
    dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    norm = dict(eps=config.norm_eps, dtype=dtype, param_dtype=param_dtype)
    self.mixer_norm = build_norm(config.norm, config.d_model, **norm)
    self.mixer = MIXERS[mixer].module_cls(config.mixer_configs()[mixer], dtype=dtype, param_dtype=param_dtype,
                                          rngs=rngs)
    self.mlp_norm = build_norm(config.norm, config.d_model, **norm) if config.mlp != "none" else None
    self.mlp = build_mlp(config.mlp, config.d_model, config.hidden, use_bias=config.mlp_bias,
                         nblocks=config.mlp_nblocks, dtype=dtype, param_dtype=param_dtype,
                         implementation=config.implementation, rngs=rngs)

  def _mlp(self, x: jax.Array) -> jax.Array:
    if self.mlp is None:
      return x
    return x + checkpoint_name(self.mlp(self.mlp_norm(x)), "mlp_out").astype(x.dtype)

  def __call__(self, x_BTE: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    kwargs = {} if segment_ids is None else dict(segment_ids=segment_ids)
    y = checkpoint_name(self.mixer(self.mixer_norm(x_BTE), **kwargs), "mixer_out")
    return self._mlp(x_BTE + y.astype(x_BTE.dtype))

  def prefill(self, x_BTE: jax.Array, cache: Any, lengths_B: jax.Array) -> tuple[jax.Array, Any]:
    y, cache = self.mixer.prefill(self.mixer_norm(x_BTE), cache, lengths_B)
    return self._mlp(x_BTE + y.astype(x_BTE.dtype)), cache

  def decode(self, x_BE: jax.Array, cache: Any) -> tuple[jax.Array, Any]:
    y, cache = self.mixer.decode(self.mixer_norm(x_BE), cache)
    return self._mlp(x_BE + y.astype(x_BE.dtype)), cache

  def extend(self, x_BTE: jax.Array, cache: Any, valid_B: jax.Array) -> tuple[jax.Array, Any]:
    y, cache = self.mixer.extend(self.mixer_norm(x_BTE), cache, valid_B)
    return self._mlp(x_BTE + y.astype(x_BTE.dtype)), cache


def remat_policy(name: str) -> Any:
  """A jax.checkpoint policy by name (the names train/ uses): full, dots, names:<a>,<b>."""
  policies = jax.checkpoint_policies
  if name == "full":
    return policies.nothing_saveable
  if name == "dots":
    return policies.dots_with_no_batch_dims_saveable
  return policies.save_only_these_names(*[n for n in name[len("names:"):].split(",") if n])


class LayerStack(nnx.Module):
  """`num_layers` identical blocks with stacked parameters, run by lax.scan (or a loop, scan_layers=False)."""

  def __init__(self, config: ModelConfig, mixer: str, num_layers: int, *, rngs: nnx.Rngs):
    self.num_layers = num_layers
    self.scan = config.scan_layers
    self.remat = config.remat

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(rngs: nnx.Rngs) -> Block:
      return Block(config, mixer, rngs=rngs)

    self.blocks = create(rngs)

  def _run(self, step: Callable[[Block, jax.Array, Any], tuple[jax.Array, Any]], x: jax.Array, per_layer: Any
           ) -> tuple[jax.Array, Any]:
    """Folds `step(block, x, per_layer[i]) -> (x, out_i)` over the layers; returns x and the stacked outs."""
    graphdef, state = nnx.split(self.blocks)

    def body(carry, inputs):
      layer_state, extra = inputs
      return step(nnx.merge(graphdef, layer_state), carry, extra)

    if self.remat != "none":
      body = jax.checkpoint(body, policy=remat_policy(self.remat))
    if self.scan:
      return jax.lax.scan(body, x, (state, per_layer))
    outs = []
    for i in range(self.num_layers):
      x, out = body(x, jax.tree.map(lambda a: a[i], (state, per_layer)))
      outs.append(out)
    return x, jax.tree.map(lambda *a: jnp.stack(a), *outs) if outs[0] is not None else None

  def __call__(self, x_BTE: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    return self._run(lambda block, x, _: (block(x, segment_ids), None), x_BTE, None)[0]

  def init_cache(self, batch: int, max_length: int, dtype: Any) -> tuple[Any, ...]:
    """One cache per layer, not stacked: in the generation loop each decode step then updates a layer's cache in
    place, where a stacked cache would be sliced out and written back whole by the layer scan (measured on the
    H100: a 360M Transformer at batch 32 took 21.5 ms per token with its 6 GiB KV cache stacked)."""
    graphdef, state = nnx.split(self.blocks)
    first = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], state))  # caches do not depend on the weights
    return tuple(first.mixer.init_cache(batch, max_length, dtype) for _ in range(self.num_layers))

  def prefill(self, x_BTE: jax.Array, caches: tuple[Any, ...], lengths_B: jax.Array) -> tuple[jax.Array, Any]:
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *caches)
    x, stacked = self._run(lambda block, x, c: block.prefill(x, c, lengths_B), x_BTE, stacked)
    return x, tuple(jax.tree.map(lambda a: a[i], stacked) for i in range(self.num_layers))

  def decode(self, x_BE: jax.Array, caches: tuple[Any, ...]) -> tuple[jax.Array, tuple[Any, ...]]:
    """The layers unrolled (the weights' static slices are loop-invariant: XLA hoists them out of the loop)."""
    return self._unrolled(lambda block, x, cache: block.decode(x, cache), x_BE, caches)

  def extend(self, x_BTE: jax.Array, caches: tuple[Any, ...], valid_B: jax.Array) -> tuple[jax.Array, Any]:
    """One piece of a chunked prefill, the layers unrolled as in decode: each cache is updated in place, where
    prefill's stacked scan would copy them all into one array and back every piece."""
    return self._unrolled(lambda block, x, cache: block.extend(x, cache, valid_B), x_BTE, caches)

  def _unrolled(self, step: Callable[[Block, jax.Array, Any], tuple[jax.Array, Any]], x: jax.Array,
                caches: tuple[Any, ...]) -> tuple[jax.Array, tuple[Any, ...]]:
    graphdef, state = nnx.split(self.blocks)
    updated = []
    for i, cache in enumerate(caches):
      x, cache = step(nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state)), x, cache)
      updated.append(cache)
    return x, tuple(updated)


class LM(nnx.Module):
  """Decoder LM from a `ModelConfig`: parallel forward, and prefill/decode for generation."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    self.dtype = dtype
    # Logical axis names only become shardings under a mesh; without one, keep them as metadata.
    eager = nnx.using_eager_sharding() and current_mesh() is not None
    with nnx.use_eager_sharding(eager):
      emb = dict(init_std=config.init_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
      self.embed = Embedding(config.vocab_size, config.d_model, **emb)
      self.pos_embed = (PositionEmbedding(config.max_length, config.d_model, **emb)
                        if config.position_embedding == "learned" else None)
      self.stacks = nnx.List([LayerStack(config, name, n, rngs=rngs) for name, n in config.layer_groups()])
      self.final_norm = build_norm(config.norm, config.d_model, eps=config.norm_eps, dtype=dtype,
                                   param_dtype=param_dtype)
      self.head = None if config.tie_embeddings else LMHead(config.d_model, config.vocab_size, **emb)

  def _embed(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
    x = self.embed(tokens).astype(jnp.float32)
    if self.pos_embed is not None:
      x = x + self.pos_embed(positions).astype(jnp.float32)
    return x

  def _logits(self, x: jax.Array) -> jax.Array:
    x = self.final_norm(x)
    return self.embed.attend(x) if self.head is None else self.head(x)

  def _hidden(self, tokens_BT: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    """The last block's output [B, T, E], before the final norm."""
    B, T = tokens_BT.shape
    self._check_length(T)
    x = self._embed(tokens_BT, default_positions(B, T, segment_ids))
    for stack in self.stacks:
      x = stack(x, segment_ids)
    return x

  def __call__(self, tokens_BT: jax.Array, *, segment_ids: jax.Array | None = None) -> jax.Array:
    """logits [B, T, V] float32; with segment_ids, packed documents neither see each other nor share positions."""
    return self._logits(self._hidden(tokens_BT, segment_ids))

  def features(self, tokens_BT: jax.Array, *, segment_ids: jax.Array | None = None) -> jax.Array:
    """The final-normed hidden states [B, T, E] in the compute dtype: __call__'s logits are features · head_EV()
    with float32 accumulation (train/step.py's chunked loss takes them so as never to hold [B, T, V] at once)."""
    return self.final_norm(self._hidden(tokens_BT, segment_ids)).astype(self.dtype)

  def head_EV(self) -> jax.Array:
    """The LM head [E, V] in the compute dtype (the embedding's transpose when tied)."""
    if self.head is None:
      return self.embed.embedding[...].astype(self.dtype).T
    return self.head.kernel[...].astype(self.dtype)

  def _check_length(self, length: int) -> None:
    if self.pos_embed is not None and length > self.config.max_length:
      raise ValueError(f"sequence length {length} exceeds max_length={self.config.max_length} (learned positions)")

  def init_cache(self, batch: int, max_length: int) -> LMCache:
    """An empty cache for `batch` rows of up to `max_length` tokens (prompt and generated)."""
    self._check_length(max_length)
    return LMCache(tuple(stack.init_cache(batch, max_length, self.dtype) for stack in self.stacks),
                   jnp.zeros((batch,), jnp.int32))

  def prefill(self, tokens_BT: jax.Array, cache: LMCache, lengths_B: jax.Array) -> tuple[jax.Array, LMCache]:
    """Right-padded prompts (row b has lengths[b] >= 1 tokens) in the parallel form: (logits [B, V] float32 at
    each row's last prompt token, the cache to decode from)."""
    B, T = tokens_BT.shape
    lengths_B = jnp.asarray(lengths_B, jnp.int32)
    x = self._embed(tokens_BT, default_positions(B, T))
    layers = []
    for stack, layer_cache in zip(self.stacks, cache.layers):
      x, layer_cache = stack.prefill(x, layer_cache, lengths_B)
      layers.append(layer_cache)
    last_BE = jnp.take_along_axis(x, jnp.maximum(lengths_B - 1, 0)[:, None, None], axis=1)[:, 0]
    return self._logits(last_BE), LMCache(tuple(layers), lengths_B)

  def extend(self, tokens_BT: jax.Array, cache: LMCache, valid_B: jax.Array) -> tuple[jax.Array, LMCache]:
    """One piece of a chunked prefill: tokens at positions lengths[b]..., the first valid[b] of them real (rows
    with valid[b] <= 0 keep their cache): (logits [B, V] float32 at each row's last real token of the piece, the
    advanced cache). Pieces in order equal one prefill over their concatenation."""
    T = tokens_BT.shape[1]
    missing = sorted({type(stack.blocks.mixer).__name__ for stack in self.stacks
                      if not hasattr(stack.blocks.mixer, "extend")})
    if missing:
      raise ValueError(f"chunked prefill (prefill_chunk) needs every mixer to continue a cache from a partial "
                       f"prompt (an `extend` method); {missing} cannot")
    valid_B = jnp.clip(jnp.asarray(valid_B, jnp.int32), 0, T)
    x = self._embed(tokens_BT, cache.lengths_B[:, None] + jnp.arange(T, dtype=jnp.int32))
    layers = []
    for stack, layer_cache in zip(self.stacks, cache.layers):
      x, layer_cache = stack.extend(x, layer_cache, valid_B)
      layers.append(layer_cache)
    last_BE = jnp.take_along_axis(x, jnp.maximum(valid_B - 1, 0)[:, None, None], axis=1)[:, 0]
    return self._logits(last_BE), LMCache(tuple(layers), cache.lengths_B + valid_B)

  def decode(self, tokens_B: jax.Array, cache: LMCache) -> tuple[jax.Array, LMCache]:
    """One token per row at position lengths[b]: (logits [B, V] float32, the advanced cache)."""
    x = self._embed(tokens_B, cache.lengths_B)
    layers = []
    for stack, layer_cache in zip(self.stacks, cache.layers):
      x, layer_cache = stack.decode(x, layer_cache)
      layers.append(layer_cache)
    return self._logits(x), LMCache(tuple(layers), cache.lengths_B + 1)


def abstract_model(config: ModelConfig, seed: int = 0) -> LM:
  """The LM with ShapeDtypeStructs for arrays: shapes and axis names, no memory."""
  with nnx.use_eager_sharding(False):
    return nnx.eval_shape(lambda: LM(config, rngs=nnx.Rngs(seed)))


def count_params(config: ModelConfig) -> int:
  """Number of parameters (every nnx.Param, SSM parameters included), counted without allocating them."""
  return sum(x.size for x in jax.tree.leaves(nnx.state(abstract_model(config), nnx.Param)))
