"""Recurrent state size: the numbers a layer must keep per sequence to generate the next token, as the BASED paper
(Arora et al. 2024, "Simple linear attention language models balance the recall-throughput tradeoff", Fig. 2)
and Zoology's code (`state_size` of each mixer in HazyResearch/zoology, zoology/mixers/) count it.

Counted in numbers (floats) per sequence, one layer at a time, for generation after `seq_len` tokens:

  attention        2·K·D·L          keys and values of every token so far (K kv heads of width D; 2·d·L for MHA)
  sliding window   2·K·D·min(w, L)  keys and values of the last w tokens
  BASED            H·D·X + H·X, X = 1+F+F(F+1)/2   the Taylor-feature state Σ φ(k)vᵀ and its normaliser Σ φ(k)
                                   over the symmetric order-2 features (the second term only with `normalize`)
  BaseConv         W·I              kernel taps × conv width (Zoology counts W·d for its d-wide conv)
  H3               (1+P)·N·d        the shift SSM (last N keys per channel) and the diagonal SSM (N/2 complex
                                   modes = N floats for each of its P·d channels, head dim P: 2·N·d at P = 1);
                                   Zoology's code counts only the second
  Hyena            (order-1)·d·L    a long convolution keeps its whole input history (d·L at order 2; no
                                   recurrence)
  LoLCATs          H·X·(D+1) + 2·K·D·min(w, L)   the linear state over X features and its normaliser, and the
                                   keys and values of the softmax window

Zoology reports the model total at the longest test length (`log_model`, zoology/logger.py) and multiplies by 4
(float32 bytes) in `LanguageModel.state_size`; these functions return numbers, not bytes.

Mixer configs are read through their public fields only; the model width comes in as `d_model`, so the functions
do not depend on whether a mixer config carries it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _positive(name: str, value: int) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise ValueError(f"{name}={value!r} must be a positive integer")


def _attention_dims(config: Any, d_model: int) -> tuple[int, int]:
  """(kv heads, head width) of an attention config."""
  heads = config.num_heads
  kv_heads = heads if config.num_kv_heads is None else config.num_kv_heads
  head_dim = d_model // heads if config.head_dim is None else config.head_dim
  return kv_heads, head_dim


def attention_state_size(config: Any, *, d_model: int, seq_len: int) -> int:
  """2·K·D·L: the KV cache after `seq_len` tokens (over the window, if the config sets one)."""
  _positive("seq_len", seq_len)
  kv_heads, head_dim = _attention_dims(config, d_model)
  window = getattr(config, "window", None)
  span = seq_len if window is None else min(window, seq_len)
  return 2 * kv_heads * head_dim * span


def sliding_window_state_size(config: Any, *, d_model: int, seq_len: int) -> int:
  """2·K·D·min(window, L): keys and values of the last `window` tokens."""
  if config.window is None:
    raise ValueError("a sliding-window config needs a window")
  return attention_state_size(config, d_model=d_model, seq_len=seq_len)


def based_state_size(config: Any, *, d_model: int, seq_len: int) -> int:
  """H·D·X, plus H·X for the normaliser, X = 1 + F + F(F+1)/2: the linear-attention state over Taylor features."""
  del seq_len  # the state does not grow with the sequence
  heads, features = config.num_heads, config.feature_dim
  # φ(k) = [1, k, k_i·k_j for i ≤ j] (up to scales): the order-2 products are symmetric, so each pair is kept once,
  # as the BASED paper counts and as BasedState (pallas_kernels/based/symmetric.py) stores it.
  expanded = 1 + features + features * (features + 1) // 2
  state = heads * (d_model // heads) * expanded
  return state + (heads * expanded if config.normalize else 0)


def lolcats_state_size(config: Any, *, d_model: int, seq_len: int) -> int:
  """H·X·(D+1) for the linear state over the feature width X, plus 2·K·D·min(window, L) for the ring of keys and
  values in the softmax window."""
  _positive("seq_len", seq_len)
  kv_heads, head_dim = _attention_dims(config, d_model)
  return (config.num_heads * config.feature_width() * (head_dim + 1)
          + 2 * kv_heads * head_dim * min(config.window, seq_len))


def base_conv_state_size(config: Any, *, d_model: int, seq_len: int) -> int:
  """W·I: kernel taps times the width the convolution runs over (expand·d_model)."""
  del seq_len
  return config.kernel_size * config.expand * d_model


def h3_state_size(config: Any, *, d_model: int, seq_len: int) -> int:
  """(1 + P)·N·d: the shift SSM's last N keys per channel of d, and the diagonal SSM's N/2 complex modes per channel
  of its (d/P)·P² = P·d channels (head dim P)."""
  del seq_len
  return (1 + config.head_dim) * config.state_dim * d_model


def hyena_state_size(config: Any, *, d_model: int, seq_len: int) -> int:
  """(order-1)·d·L: each long convolution keeps its input over the whole sequence."""
  _positive("seq_len", seq_len)
  return (config.order - 1) * d_model * seq_len


STATE_SIZES: dict[str, Callable[..., int]] = {
    "attention": attention_state_size,
    "sliding_window": sliding_window_state_size,
    "based": based_state_size,
    "base_conv": base_conv_state_size,
    "h3": h3_state_size,
    "hyena": hyena_state_size,
    "lolcats": lolcats_state_size,
}


def mixer_state_size(name: str, config: Any, *, d_model: int, seq_len: int) -> int:
  """The state of one layer of mixer `name` (a key of the model registry) with its config."""
  if name not in STATE_SIZES:
    raise ValueError(f"no state size for mixer {name!r}; known: {sorted(STATE_SIZES)}")
  _positive("d_model", d_model)
  return STATE_SIZES[name](config, d_model=d_model, seq_len=seq_len)


def model_state_size(config: Any, seq_len: int) -> int:
  """The sum over layers for a `ModelConfig` (MLPs hold no state)."""
  mixer_configs = config.mixer_configs()
  return sum(mixer_state_size(name, mixer_configs[name], d_model=config.d_model, seq_len=seq_len)
             for name in config.mixers)
