"""The interface every sequence mixer implements, so the LM stacks them from a config and generation drives
them without knowing which is which.

Letters: B batch, T length, E model width.

Every mixer is built one way, `Mixer(config, *, dtype, param_dtype, rngs)`. Its config is a frozen dataclass
holding all the layer needs: the model width `d_model`, the mixer's own options, and one `implementation` field
per op it calls (`implementation` for its main op, `decode_implementation`, `<op>_implementation` for others);
it validates itself in `__post_init__`, raising ValueError naming the field. jaxlm/models/registry.py imports each
mixer and names the op behind each implementation field, so a model config can fill them.

A mixer has these entry points, which must compute the same function:
- `__call__(x_BTE, *, segment_ids=None)`: the parallel (training) form.
- `init_cache(batch, max_length, dtype)`: an empty decode cache (a pytree of arrays: KV cache, recurrent state,
  conv state, ...); its size is what generation memory costs for this mixer.
- `prefill(x_BTE, cache, lengths_B) -> (y_BTE, cache)`: the parallel form over a (right-padded) prompt that also
  fills the cache so that decoding continues after `lengths[b]` tokens of row b.
- `decode(x_BE, cache) -> (y_BE, cache)`: one new token per row.
- `extend(x_BTE, cache, valid_B) -> (y_BTE, cache)`: chunked prefill, one piece of a prompt continuing `cache`
  (which holds the tokens before the piece): the first valid[b] tokens of row b are real, and a row with
  valid[b] <= 0 keeps its cache. Pieces in order compute what one `prefill` over the whole prompt does, with
  memory bounded by the piece. Optional: the LM refuses chunked prefill for a mixer without it.
Decode-equals-parallel tests check `prefill` + repeated `decode` against `__call__` on the full sequence.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax

Cache = Any  # a pytree of jax arrays


class Mixer(Protocol):

  def __call__(self, x_BTE: jax.Array, *, segment_ids: jax.Array | None = None) -> jax.Array:
    ...

  def init_cache(self, batch: int, max_length: int, dtype: Any) -> Cache:
    ...

  def prefill(self, x_BTE: jax.Array, cache: Cache, lengths_B: jax.Array) -> tuple[jax.Array, Cache]:
    ...

  def decode(self, x_BE: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
    ...


def segment_ids_unsupported(mixer: str, segment_ids: jax.Array | None) -> None:
  """Raises for mixers that cannot keep packed documents apart (long convolutions, short of O(T²) work)."""
  if segment_ids is not None:
    raise NotImplementedError(f"{mixer}: segment_ids (packed documents) are not supported; the long "
                              f"convolution would mix neighbouring documents")
