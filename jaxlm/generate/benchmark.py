"""Prefill and decode timing of a model (`python -m jaxlm.generate --benchmark`): milliseconds to prefill, tokens
per second to decode, device-synchronised, compiled ahead of time, at each requested batch and setting (prompt
length + new tokens: SETTINGS, or --prompt-len/--new-tokens), with the decode step's memory roofline: the bytes a step
moves (weights once, caches and states read and written per row, logits), the bandwidth that implies, and its
fraction of the device's HBM rate (a table by device kind) and of the same run's device copy rate.

`max` is the largest batch whose weights, caches and per-row activations fit the device's memory with a margin
(roofline.py gives the formula), then checked against the compiled programs' memory analysis without running
them, and stepped down further if running it still runs out of memory. With --prefill-chunk the prompt is
prefilled that many tokens per row at a time, so prefill activations are bounded by the piece and the cache (or
state) decides the batch.

Letters: B batch, T prompt length, V vocabulary.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.generate import decode_loop, prefill, roofline
from jaxlm.models import LM
from jaxlm.sampling import SamplingConfig

# Named (prompt length, new tokens) settings: the 1024 + 1024, and long generations from short prompts,
# where a constant-size state pays most (LoLCATs measures prompt 128, 4096 new tokens).
SETTINGS = {"1024+1024": (1024, 1024), "128+2048": (128, 2048), "128+4096": (128, 4096)}


def _lowered(graphdef: nnx.GraphDef, state: nnx.State, *, batch: int, prompt_len: int, new_tokens: int,
             prefill_chunk: int | None = None):
  """The prefill and decode-loop programs of a split model for a batch, lowered from shapes alone (nothing runs)."""
  prompt_BT = jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32)
  lengths_B = jax.ShapeDtypeStruct((batch,), jnp.int32)
  lowered_prefill = prefill.lower(graphdef, state, prompt_BT, lengths_B, max_length=prompt_len + new_tokens,
                                  chunk=prefill_chunk)
  logits_BV, cache = lowered_prefill.out_info
  lowered_decode = decode_loop.lower(graphdef, state, logits_BV, cache, jax.random.key(0),
                                     max_new_tokens=new_tokens, sampling=SamplingConfig(0.0), stop_tokens=(), pad_id=0)
  return lowered_prefill, lowered_decode


def benchmark(model: LM, *, batch: int, prompt_len: int, new_tokens: int, repeats: int = 3, seed: int = 0,
              prefill_chunk: int | None = None) -> dict[str, float]:
  """Prefill time and decode throughput on random prompts. Both programs are compiled ahead of time, so no round
  is spent on compiling: at the largest batches a 4096-token generation takes minutes on the GPU."""
  prompt_BT = jax.random.randint(jax.random.key(seed), (batch, prompt_len), 0, model.config.vocab_size)
  lengths_B = jnp.full((batch,), prompt_len, jnp.int32)
  graphdef, state = nnx.split(model)
  lowered = _lowered(graphdef, state, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens,
                     prefill_chunk=prefill_chunk)
  run_prefill, run_decode = (program.compile() for program in lowered)
  prefill_s, decode_s = [], []
  for _ in range(repeats):
    start = time.perf_counter()
    logits_BV, cache = jax.block_until_ready(run_prefill(state, prompt_BT, lengths_B))
    prefill_s.append(time.perf_counter() - start)
    start = time.perf_counter()
    jax.block_until_ready(run_decode(state, logits_BV, cache, jax.random.key(seed)))  # donates (frees) the cache
    decode_s.append(time.perf_counter() - start)
    del logits_BV, cache
  prefill_t, decode_t = float(np.median(prefill_s)), float(np.median(decode_s))
  # The loop runs new_tokens - 1 forward passes (the last token needs none): the roofline's steps.
  return dict(prefill_ms=1e3 * prefill_t, decode_s=decode_t, decode_tokens_per_s=batch * new_tokens / decode_t,
              decode_ms_per_step=1e3 * decode_t / max(new_tokens - 1, 1))


def peak_bytes(model: LM, *, batch: int, prompt_len: int, new_tokens: int, prefill_chunk: int | None = None
               ) -> int:
  """Device bytes that prefill and the decode loop need at once at most (weights, caches, temporaries), from the
  compiled programs' memory analysis: no run, so the largest batch is found without running out of memory."""

  def peak(lowered) -> int:
    m = lowered.compile().memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes

  lowered = _lowered(*nnx.split(model), batch=batch, prompt_len=prompt_len, new_tokens=new_tokens,
                     prefill_chunk=prefill_chunk)
  return max(peak(program) for program in lowered)


def device_bytes() -> int:
  stats = jax.devices()[0].memory_stats()
  if not stats or "bytes_limit" not in stats:
    raise SystemExit(f"--batch max: {jax.devices()[0].device_kind} does not report its memory")
  return int(stats["bytes_limit"])


class BatchSizes(NamedTuple):
  """The terms of the --batch max formula, in bytes (roofline.py)."""
  weights: int  # W: parameters (and their compute-dtype copies)
  fixed: int  # max(W, the compiled programs' batch-independent part)
  cache: int  # C: one row's cache
  activations: int  # A: one row's activations, the programs' per-row growth less C


def batch_sizes(model: LM, *, prompt_len: int, new_tokens: int, prefill_chunk: int | None = None,
                batches: tuple[int, int] = (8, 16)) -> BatchSizes:
  """W and C from the shapes; A and the fixed part from the larger compiled program's peak at two small batches
  (a line through them: its slope per row less C, its intercept)."""
  small, large = batches
  kw = dict(prompt_len=prompt_len, new_tokens=new_tokens, prefill_chunk=prefill_chunk)
  peak_small, peak_large = peak_bytes(model, batch=small, **kw), peak_bytes(model, batch=large, **kw)
  slope = int(np.ceil((peak_large - peak_small) / (large - small)))
  weights = roofline.weight_bytes(model)
  cache = roofline.cache_bytes_per_row(model, prompt_len + new_tokens)
  return BatchSizes(weights, max(weights, peak_small - small * slope), cache, max(slope - cache, 0))


def largest_fitting_batch(model: LM, args: argparse.Namespace) -> int:
  """roofline.largest_batch from batch_sizes, then stepped down (by 64, or 8 below 64) while the compiled
  programs would not fit the device's memory less half the margin."""
  kw = dict(prompt_len=args.prompt_len, new_tokens=args.new_tokens, prefill_chunk=args.prefill_chunk)
  if os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "true").lower() in ("false", "0"):
    # Seen on an H100: without preallocation the allocator grows its pool region by region, compiling (autotuning)
    # leaves regions behind, and batches the memory analysis admits (transformer-360m at 192: 61.9 of 75.2 GiB)
    # then fail to allocate. One preallocated region does not fragment that way.
    print("batch max: XLA_PYTHON_CLIENT_PREALLOCATE=false; the batch found may not allocate (leave it unset)",
          flush=True)
  limit = device_bytes()
  sizes = batch_sizes(model, **kw)
  batch = roofline.largest_batch(limit, sizes.fixed, sizes.cache + sizes.activations)
  print(f"batch max: ({1 - roofline.MARGIN:.2f} x {limit / 2**30:.2f} GiB - fixed {sizes.fixed / 2**30:.3f} GiB "
        f"(weights {sizes.weights / 2**30:.3f})) / (cache {sizes.cache / 2**20:.3f} MiB + activations "
        f"{sizes.activations / 2**20:.3f} MiB per row) -> {batch}", flush=True)
  while batch > 0:
    need = peak_bytes(model, batch=batch, **kw)
    print(f"batch {batch}: the compiled programs need {need / 2**30:.2f} GiB of {limit / 2**30:.2f} GiB", flush=True)
    if need <= (1 - roofline.MARGIN / 2) * limit:
      break
    batch = _smaller(batch)
  return batch


def _smaller(batch: int) -> int:
  """The next batch --batch max tries: 64 fewer rows, or 8 fewer below 64."""
  return batch - (64 if batch > 64 else 8)


def _report(name: str, model: LM, batch: int, args: argparse.Namespace, stats: dict[str, float],
            bandwidth: dict[str, float | None]) -> None:
  chunk = f" in pieces of {args.prefill_chunk}" if args.prefill_chunk else ""
  print(f"{name} on {jax.devices()[0].device_kind}, batch {batch}, {model.config.dtype}: prefill "
        f"{args.prompt_len} tokens{chunk} {stats['prefill_ms']:.1f} ms; decode {args.new_tokens} tokens "
        f"{stats['decode_tokens_per_s']:.1f} tokens/s ({stats['decode_ms_per_step']:.2f} ms/step)", flush=True)
  moved = roofline.decode_step_bytes(model, batch=batch, prompt_len=args.prompt_len, new_tokens=args.new_tokens)
  rate = moved["total"] / (stats["decode_ms_per_step"] / 1e3)
  fractions = [f"{100 * rate / bandwidth[key]:.0f}% of the {label} {bandwidth[key] / 1e9:.0f} GB/s"
               for key, label in (("peak", "data sheet's"), ("copy", "measured copy rate")) if bandwidth[key]]
  print(f"  roofline: {moved['total'] / 1e6:.1f} MB per decode step (weights {moved['weights'] / 1e6:.1f}, caches "
        f"{moved['caches'] / 1e6:.1f}, logits {moved['logits'] / 1e6:.1f}) -> {rate / 1e9:.1f} GB/s = "
        + ", ".join(fractions), flush=True)


def measure_bandwidth() -> dict[str, float | None]:
  """The data sheet's HBM rate for this device kind (None if unknown) and a copy rate measured now."""
  stats = jax.devices()[0].memory_stats() or {}
  size = min(1 << 30, stats["bytes_limit"] // 16) if "bytes_limit" in stats else 64 << 20
  copy = roofline.copy_rate(size)
  peak = roofline.peak_bandwidth(jax.devices()[0].device_kind)
  print(f"device {jax.devices()[0].device_kind}: copy rate {copy / 1e9:.1f} GB/s (x + 1 over {size / 2**20:.0f} MiB)"
        + (f", data sheet {peak / 1e9:.0f} GB/s" if peak else ", no data-sheet rate for this kind"), flush=True)
  return dict(peak=peak, copy=copy)


def run_benchmarks(model: LM, args: argparse.Namespace) -> None:
  """Each requested setting, each requested batch in turn ('max': roofline.largest_batch, checked)."""
  name = os.path.basename(args.run or args.config or args.checkpoint)
  bandwidth = measure_bandwidth()
  settings = [SETTINGS[s] for s in args.setting] if args.setting else [(args.prompt_len, args.new_tokens)]
  for prompt_len, new_tokens in settings:
    args.prompt_len, args.new_tokens = prompt_len, new_tokens
    for batch in args.batch:
      largest = batch == "max"
      if largest:
        batch = largest_fitting_batch(model, args)
      while True:
        if batch <= 0:
          raise SystemExit("--batch max: not even batch 8 fits the device")
        try:
          stats = benchmark(model, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, repeats=args.repeats,
                            seed=args.seed, prefill_chunk=args.prefill_chunk)
          break
        except jax.errors.JaxRuntimeError as error:
          # The memory analysis bounds what the programs need, not how the allocator places it (a fragmented
          # pool failed at 82% of the limit on an H100): --batch max steps down at run time too.
          if not (largest and "RESOURCE_EXHAUSTED" in str(error)):
            raise
          print(f"batch {batch}: out of memory when run ({str(error).splitlines()[0][:160]}); trying "
                f"{_smaller(batch)}", flush=True)
          batch = _smaller(batch)
      _report(name, model, batch, args, stats, bandwidth)
