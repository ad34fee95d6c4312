"""The LoLCATs mixer against the Mixer contract and its parent: prefill + decode equal the parallel form (ragged
prompts, both feature maps, GQA), a softmax Attention's projections load into it and give the same output when
the window covers the sequence, causality, and a tiny LM using it trains a step.

Letters: B batch, T length, E model width.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxlm.layers.attention import Attention, AttentionConfig
from jaxlm.layers.lolcats import Lolcats, LolcatsConfig
from jaxlm.models import LM, ModelConfig
from jaxlm.models.state_size import mixer_state_size
from tests.tolerances import assert_close, normal

B, T, E = 2, 14, 32
CONFIGS = {
    "hedgehog_gqa": LolcatsConfig(E, num_heads=4, num_kv_heads=2, window=4, feature_dim=4, rotary_dim=4,
                                  init_window_factor=0.7),
    "taylor_affine": LolcatsConfig(E, num_heads=2, window=5, feature_map="taylor", feature_dim=3,
                                   affine_factors=True),
}


def make(config, seed=0):
  with nnx.use_eager_sharding(False):
    mixer = Lolcats(config, rngs=nnx.Rngs(seed))
  # Random feature maps and factors (not the identity init) so that every parameter matters.
  keys = jax.random.split(jax.random.key(seed + 1), 3)
  mixer.feature_q_HDF[...] = 0.5 * jax.random.normal(keys[0], mixer.feature_q_HDF.shape)
  mixer.feature_k_HDF[...] = 0.5 * jax.random.normal(keys[1], mixer.feature_k_HDF.shape)
  mixer.window_factor_H[...] = jax.random.normal(keys[2], mixer.window_factor_H.shape)
  return mixer


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_then_decode_equals_parallel(name, rng):
  mixer = make(CONFIGS[name])
  graphdef, state = nnx.split(mixer)
  run = lambda f: jax.jit(lambda s, *a: f(nnx.merge(graphdef, s), *a))  # noqa: E731
  x = normal(rng, (B, T, E))
  want = run(lambda m, x: m(x))(state, x)
  prefill = run(lambda m, x, n: m.prefill(x, m.init_cache(B, T), n))
  decode = run(lambda m, x, c: m.decode(x, c))
  rows = np.arange(B)
  for lengths in (np.array([2, 7]), np.array([9, 1])):
    width = lengths.max()
    prompt = np.array(x[:, :width])
    for b, n in enumerate(lengths):
      prompt[b, n:] = rng.standard_normal((width - n, E))  # what the padding holds must not matter
    out, cache = prefill(state, jnp.asarray(prompt), jnp.asarray(lengths))
    assert_close(out[rows, lengths - 1], want[rows, lengths - 1], dtype=jnp.float32, reduction_len=E,
                 name=f"prefill {lengths}")
    for i in range(T - width):
      out, cache = decode(state, x[rows, lengths + i], cache)
      assert_close(out, want[rows, lengths + i], dtype=jnp.float32, reduction_len=E, name=f"step {i} {lengths}")
    np.testing.assert_array_equal(np.asarray(cache.lengths_B), lengths + T - width)


def test_causal(rng):
  mixer = make(CONFIGS["hedgehog_gqa"])
  x = normal(rng, (1, T, E))
  r = normal(rng, (T, E))
  jac = np.abs(np.asarray(jax.jit(jax.jacrev(lambda x: (mixer(x)[0] * r).sum(-1)))(x))).sum(axis=(1, 3))
  assert (jac[np.triu_indices(T, k=1)] == 0).all()
  assert (np.diag(jac) > 0).all()


def test_attention_weights_load_and_match_when_the_window_covers_the_sequence(rng):
  """The projections have Attention's names and shapes; with window >= T there is no linear term, and the output
  is softmax attention's whatever the feature maps and factors."""
  attention_config = AttentionConfig(E, num_heads=4, num_kv_heads=2, rotary_dim=4)
  with nnx.use_eager_sharding(False):
    attention = Attention(attention_config, rngs=nnx.Rngs(3))
  mixer = make(dataclasses.replace(CONFIGS["hedgehog_gqa"], window=T, init_window_factor=0.0))
  nnx.update(mixer, nnx.state(attention))  # every Attention parameter has a home in the mixer
  x = normal(rng, (B, T, E))
  assert_close(mixer(x), attention(x), dtype=jnp.float32, reduction_len=T)


def test_state_size_counts_the_cache():
  config = CONFIGS["hedgehog_gqa"]
  mixer = make(config)
  cache = mixer.init_cache(1, 100, jnp.float32)
  stored = sum(x.size for x in jax.tree.leaves(cache)) - 1  # less the length counter
  assert mixer_state_size("lolcats", config, d_model=E, seq_len=100) == stored


def test_tiny_lm_trains_a_step(rng):
  """Two LoLCATs layers (GQA, RoPE) in the LM: finite loss and gradients reaching the feature maps and factors,
  and an AdamW step lowers the loss on the batch."""
  config = ModelConfig(vocab_size=64, d_model=E, num_layers=2, mixers="lolcats", mlp="swiglu", mlp_hidden=64,
                       dtype="float32", max_length=32,
                       mixer_options={"lolcats": dict(num_heads=4, num_kv_heads=2, window=4, feature_dim=4)})
  model = LM(config, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
  optimizer = nnx.Optimizer(model, optax.adamw(3e-3), wrt=nnx.Param)
  tokens = jnp.asarray(rng.integers(0, 64, (2, 17)), jnp.int32)

  def loss_fn(model):
    logits = model(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss, grads

  loss0, grads = step(model, optimizer)
  assert np.isfinite(float(loss0))
  flat = {"/".join(map(str, path)): np.asarray(g) for path, g in nnx.to_flat_state(grads)}
  for part in ("feature_q_HDF", "feature_k_HDF", "window_factor_H"):
    found = [g for path, g in flat.items() if part in path]
    assert found and all(np.isfinite(g).all() and np.abs(g).max() > 0 for g in found), part
  loss1, _ = step(model, optimizer)
  assert float(loss1) < float(loss0)


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match="window"):
    LolcatsConfig(E, num_heads=2, window=0)
  with pytest.raises(ValueError, match="feature_map"):
    LolcatsConfig(E, num_heads=2, feature_map="relu")
  with pytest.raises(ValueError, match="feature_dim"):
    LolcatsConfig(E, num_heads=2, feature_map="taylor", feature_dim=32)
  with pytest.raises(ValueError, match="num_kv_heads"):
    LolcatsConfig(E, num_heads=4, num_kv_heads=3)
