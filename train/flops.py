"""Model FLOPs per token and device peaks, for MFU = achieved model FLOP/s / (devices x peak).

Training FLOPs per token (forward + backward = 3 x forward, Kaplan et al. / PaLM appendix B):
  6·N                    every parameter used in a matmul (N excludes lookup-only tables: the input embedding
                         when the head is untied, learned positions)
  + 12·T_ctx·d_attn      per softmax-attention layer (QKᵀ and AV, d_attn = heads x head_dim, T_ctx = keys seen)
  + 12·F_eff·d_v         per linear-attention layer (state update and readout, F_eff = expanded feature width)
The model may report the sequence-mixer terms itself (`flops_per_token` on the LM); otherwise 6·N is used.
Remat recomputation is not counted, as MFU conventionally does not.
"""

from __future__ import annotations

import jax

# Dense bf16 peak FLOP/s per device, by `device_kind` substring (first match wins).
PEAK_BF16 = (
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L4", 121e12),
    ("TPU v6", 918e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 197e12),  # v5e / v5 lite
    ("TPU v4", 275e12),
)


def device_peak_flops(device: jax.Device | None = None, override_tflops: float = 0.0) -> float | None:
  """Peak bf16 FLOP/s of one device (None when unknown, e.g. CPU: MFU is then not reported)."""
  if override_tflops > 0:
    return override_tflops * 1e12
  kind = (device or jax.devices()[0]).device_kind
  for name, peak in PEAK_BF16:
    if name.lower() in kind.lower():
      return peak
  return None


def mfu(tokens_per_s: float, flops_per_token: float, num_devices: int, peak: float | None) -> float | None:
  """Model FLOPs utilisation, or None without a known peak."""
  if not peak:
    return None
  return tokens_per_s * flops_per_token / (num_devices * peak)
