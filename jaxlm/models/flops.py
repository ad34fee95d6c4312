"""Training FLOPs per token of a `ModelConfig`: the model side of MFU (train/flops.py holds the devices' peaks).

Forward + backward = 3 × forward (Kaplan et al. 2020; PaLM, Chowdhery et al. 2022, appendix B):

  6·N              every parameter used in a matmul (N leaves out the lookup-only tables: the input embedding
                   when the head is untied, learned positions)
  + 12·T_ctx·H·D   per softmax-attention layer, for QKᵀ and AV over the T_ctx keys a query sees (the sequence, or
                   the window of a sliding-window layer); H heads of head dim D

The sequence terms of convolutions and linear attention are left out, and so is remat recomputation, as MFU
conventionally does.
"""

from __future__ import annotations

from jaxlm.layers.attention import AttentionConfig
from jaxlm.models.config import ModelConfig
from jaxlm.models.lm import count_params


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token of `config` at sequence length `seq_len` (module docstring)."""
  lookups = (0 if config.tie_embeddings else config.vocab_size) + (
      config.max_length if config.position_embedding == "learned" else 0)
  flops = 6.0 * (count_params(config) - lookups * config.d_model)  # embedding lookups are not matmuls
  mixer_configs = config.mixer_configs()
  for name in config.mixers:
    mixer = mixer_configs[name]
    if isinstance(mixer, AttentionConfig):
      span = seq_len if mixer.window is None else min(seq_len, mixer.window)
      flops += 12.0 * span * mixer.num_heads * mixer.resolved_head_dim()
  return flops
