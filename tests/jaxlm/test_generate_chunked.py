"""Chunked prefill (`prefill_chunk`): prefilling the prompt a piece at a time, each piece continuing the caches
the previous one left, gives the one-shot prefill's logits and the same greedy tokens, for every mixer kind, with
ragged prompts (a row whose prompt ends inside a piece, then sits out the later ones) and piece sizes that do not
divide the prompt."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.generate import generate, pad_prompts, prefill
from jaxlm.models import LM, ModelConfig
from jaxlm.sampling import SamplingConfig
from tests.tolerances import assert_close

NEW = 3
GREEDY = SamplingConfig(temperature=0.0)

# Tiny models, one per mixer kind; float32 so that one-shot and chunked differ only by summation order.
_BASE = dict(vocab_size=64, d_model=32, mlp="swiglu", mlp_hidden=64, dtype="float32", max_length=32)
MODELS = {
    "attention": dict(num_layers=2, mixers="attention",
                      mixer_options={"attention": {"num_heads": 4, "num_kv_heads": 2}}),
    "based_hybrid": dict(num_layers=3, mixers=["base_conv", "based", "sliding_window"],
                         mixer_options={"based": {"num_heads": 2, "feature_dim": 4},
                                        "sliding_window": {"num_heads": 2, "window": 4}}),
    "h3": dict(num_layers=2, mixers=["h3", "attention"],
               mixer_options={"h3": {"state_dim": 4}, "attention": {"num_heads": 2, "rotary_dim": 0}}),
    "h3_head_dim2": dict(num_layers=1, mixers="h3", mixer_options={"h3": {"state_dim": 4, "head_dim": 2}}),
    # max_length 16 < cache slots + piece: the filters' zero padding past max_length is exercised.
    "hyena": dict(num_layers=1, mixers="hyena", max_length=16,
                  mixer_options={"hyena": {"order": 3, "filter_order": 8, "emb_dim": 3}}),
    "sliding_window": dict(num_layers=2, mixers="sliding_window",
                           mixer_options={"sliding_window": {"num_heads": 2, "window": 3}}),
    # Head dim 12 with the decode kernel: the caches store it padded to 16 (Attention.cache_head_dim).
    "attention_padded_cache": dict(num_layers=2, mixers=["attention", "sliding_window"], mixer_options={
        "attention": {"num_heads": 2, "head_dim": 12, "decode_implementation": "pallas"},
        "sliding_window": {"num_heads": 2, "head_dim": 12, "window": 3, "decode_implementation": "pallas"}}),
}
# Pieces shorter than the sliding window (based_hybrid: 3 < 4) and longer (sliding_window: 5 > 3).
CASES = [("attention", 4), ("based_hybrid", 3), ("h3", 4), ("hyena", 4), ("sliding_window", 5),
         ("attention_padded_cache", 4), ("h3_head_dim2", 3)]


def tiny_model(kind: str) -> LM:
  config = ModelConfig(**{**_BASE, **MODELS[kind]})
  return LM(config, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))


@pytest.fixture(scope="module")
def prompts():
  """Lengths 11, 5 and 8: with pieces of 4 the rows end in the third, second and second piece."""
  rng = np.random.default_rng(7)
  tokens, lengths = pad_prompts([rng.integers(0, 64, n).tolist() for n in (11, 5, 8)])
  tokens[1, 5:] = rng.integers(0, 64, 6)  # junk in the padding: it must not matter
  return tokens, lengths


@pytest.mark.parametrize("kind,chunk", CASES)
def test_chunked_prefill_equals_one_shot(kind, chunk, prompts):
  model = tiny_model(kind)
  tokens, lengths = prompts
  graphdef, state = nnx.split(model)
  max_length = tokens.shape[1] + NEW
  one_shot, _ = prefill(graphdef, state, jnp.asarray(tokens), jnp.asarray(lengths), max_length=max_length)
  chunked, _ = prefill(graphdef, state, jnp.asarray(tokens), jnp.asarray(lengths), max_length=max_length,
                       chunk=chunk)
  assert_close(chunked, one_shot, dtype=jnp.float32, reduction_len=tokens.shape[1] * 32, name=f"{kind} logits")
  want = generate(model, tokens, lengths, max_new_tokens=NEW, sampling=GREEDY)
  got = generate(model, tokens, lengths, max_new_tokens=NEW, sampling=GREEDY, prefill_chunk=chunk)
  np.testing.assert_array_equal(np.asarray(got.tokens_BN), np.asarray(want.tokens_BN))


def test_prefill_chunk_is_validated_and_unsupported_mixers_are_refused(prompts):
  model = tiny_model("sliding_window")
  with pytest.raises(ValueError, match="prefill_chunk must be a positive integer"):
    generate(model, *prompts, max_new_tokens=1, prefill_chunk=0)

  class NoExtend(nnx.Module):  # a mixer without `extend`, as a new mixer would start
    def __init__(self, mixer):
      self.inner = mixer
  cache = model.init_cache(1, 4)
  model.stacks[0].blocks.mixer = NoExtend(model.stacks[0].blocks.mixer)
  with pytest.raises(ValueError, match=r"\['NoExtend'\] cannot"):
    model.extend(jnp.zeros((1, 2), jnp.int32), cache, jnp.ones((1,), jnp.int32))
