"""Guarded imports of the peer libraries our kernels are compared against.

Each loader returns (module, None) or (None, reason); a missing peer becomes one "skipped: <reason>" line, never a
crash. Peers: jax.nn.dot_product_attention ("cudnn" on GPU, "xla" anywhere), tokamax 0.0.17 (Pallas attention,
"mosaic" and "triton", GPU only; needs jax >= 0.11.1) and fla-core 0.6.0 (Triton BASED kernels on torch CUDA
tensors). On the GPU machine they come from wheels, see docs/gpu.md.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any


def gpu_missing_reason() -> str | None:
  """None on a jax GPU backend, else why GPU-only peers are skipped."""
  import jax

  backend = jax.default_backend()
  return None if backend == "gpu" else f"needs a GPU (jax backend is {backend!r})"


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0] if text else ''}"[:160]


def install_xprof_stub() -> None:
  """tokamax 0.0.17 imports `xprof.cli.tools` at import time for its profiler-based timer, which we never use;
  xprof is a 32 MB wheel, so when it is not installed a stub module stands in for it."""
  try:
    importlib.import_module("xprof.cli.tools")
    return
  except ImportError:
    pass
  sys.modules["xprof"], sys.modules["xprof.cli"] = types.ModuleType("xprof"), types.ModuleType("xprof.cli")
  tools = types.ModuleType("xprof.cli.tools")
  tools.get_kernel_stats_tool = None
  sys.modules["xprof.cli.tools"] = tools


def import_tokamax() -> tuple[Any, str | None]:
  reason = gpu_missing_reason()
  if reason is not None:
    return None, reason
  install_xprof_stub()
  try:
    import tokamax
  except Exception as error:  # noqa: BLE001 - any import failure means the peer is unavailable
    return None, f"tokamax not importable ({_first_line(error)})"
  if not hasattr(tokamax, "dot_product_attention"):
    return None, f"tokamax {getattr(tokamax, '__version__', '?')} has no dot_product_attention"
  return tokamax, None


def import_torch_cuda() -> tuple[Any, str | None]:
  try:
    import torch
  except Exception as error:  # noqa: BLE001
    return None, f"torch not importable ({_first_line(error)})"
  if not torch.cuda.is_available():
    return None, "torch sees no CUDA device"
  return torch, None


def import_fla_based() -> tuple[Any, str | None]:
  """fla.ops.based (parallel_based, fused_chunk_based), which takes [B, T, H, F] torch CUDA tensors."""
  _, reason = import_torch_cuda()
  if reason is not None:
    return None, reason
  try:
    based = importlib.import_module("fla.ops.based")
  except Exception as error:  # noqa: BLE001
    return None, f"fla-core not importable ({_first_line(error)})"
  return based, None
