"""What bounds generation on a device: the bytes a decode step must move (the memory roofline), the device's memory
bandwidth, and the largest batch whose weights, caches and activations fit its memory.

Bytes per decode step (one forward pass of the whole batch; the loop runs new_tokens - 1 of them):

  weights     every parameter once, at the compute dtype's width (a float32 parameter is cast to bf16 once: the
              cast is loop-invariant, so XLA hoists it out of the decode loop), except the tables read B rows
              per step: the input embedding when untied (tied, the LM head reads all of it) and learned positions
  caches      per row, per layer: a KV ring (attention, sliding window) reads the min(n + 1, S) filled slots of
              k and v after writing one slot of each (n = tokens before the step); every other cache (BASED's
              state, the conv states, H3's SSM state, Hyena's history) is read and written whole
  logits      per row, the float32 logits [V] written by the head and read by sampling

averaged over the steps of the run (a KV ring's reads grow with n). The bandwidth is a table by device kind (the
HBM rate of the card's data sheet) where the kind is known, and a device copy (x + 1 over a large array: read and
write) timed in the same run otherwise, and reported beside the table in either case.

The largest batch (`--batch max`):

  need(B) = W + B·(C + A) <= (1 - margin)·M,   so   B_max = floor(((1 - margin)·M - W) / (C + A))

with C the cache bytes per row (from init_cache's shapes at the run's max_length), W the larger of the parameter
bytes (plus their compute-dtype copies when the dtypes differ) and the compiled programs' batch-independent
part, and A the activation bytes per row of the larger of the two programs (prefill, or one prefill piece when
chunked, and the decode loop). A and the fixed part come from a line through XLA's memory analysis of the
programs at two small batches (its slope less C, its intercept), since fusion decides what is materialised.
M is the device's memory limit, margin 10% for fragmentation and the runtime. B_max is rounded down to a
multiple of 64 (of 8 below 64); jaxlm/generate/benchmark.py then checks the programs compiled at B_max.

Letters: B batch, V vocabulary, S cache slots.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.layers.attention import KVCache
from jaxlm.models import LM

# HBM bandwidth by device kind (data sheets: H100 SXM 3.35 TB/s, H100 NVL 3.9, H100 PCIe 2.0, H200 4.8), bytes/s.
# First match wins, so the specific H100 forms precede the SXM default.
PEAK_BANDWIDTH = (("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12))

MARGIN = 0.10  # of the device memory, left free by --batch max


def tree_bytes(tree: Any) -> int:
  """Bytes of every array (or ShapeDtypeStruct) leaf."""
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def cache_bytes_per_row(model: LM, max_length: int) -> int:
  """Bytes of one row's generation cache (every layer, and its length counter) for `max_length` tokens."""
  return tree_bytes(jax.eval_shape(lambda: model.init_cache(1, max_length)))


def weight_bytes(model: LM) -> int:
  """Parameter bytes as stored, plus their compute-dtype copies when the dtypes differ (the casts are held)."""
  params = jax.tree.leaves(nnx.state(model, nnx.Param))
  stored = tree_bytes(params)
  compute = jnp.dtype(model.config.dtype)
  copies = sum(int(np.prod(p.shape)) * compute.itemsize for p in params if jnp.dtype(p.dtype) != compute)
  return stored + copies


def largest_batch(device_bytes: int, fixed_bytes: int, row_bytes: int, margin: float = MARGIN) -> int:
  """floor(((1 - margin)·M - W) / per-row bytes), down to a multiple of 64 (of 8 below 64); 0 if none fits."""
  if row_bytes <= 0:
    raise ValueError(f"row_bytes must be positive, got {row_bytes}")
  if not 0 <= margin < 1:
    raise ValueError(f"margin must be in [0, 1), got {margin}")
  batch = int(((1 - margin) * device_bytes - fixed_bytes) // row_bytes)
  if batch >= 64:
    return batch // 64 * 64
  return max(batch // 8 * 8, 0)


def decode_step_bytes(model: LM, *, batch: int, prompt_len: int, new_tokens: int) -> dict[str, float]:
  """Mean bytes one decode step moves over a run of `new_tokens` from `prompt_len`-token prompts, by kind:
  weights, caches, logits and their total (the module docstring's count)."""
  config = model.config
  compute = jnp.dtype(config.dtype).itemsize
  width = lambda x: min(jnp.dtype(x.dtype).itemsize, compute)  # noqa: E731
  weights = sum(int(np.prod(p.shape)) * width(p) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
  tables = ([model.embed.embedding[...]] if model.head is not None else []) + (
      [model.pos_embed.embedding[...]] if model.pos_embed is not None else [])
  for table in tables:  # looked up, not multiplied: B rows read per step
    weights += (min(batch, table.shape[0]) - table.shape[0]) * table.shape[1] * width(table)
  cache = jax.eval_shape(lambda: model.init_cache(1, prompt_len + new_tokens))
  steps = max(new_tokens - 1, 1)
  seen = prompt_len + np.arange(steps)  # tokens before each decode step
  per_row = 0.0
  for layer in (c for run in cache.layers for c in run):
    if isinstance(layer, KVCache):
      slots = layer.k_BSKD.shape[1]
      slot_bytes = tree_bytes((layer.k_BSKD, layer.v_BSKD)) // slots
      per_row += slot_bytes * (np.minimum(seen + 1, slots).mean() + 1) + 2 * tree_bytes(layer.lengths_B)
    else:
      per_row += 2 * tree_bytes(layer)
  per_row += 2 * tree_bytes(cache.lengths_B)
  logits = 2 * 4 * config.vocab_size
  out = dict(weights=float(weights), caches=batch * per_row, logits=float(batch * logits))
  out["total"] = sum(out.values())
  return out


def peak_bandwidth(device_kind: str) -> float | None:
  """The data sheet's HBM bytes/s for a known device kind, else None."""
  for name, rate in PEAK_BANDWIDTH:
    if name in device_kind:
      return rate
  return None


def copy_rate(num_bytes: int = 1 << 30, repeats: int = 5, calls: int = 10) -> float:
  """Device bytes/s of x + 1 over a float32 array of `num_bytes` (read once, written once, in place), the median
  over `repeats` samples of `calls` back to back. One call per sample, each waited for, read 1693 GB/s on an H100
  in one process and 2274 in another on the same machine (2026-12-07); a lone ~1 ms op after a sync may also time
  its launch and a clock ramp. Back to back, as the harness times kernels, with the array donated so no second
  1 GiB buffer is needed beside a full cache pool."""
  x = jnp.zeros((num_bytes // 4,), jnp.float32)
  bump = jax.jit(lambda a: a + 1, donate_argnums=0)
  x = jax.block_until_ready(bump(x))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(calls):
      x = bump(x)
    jax.block_until_ready(x)
    times.append((time.perf_counter() - start) / calls)
  return 2 * x.nbytes / float(np.median(times))
