"""Prefill and decode timing of a model (`python -m jaxlm.generate --benchmark`): milliseconds to prefill, tokens
per second to decode, device-synchronised after a warm-up, at each requested batch; `max` is the largest 64·2^k
batch whose compiled programs fit the device's memory, found from their memory analysis without running them.

Letters: B batch, T prompt length, V vocabulary.
"""

from __future__ import annotations

import argparse
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.generate import decode_loop, prefill
from jaxlm.models import LM
from jaxlm.sampling import SamplingConfig


def benchmark(model: LM, *, batch: int, prompt_len: int, new_tokens: int, repeats: int = 3, seed: int = 0
              ) -> dict[str, float]:
  """Prefill time and decode throughput on random prompts, after a warm-up call compiles both."""
  prompt_BT = jax.random.randint(jax.random.key(seed), (batch, prompt_len), 0, model.config.vocab_size)
  lengths_B = jnp.full((batch,), prompt_len, jnp.int32)
  graphdef, state = nnx.split(model)
  run_prefill = functools.partial(prefill, graphdef, state, prompt_BT, lengths_B,
                                  max_length=prompt_len + new_tokens)
  run_decode = functools.partial(decode_loop, graphdef, state, max_new_tokens=new_tokens,
                                 sampling=SamplingConfig(0.0), stop_tokens=(), pad_id=0)
  prefill_s, decode_s = [], []
  for _ in range(repeats + 1):  # the first round compiles both and is not counted
    start = time.perf_counter()
    logits_BV, cache = jax.block_until_ready(run_prefill())
    prefill_s.append(time.perf_counter() - start)
    start = time.perf_counter()
    jax.block_until_ready(run_decode(logits_BV, cache, jax.random.key(seed)))  # donates (frees) the cache
    decode_s.append(time.perf_counter() - start)
    del logits_BV, cache
  prefill_s, decode_s = prefill_s[1:], decode_s[1:]
  prefill_t, decode_t = float(np.median(prefill_s)), float(np.median(decode_s))
  return dict(prefill_ms=1e3 * prefill_t, decode_s=decode_t, decode_tokens_per_s=batch * new_tokens / decode_t,
              decode_ms_per_step=1e3 * decode_t / new_tokens)


def peak_bytes(model: LM, *, batch: int, prompt_len: int, new_tokens: int) -> int:
  """Device bytes that prefill and the decode loop need at once at most (weights, caches, temporaries), from the
  compiled programs' memory analysis: no run, so the largest batch is found without running out of memory."""
  graphdef, state = nnx.split(model)
  prompt_BT = jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32)
  lengths_B = jax.ShapeDtypeStruct((batch,), jnp.int32)
  lowered_prefill = prefill.lower(graphdef, state, prompt_BT, lengths_B, max_length=prompt_len + new_tokens)
  logits_BV, cache = lowered_prefill.out_info
  lowered_decode = decode_loop.lower(graphdef, state, logits_BV, cache, jax.random.key(0), max_new_tokens=new_tokens,
                         sampling=SamplingConfig(0.0), stop_tokens=(), pad_id=0)

  def peak(lowered) -> int:
    m = lowered.compile().memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes

  return max(peak(lowered_prefill), peak(lowered_decode))


def device_bytes() -> int:
  stats = jax.devices()[0].memory_stats()
  if not stats or "bytes_limit" not in stats:
    raise SystemExit(f"--batch max: {jax.devices()[0].device_kind} does not report its memory")
  return int(stats["bytes_limit"])


def _report(name: str, model: LM, batch: int, args: argparse.Namespace, stats: dict[str, float]) -> None:
  print(f"{name} on {jax.devices()[0].device_kind}, batch {batch}, {model.config.dtype}: prefill "
        f"{args.prompt_len} tokens {stats['prefill_ms']:.1f} ms; decode {args.new_tokens} tokens "
        f"{stats['decode_tokens_per_s']:.1f} tokens/s ({stats['decode_ms_per_step']:.2f} ms/step)", flush=True)


def _largest_batch(model: LM, start: int, args: argparse.Namespace) -> int:
  """Doubles the batch from `start` while the compiled programs fit the device's memory (with 5% to spare for
  fragmentation)."""
  limit, fitted, batch = 0.95 * device_bytes(), 0, start
  while True:
    need = peak_bytes(model, batch=batch, prompt_len=args.prompt_len, new_tokens=args.new_tokens)
    if need > limit:
      print(f"largest batch that fits: {fitted} (batch {batch} needs {need / 2**30:.1f} GiB of "
            f"{limit / 2**30:.1f} GiB)", flush=True)
      return fitted
    fitted, batch = batch, 2 * batch


def run_benchmarks(model: LM, args: argparse.Namespace) -> None:
  """Each requested batch in turn; 'max' is the largest power-of-two multiple of 64 that fits the device."""
  name = os.path.basename(args.run or args.config or args.checkpoint)
  largest = 0
  for batch in args.batch:
    if batch == "max":
      batch = _largest_batch(model, max(64, 2 * largest), args)
      if batch == 0:
        raise SystemExit("--batch max: not even batch 64 fits the device")
    stats = benchmark(model, batch=batch, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                      repeats=args.repeats, seed=args.seed)
    _report(name, model, batch, args, stats)
    largest = max(largest, batch)
