"""The LM from its config: causality, prefill + decode equal to the parallel form for every tiny preset (ragged
and poisoned prompts, prefills of different lengths, a sliding window shorter than the sequence), scan equal to
a Python loop, deterministic init, sharding names, and config errors raised before anything compiles."""

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx

from jaxlm.models import LM, ModelConfig, abstract_model, load_model_config, load_preset
from tests.tolerances import assert_close

TINY = ["transformer-tiny", "based-tiny", "h3-tiny", "hyena-tiny", "gpt2-monarch-tiny"]
B, T = 2, 12


def tiny_config(name: str, **overrides) -> ModelConfig:
  config = load_preset(name)
  if name.startswith(("h3", "hyena")):
    # The FFT form of a long conv leaks float32 rounding across positions; the Toeplitz form is exactly causal.
    overrides.setdefault("implementation", {"long_conv": "direct"})
  return dataclasses.replace(config, **overrides)


def init(config: ModelConfig, seed: int = 0) -> LM:
  # rbg keys compile far faster than threefry on CPU; the init distribution is the same.
  return LM(config, rngs=nnx.Rngs(jax.random.key(seed, impl="rbg")))


class Harness:
  """A tiny model and its jitted entry points, compiled once per module."""

  def __init__(self, name: str):
    self.config = tiny_config(name)
    self.model = init(self.config)
    graphdef, state = nnx.split(self.model)
    self.state = state
    run = lambda f: jax.jit(lambda state, *a: f(nnx.merge(graphdef, state), *a))  # noqa: E731
    self.forward = functools.partial(run(lambda m, t: m(t)), state)
    self.prefill = functools.partial(run(lambda m, t, n: m.prefill(t, m.init_cache(B, T), n)), state)
    self.decode = functools.partial(run(lambda m, t, c: m.decode(t, c)), state)


@functools.lru_cache(maxsize=None)
def harness(name: str) -> Harness:
  return Harness(name)


def tokens(rng, shape, vocab) -> jax.Array:
  return jnp.asarray(rng.integers(0, vocab, shape), jnp.int32)


@pytest.mark.parametrize("name", TINY)
def test_causal(name, rng):
  """Changing token s changes no logit before s, and changes the logits from s on."""
  h = harness(name)
  x = tokens(rng, (1, T), h.config.vocab_size)
  s = T // 2
  x2 = x.at[0, s].set((x[0, s] + 1) % h.config.vocab_size)
  logits = np.asarray(h.forward(jnp.concatenate([x, x2])))
  np.testing.assert_array_equal(logits[0, :s], logits[1, :s])
  assert (np.abs(logits[0, s:] - logits[1, s:]).max(-1) > 0).all()


@pytest.mark.parametrize("name", TINY)
def test_decode_equals_parallel(name, rng):
  """Two prefills (ragged rows, junk in the padding, different prompt widths) then one decode step at a time give
  the parallel logits at every position of every row."""
  h = harness(name)
  vocab = h.config.vocab_size
  x = tokens(rng, (B, T), vocab)
  logits = h.forward(x)
  rows = np.arange(B)
  for lengths in (np.array([3, 6]), np.array([8, 1])):
    width = lengths.max()
    prompt = np.array(x[:, :width])
    for b, n in enumerate(lengths):
      prompt[b, n:] = rng.integers(0, vocab, width - n)  # what the padding holds must not matter
    out, cache = h.prefill(jnp.asarray(prompt), jnp.asarray(lengths))
    assert_close(out, logits[rows, lengths - 1], dtype=jnp.float32, reduction_len=h.config.d_model,
                 name=f"{name} prefill {lengths}")
    for i in range(T - width):
      out, cache = h.decode(x[rows, lengths + i], cache)
      assert_close(out, logits[rows, lengths + i], dtype=jnp.float32, reduction_len=h.config.d_model,
                   name=f"{name} decode step {i} after {lengths}")
    np.testing.assert_array_equal(np.asarray(cache.lengths_B), lengths + T - width)


def test_sliding_window_is_shorter_than_the_sequence():
  """based-tiny's sliding-window layer keeps a 4-slot ring buffer, so the decode test above wraps it."""
  config = load_preset("based-tiny")
  assert config.mixer_configs()["sliding_window"].window == 4 < T
  with nnx.use_eager_sharding(False):
    cache = nnx.eval_shape(lambda: LM(config, rngs=nnx.Rngs(0)).init_cache(B, 100))
  window_stack = config.layer_groups().index(("sliding_window", 1))
  (window_cache,) = cache.layers[window_stack]  # one layer in that run
  assert window_cache.k_BSKD.shape == (B, 4, 4, 16)


def test_scan_loop_and_remat_agree(rng):
  """The scanned stack, a Python loop over layers and per-layer remat compute the same logits."""
  h = harness("based-tiny")
  x = tokens(rng, (B, T), h.config.vocab_size)
  expected = h.forward(x)
  for overrides in (dict(scan_layers=False), dict(remat="names:mixer_out")):
    model = LM(dataclasses.replace(h.config, **overrides), rngs=nnx.Rngs(jax.random.key(1, impl="rbg")))
    nnx.update(model, h.state)
    got = nnx.jit(lambda m, x: m(x))(model, x)
    assert_close(got, expected, dtype=jnp.float32, reduction_len=h.config.d_model, name=str(overrides))


def test_packed_rows_equal_separate_documents(rng):
  """With segment_ids, each packed document gets the logits it gets alone (positions restart at each)."""
  h = harness("gpt2-monarch-tiny")  # learned positions: the restart is visible in the embedding too
  x = tokens(rng, (1, T), h.config.vocab_size)
  split = 5
  segment_ids = jnp.asarray([[0] * split + [1] * (T - split)])
  packed = nnx.jit(lambda m, x, s: m(x, segment_ids=s))(h.model, x, segment_ids)
  alone = nnx.jit(lambda m, x: m(x))
  assert_close(packed[:, :split], alone(h.model, x[:, :split]), dtype=jnp.float32, reduction_len=64)
  assert_close(packed[:, split:], alone(h.model, x[:, split:]), dtype=jnp.float32, reduction_len=64)


def test_init_is_deterministic_per_seed():
  config = load_preset("transformer-tiny")
  same = [nnx.state(init(config, seed), nnx.Param) for seed in (3, 3, 4)]
  equal = lambda a, b: all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))  # noqa
  assert equal(same[0], same[1])
  assert not equal(same[0], same[2])
  # Stacked layers get different weights.
  q = np.asarray(same[0]["stacks"][0]["blocks"]["mixer"]["q_proj"]["kernel"][...])
  assert q.shape[0] == 2 and not np.array_equal(q[0], q[1])


def test_parameters_carry_logical_axis_names():
  specs = nnx.get_partition_spec(nnx.state(abstract_model(load_preset("transformer-tiny")), nnx.Param))
  names = lambda x: tuple(x.get_value() if isinstance(x, nnx.Variable) else x)  # noqa: E731
  blocks = specs["stacks"][0]["blocks"]
  assert names(specs["embed"]["embedding"]) == ("vocab", "embed")
  assert names(blocks["mixer"]["q_proj"]["kernel"]) == ("layers", "embed", "heads")
  assert names(blocks["mlp"]["down"]["kernel"]) == ("layers", "mlp", "embed")


BASE = dict(vocab_size=64, d_model=32, num_layers=3, mixer_options={"attention": {"num_heads": 4}})
BAD = [
    (dict(mixers=["attention", "mamba", "attention"]), "mixers.*mamba"),
    (dict(mixers="attention; moe@1"), "mixers.*moe"),
    (dict(mixers=["attention"]), "mixers lists 1 layers"),
    (dict(mixers="attention; based@7"), "mixers.*layer 7"),
    (dict(mixer_options={"attention": {"num_heads": 5}}), "mixer_options.attention.*num_heads"),
    (dict(mixer_options={"attention": {"num_heads": 4, "num_kv_heads": 3}}), "num_kv_heads"),
    (dict(mixers="sliding_window", mixer_options={"sliding_window": {"num_heads": 4, "window": 0}}), "window"),
    (dict(mixers="based", mixer_options={"based": {"num_heads": 4, "feature_dim": 1024}}), "feature_dim"),
    (dict(mixers="based"), "mixer_options.based.*num_heads"),
    (dict(mixer_options={"attention": {"heads": 4}}), r"mixer_options\.attention\.heads"),
    (dict(mixer_options={"rnn": {}}), "mixer_options.rnn"),
    (dict(mlp="relu"), "mlp"),
    (dict(mlp="monarch", mlp_hidden=102), "mlp_nblocks"),
    (dict(dtype="float8"), "dtype"),
    (dict(implementation={"flash": "pallas"}), "implementation.flash"),
    (dict(num_layers=0), "num_layers"),
    (dict(remat="sometimes"), "remat"),
]


@pytest.mark.parametrize("overrides, field", BAD)
def test_bad_configs_raise_before_compilation(overrides, field, caplog):
  with jax.log_compiles(True), caplog.at_level(logging.DEBUG):
    with pytest.raises(ValueError, match=field):
      ModelConfig(**{**BASE, **overrides})
  assert not [r for r in caplog.records if "ompil" in r.getMessage()], "compiled before validating"


def test_yaml_round_trip_and_unknown_keys(tmp_path):
  config = load_preset("based-tiny")
  assert ModelConfig.from_dict(config.to_dict()) == config
  path = tmp_path / "model.yaml"
  path.write_text(yaml.safe_dump(config.to_dict()))
  assert load_model_config(str(path)) == config
  path.write_text(yaml.safe_dump({**config.to_dict(), "n_layers": 4}))
  with pytest.raises(ValueError, match="n_layers"):
    load_model_config(str(path))
  with pytest.raises(ValueError, match="d_model"):
    ModelConfig.from_dict({"vocab_size": 10, "num_layers": 1})
  assert config.mixers == ("base_conv", "based", "sliding_window", "base_conv", "base_conv")
