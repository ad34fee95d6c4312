"""The interface every sequence mixer implements, so the LM stacks them from a config and generation drives
them without knowing which is which.

Letters: B batch, T length, D model width.

A mixer has three entry points that must compute the same function:
- `__call__(x_BTD, *, segment_ids=None)`: the parallel (training) form.
- `init_cache(batch, max_length, dtype)`: an empty decode cache (a pytree of arrays: KV cache, recurrent state,
  conv state, ...); its size is what generation memory costs for this mixer.
- `prefill(x_BTD, cache, lengths_B) -> (y_BTD, cache)`: the parallel form over a (right-padded) prompt that also
  fills the cache so that decoding continues after `lengths[b]` tokens of row b.
- `decode(x_BD, cache) -> (y_BD, cache)`: one new token per row.
Decode-equals-parallel tests check `prefill` + repeated `decode` against `__call__` on the full sequence.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax

Cache = Any  # a pytree of jax arrays


class Mixer(Protocol):

  def __call__(self, x_BTD: jax.Array, *, segment_ids: jax.Array | None = None) -> jax.Array:
    ...

  def init_cache(self, batch: int, max_length: int, dtype: Any) -> Cache:
    ...

  def prefill(self, x_BTD: jax.Array, cache: Cache, lengths_B: jax.Array) -> tuple[jax.Array, Cache]:
    ...

  def decode(self, x_BD: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
    ...


def segment_ids_unsupported(mixer: str, segment_ids: jax.Array | None) -> None:
  """Raises for mixers that cannot keep packed documents apart (long convolutions, short of O(T²) work)."""
  if segment_ids is not None:
    raise NotImplementedError(f"{mixer}: segment_ids (packed documents) are not supported; the long "
                              f"convolution would mix neighbouring documents")
