"""Device peaks and MFU = achieved model FLOP/s / (devices x peak).

The model's training FLOPs per token (6·N plus attention's sequence terms) are counted in one place,
jaxlm/models/flops.py, and reach the loop through `ModelSpec.flops_per_token` (train/models.py).
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
