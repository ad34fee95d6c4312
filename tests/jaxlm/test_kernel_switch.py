"""Switching a model's ops from the reference to the kernels (by config, no model code change) keeps its outputs:
the parallel logits, and prefill + step-by-step decode, within kernel tolerance. On CPU the kernels run in
interpret mode; on the GPU machine the same test runs them through Triton, and on an sm90 GPU the Mosaic GPU kernels
take the same checks in bfloat16."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.models import LM, load_preset
from pallas_kernels.common import mosaic
from tests.tolerances import assert_close

KERNELS = {"attention": "pallas", "attention_decode": "pallas", "based": "pallas", "based_decode": "pallas",
           "long_conv": "pallas", "monarch": "pallas"}
REFERENCE = {op: "reference" for op in KERNELS}
B, T, PROMPT = 2, 10, 6
PRESETS = ["transformer-tiny", "based-tiny", "gpt2-monarch-tiny", "h3-tiny", "hyena-tiny"]
REDUCTION = T * 64  # scales the tolerance: the widest product a logit goes through (d_model 64 in every preset)


def _model(name: str, implementation: dict) -> LM:
  config = dataclasses.replace(load_preset(name), implementation=implementation)
  return LM(config, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))


def _logits_and_decoded(model: LM, tokens_BT):
  """Parallel logits, and the logits of prefill (PROMPT tokens) then decode of the rest, one token at a time."""
  logits = jax.jit(lambda t: model(t))(tokens_BT)
  lengths = jnp.full((B,), PROMPT, jnp.int32)
  prompt_logits, cache = model.prefill(tokens_BT[:, :PROMPT], model.init_cache(B, T), lengths)
  decoded = [prompt_logits]
  decode = jax.jit(lambda t, c: model.decode(t, c))
  for t in range(PROMPT, T - 1):
    step_logits, cache = decode(tokens_BT[:, t], cache)
    decoded.append(step_logits)
  return logits, jnp.stack(decoded, axis=1)


@pytest.mark.parametrize("name", PRESETS)
def test_kernels_by_config_match_reference(name, rng):
  """Every op a preset has switched to its portable kernel at once (the others in KERNELS are unused there)."""
  vocab, reduction = load_preset(name).vocab_size, REDUCTION
  tokens_BT = jnp.asarray(rng.integers(0, vocab, (B, T)), jnp.int32)
  ref_logits, ref_decoded = _logits_and_decoded(_model(name, REFERENCE), tokens_BT)
  kernel_logits, kernel_decoded = _logits_and_decoded(_model(name, KERNELS), tokens_BT)
  assert_close(kernel_logits, ref_logits, dtype=jnp.float32, reduction_len=reduction, name="parallel logits")
  assert_close(kernel_decoded, ref_decoded, dtype=jnp.float32, reduction_len=reduction, name="decoded logits")
  # Decoding with the kernels continues the parallel forward: the last prompt position onwards.
  assert_close(kernel_decoded, ref_logits[:, PROMPT - 1:T - 1], dtype=jnp.float32, reduction_len=reduction,
               name="decode vs parallel")
  assert not np.allclose(np.asarray(ref_logits[:, 0]), np.asarray(ref_logits[:, -1]))  # a real signal


# The Mosaic GPU kernels by config: 16-bit compute, heads of 64 values, F = 16 (what they cover).
HOPPER = {"attention": "hopper", "attention_decode": "pallas", "based": "hopper", "based_decode": "pallas"}


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu" or not mosaic.is_sm90(), reason="needs an sm90 (Hopper) GPU")
def test_hopper_kernels_by_config_match_reference(rng):
  preset = load_preset("based-tiny")
  options = dict(preset.mixer_options, based={"num_heads": 4, "feature_dim": 16},
                 sliding_window={"num_heads": 4, "window": 4})
  config = dataclasses.replace(preset, d_model=256, dtype="bfloat16", mixer_options=options)
  model = lambda implementation: LM(dataclasses.replace(config, implementation=implementation),
                                    rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
  tokens_BT = jnp.asarray(rng.integers(0, config.vocab_size, (B, T)), jnp.int32)
  ref_logits, ref_decoded = _logits_and_decoded(model(REFERENCE), tokens_BT)
  kernel_logits, kernel_decoded = _logits_and_decoded(model(HOPPER), tokens_BT)
  tolerance = dict(dtype=jnp.bfloat16, reduction_len=T * 256)
  assert_close(kernel_logits, ref_logits, **tolerance, name="parallel logits")
  assert_close(kernel_decoded, ref_decoded, **tolerance, name="decoded logits")
  assert_close(kernel_decoded, ref_logits[:, PROMPT - 1:T - 1], **tolerance, name="decode vs parallel")
  assert not np.allclose(np.asarray(ref_logits[:, 0]), np.asarray(ref_logits[:, -1]))
