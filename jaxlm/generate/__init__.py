"""Generation: prefill the prompts in the parallel form, then decode one token per row per step inside one jitted
`lax.while_loop` (no Python loop per token). The command line (`python -m jaxlm.generate`) is cli.py, the
prefill/decode timing benchmark.py.

With `prefill_chunk=P` the prompt is prefilled P tokens per row at a time, each piece continuing the caches the
previous one left (`LM.extend`), so prefill memory is bounded by the piece rather than the prompt; the tokens are
those of the one-shot prefill (up to float rounding of the logits).

Prompts are right-padded with per-row lengths, so ragged rows decode side by side, each from its own position.
A row is done once it samples a stop token; its later tokens are `pad_id` and the loop ends when every row is
done or `max_new_tokens` are out. Sampling is seeded: the same seed, prompts and model give the same tokens.

  python -m jaxlm.generate --run runs/<name> --prompt "Hello" --max-new-tokens 32
  python -m jaxlm.generate --config transformer-360m --benchmark --batch 1 32 max --prompt-len 1024 --new-tokens 1024

Letters: B batch, T prompt length, N new tokens, V vocabulary.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.models import LM, ModelConfig
from jaxlm.sampling import SamplingConfig, sample


class Generation(NamedTuple):
  tokens_BN: jax.Array  # generated tokens; pad_id after a row's stop token and beyond the loop's end
  num_tokens_B: jax.Array  # tokens generated per row, its stop token included


@functools.partial(jax.jit, static_argnames=("graphdef", "max_length", "chunk"))
def prefill(graphdef: nnx.GraphDef, state: nnx.State, prompt_BT: jax.Array, lengths_B: jax.Array, *,
            max_length: int, chunk: int | None = None):
  """(logits [B, V] after each row's prompt, the cache to decode from). chunk=None: the prompt in one parallel
  pass; chunk=P: pieces of P tokens per row in order (`LM.extend`), so activations are bounded by the piece."""
  model = nnx.merge(graphdef, state)
  batch, length = prompt_BT.shape
  cache = model.init_cache(batch, max_length)
  if chunk is None:
    return model.prefill(prompt_BT, cache, lengths_B)
  pieces = -(-length // chunk)
  # The last piece is padded (its padding is not real for any row, so no cache sees it).
  prompt_BT = jnp.pad(prompt_BT, ((0, 0), (0, pieces * chunk - length)))

  def piece(i, carry):
    logits_BV, cache = carry
    valid_B = lengths_B - i * chunk  # real tokens of each row in this piece (<= 0: the row's prompt is over)
    piece_logits_BV, cache = model.extend(jax.lax.dynamic_slice_in_dim(prompt_BT, i * chunk, chunk, axis=1), cache,
                                          valid_B)
    # A row's last piece with a real token holds its last prompt token; later pieces leave its logits alone.
    return jnp.where((valid_B > 0)[:, None], piece_logits_BV, logits_BV), cache

  logits_BV = jnp.zeros((batch, model.config.vocab_size), jnp.float32)
  # A loop, not an unrolled Python one: one piece's activations are live at a time.
  return jax.lax.fori_loop(0, pieces, piece, (logits_BV, cache))


# The prefill's cache is donated and returned (advanced), so the loop updates that buffer in place instead of
# copying it into the loop state.
@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "sampling", "stop_tokens", "pad_id"),
                   donate_argnames=("cache",))
def decode_loop(graphdef: nnx.GraphDef, state: nnx.State, logits_BV: jax.Array, cache: Any, key: jax.Array, *,
            max_new_tokens: int, sampling: SamplingConfig, stop_tokens: tuple[int, ...], pad_id: int
            ) -> tuple[Generation, Any]:
  model = nnx.merge(graphdef, state)
  batch = logits_BV.shape[0]
  stop = jnp.asarray(stop_tokens, jnp.int32)

  def sample_next(carry):
    """Token i of every row (pad_id once a row is done), from the logits after token i - 1."""
    i, tokens_BN, done_B, num_B, logits_BV, cache, key = carry
    key, step_key = jax.random.split(key)
    token_B = jnp.where(done_B, pad_id, sample(step_key, logits_BV, sampling))
    tokens_BN = tokens_BN.at[:, i].set(token_B)
    num_B = num_B + (~done_B).astype(jnp.int32)
    if stop_tokens:
      done_B = done_B | jnp.isin(token_B, stop)
    return token_B, (i, tokens_BN, done_B, num_B, logits_BV, cache, key)

  def cond(carry):
    i, _, done_B, *_ = carry
    return (i < max_new_tokens - 1) & ~jnp.all(done_B)

  def body(carry):
    # No lax.cond around the forward pass: a conditional would copy the caches each step.
    token_B, (i, tokens_BN, done_B, num_B, _, cache, key) = sample_next(carry)
    logits_BV, cache = model.decode(token_B, cache)
    return i + 1, tokens_BN, done_B, num_B, logits_BV, cache, key

  carry = (jnp.int32(0), jnp.full((batch, max_new_tokens), pad_id, jnp.int32), jnp.zeros((batch,), bool),
           jnp.zeros((batch,), jnp.int32), logits_BV, cache, key)
  carry = jax.lax.while_loop(cond, body, carry)
  _, (_, tokens_BN, _, num_B, _, cache, _) = sample_next(carry)  # the last token needs no forward pass
  return Generation(tokens_BN, num_B), cache


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Ragged token lists -> (right-padded int32 [B, T], lengths [B])."""
  lengths = np.array([len(p) for p in prompts], np.int32)
  if (lengths < 1).any():
    raise ValueError(f"every prompt needs at least one token, got lengths {lengths.tolist()}")
  tokens = np.full((len(prompts), int(lengths.max())), pad_id, np.int32)
  for row, prompt in enumerate(prompts):
    tokens[row, :len(prompt)] = prompt
  return tokens, lengths


def generate(model: LM, prompt_BT: Any, lengths_B: Any = None, *, max_new_tokens: int,
             sampling: SamplingConfig = SamplingConfig(), stop_tokens: Sequence[int] = (), seed: int = 0,
             pad_id: int = 0, prefill_chunk: int | None = None) -> Generation:
  """Up to `max_new_tokens` tokens after each row's prompt (right-padded [B, T]; lengths default to T).
  prefill_chunk=P prefills P prompt tokens per row at a time (same tokens, memory bounded by the piece)."""
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  check_prefill_chunk(prefill_chunk)
  prompt_BT = jnp.asarray(prompt_BT, jnp.int32)
  batch, length = prompt_BT.shape
  lengths_B = jnp.full((batch,), length, jnp.int32) if lengths_B is None else jnp.asarray(lengths_B, jnp.int32)
  graphdef, state = nnx.split(model)
  logits_BV, cache = prefill(graphdef, state, prompt_BT, lengths_B, max_length=length + max_new_tokens,
                             chunk=prefill_chunk)
  generation, _ = decode_loop(graphdef, state, logits_BV, cache, jax.random.key(seed), max_new_tokens=max_new_tokens,
                          sampling=sampling, stop_tokens=tuple(int(t) for t in stop_tokens), pad_id=pad_id)
  return generation


def check_prefill_chunk(prefill_chunk: int | None) -> None:
  if prefill_chunk is not None and (not isinstance(prefill_chunk, int) or prefill_chunk < 1):
    raise ValueError(f"prefill_chunk must be a positive integer (tokens per row per piece) or None, got "
                     f"{prefill_chunk!r}")


def init_model(config: ModelConfig, seed: int = 0) -> LM:
  """The LM with random parameters, initialised in one compiled program (not op by op)."""
  return nnx.jit(lambda: LM(config, rngs=nnx.Rngs(seed)))()
