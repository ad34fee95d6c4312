"""Next-token sampling from logits: greedy, temperature, top-k, top-p (nucleus), each row on its own.

  p(v) ∝ exp(logit_v / temperature), restricted to the k most likely tokens (top-k) and then to the smallest
  set of most likely tokens whose probability reaches top_p (Holtzman et al. 2020), renormalised.

temperature = 0 is greedy (argmax). All options are static: one compiled sampler per setting.
Letters: B batch, V vocabulary.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  temperature: float = 1.0  # 0 = greedy
  top_k: int = 0  # keep the k most likely tokens; 0 = all
  top_p: float = 1.0  # keep the most likely tokens up to this probability mass; 1 = all

  def __post_init__(self):
    if not self.temperature >= 0:
      raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
    if not isinstance(self.top_k, int) or self.top_k < 0:
      raise ValueError(f"top_k must be an integer >= 0 (0 = all tokens), got {self.top_k!r}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must lie in (0, 1], got {self.top_p!r}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


def top_k_mask(logits_BV: jax.Array, k: int) -> jax.Array:
  """Logits below the k-th largest of their row set to -inf (ties with it kept)."""
  kth_B1 = jax.lax.top_k(logits_BV, k)[0][:, -1:]
  return jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)


def top_p_mask(logits_BV: jax.Array, p: float) -> jax.Array:
  """Logits outside the nucleus set to -inf: a token stays if the tokens more likely than it hold < p mass."""
  sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
  probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
  mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
  # The most likely token always stays (mass before it is 0 < p); the cut is the least likely kept logit.
  cut_B1 = jnp.min(jnp.where(mass_before_BV < p, sorted_BV, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits_BV < cut_B1, -jnp.inf, logits_BV)


def sample(key: jax.Array, logits_BV: jax.Array, config: SamplingConfig = SamplingConfig()) -> jax.Array:
  """One token per row (int32 [B]) drawn from logits [B, V] as `config` says."""
  logits_BV = logits_BV.astype(jnp.float32)
  if config.greedy:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV / config.temperature
  if 0 < config.top_k < logits_BV.shape[-1]:
    logits_BV = top_k_mask(logits_BV, config.top_k)
  if config.top_p < 1:
    logits_BV = top_p_mask(logits_BV, config.top_p)
  return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)
