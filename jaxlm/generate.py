"""Generation: prefill the prompts in the parallel form, then decode one token per row per step inside one jitted
`lax.while_loop` (no Python loop per token), and the `python -m jaxlm.generate` CLI.

Prompts are right-padded with per-row lengths, so ragged rows decode side by side, each from its own position.
A row is done once it samples a stop token; its later tokens are `pad_id` and the loop ends when every row is
done or `max_new_tokens` are out. Sampling is seeded: the same seed, prompts and model give the same tokens.

  python -m jaxlm.generate --config based-tiny --prompt "Hello" --max-new-tokens 32
  python -m jaxlm.generate --config transformer-360m --benchmark --batch 1 32 max --prompt-len 1024 --new-tokens 1024

Letters: B batch, T prompt length, N new tokens, V vocabulary.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.models import LM, ModelConfig, load_preset
from jaxlm.sampling import SamplingConfig, sample


class Generation(NamedTuple):
  tokens_BN: jax.Array  # generated tokens; pad_id after a row's stop token and beyond the loop's end
  num_tokens_B: jax.Array  # tokens generated per row, its stop token included


@functools.partial(jax.jit, static_argnames=("graphdef", "max_length"))
def _prefill(graphdef: nnx.GraphDef, state: nnx.State, prompt_BT: jax.Array, lengths_B: jax.Array, *,
             max_length: int):
  model = nnx.merge(graphdef, state)
  cache = model.init_cache(prompt_BT.shape[0], max_length)
  return model.prefill(prompt_BT, cache, lengths_B)


# The prefill's cache is donated and returned (advanced), so the loop updates that buffer in place instead of
# copying it into the loop state.
@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "sampling", "stop_tokens", "pad_id"),
                   donate_argnames=("cache",))
def _decode(graphdef: nnx.GraphDef, state: nnx.State, logits_BV: jax.Array, cache: Any, key: jax.Array, *,
            max_new_tokens: int, sampling: SamplingConfig, stop_tokens: tuple[int, ...], pad_id: int
            ) -> tuple[Generation, Any]:
  model = nnx.merge(graphdef, state)
  batch = logits_BV.shape[0]
  stop = jnp.asarray(stop_tokens, jnp.int32)

  def sample_next(carry):
    """Token i of every row (pad_id once a row is done), from the logits after token i - 1."""
    i, tokens_BN, done_B, num_B, logits_BV, cache, key = carry
    key, step_key = jax.random.split(key)
    token_B = jnp.where(done_B, pad_id, sample(step_key, logits_BV, sampling))
    tokens_BN = tokens_BN.at[:, i].set(token_B)
    num_B = num_B + (~done_B).astype(jnp.int32)
    if stop_tokens:
      done_B = done_B | jnp.isin(token_B, stop)
    return token_B, (i, tokens_BN, done_B, num_B, logits_BV, cache, key)

  def cond(carry):
    i, _, done_B, *_ = carry
    return (i < max_new_tokens - 1) & ~jnp.all(done_B)

  def body(carry):
    # No lax.cond around the forward pass: a conditional would copy the caches each step.
    token_B, (i, tokens_BN, done_B, num_B, _, cache, key) = sample_next(carry)
    logits_BV, cache = model.decode(token_B, cache)
    return i + 1, tokens_BN, done_B, num_B, logits_BV, cache, key

  carry = (jnp.int32(0), jnp.full((batch, max_new_tokens), pad_id, jnp.int32), jnp.zeros((batch,), bool),
           jnp.zeros((batch,), jnp.int32), logits_BV, cache, key)
  carry = jax.lax.while_loop(cond, body, carry)
  _, (_, tokens_BN, _, num_B, _, cache, _) = sample_next(carry)  # the last token needs no forward pass
  return Generation(tokens_BN, num_B), cache


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Ragged token lists -> (right-padded int32 [B, T], lengths [B])."""
  lengths = np.array([len(p) for p in prompts], np.int32)
  if (lengths < 1).any():
    raise ValueError(f"every prompt needs at least one token, got lengths {lengths.tolist()}")
  tokens = np.full((len(prompts), int(lengths.max())), pad_id, np.int32)
  for row, prompt in enumerate(prompts):
    tokens[row, :len(prompt)] = prompt
  return tokens, lengths


def generate(model: LM, prompt_BT: Any, lengths_B: Any = None, *, max_new_tokens: int,
             sampling: SamplingConfig = SamplingConfig(), stop_tokens: Sequence[int] = (), seed: int = 0,
             pad_id: int = 0) -> Generation:
  """Up to `max_new_tokens` tokens after each row's prompt (right-padded [B, T]; lengths default to T)."""
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  prompt_BT = jnp.asarray(prompt_BT, jnp.int32)
  batch, length = prompt_BT.shape
  lengths_B = jnp.full((batch,), length, jnp.int32) if lengths_B is None else jnp.asarray(lengths_B, jnp.int32)
  graphdef, state = nnx.split(model)
  logits_BV, cache = _prefill(graphdef, state, prompt_BT, lengths_B, max_length=length + max_new_tokens)
  generation, _ = _decode(graphdef, state, logits_BV, cache, jax.random.key(seed), max_new_tokens=max_new_tokens,
                          sampling=sampling, stop_tokens=tuple(int(t) for t in stop_tokens), pad_id=pad_id)
  return generation


def benchmark(model: LM, *, batch: int, prompt_len: int, new_tokens: int, repeats: int = 3, seed: int = 0
              ) -> dict[str, float]:
  """Prefill time and decode throughput on random prompts, after a warm-up call compiles both."""
  prompt_BT = jax.random.randint(jax.random.key(seed), (batch, prompt_len), 0, model.config.vocab_size)
  lengths_B = jnp.full((batch,), prompt_len, jnp.int32)
  graphdef, state = nnx.split(model)
  prefill = functools.partial(_prefill, graphdef, state, prompt_BT, lengths_B, max_length=prompt_len + new_tokens)
  decode = functools.partial(_decode, graphdef, state, max_new_tokens=new_tokens, sampling=SamplingConfig(0.0),
                             stop_tokens=(), pad_id=0)
  prefill_s, decode_s = [], []
  for _ in range(repeats + 1):  # the first round compiles both and is not counted
    start = time.perf_counter()
    logits_BV, cache = jax.block_until_ready(prefill())
    prefill_s.append(time.perf_counter() - start)
    start = time.perf_counter()
    jax.block_until_ready(decode(logits_BV, cache, jax.random.key(seed)))  # donates (frees) the cache
    decode_s.append(time.perf_counter() - start)
    del logits_BV, cache
  prefill_s, decode_s = prefill_s[1:], decode_s[1:]
  prefill_t, decode_t = float(np.median(prefill_s)), float(np.median(decode_s))
  return dict(prefill_ms=1e3 * prefill_t, decode_s=decode_t, decode_tokens_per_s=batch * new_tokens / decode_t,
              decode_ms_per_step=1e3 * decode_t / new_tokens)


class ByteTokenizer:
  """UTF-8 bytes as tokens 0..255."""
  vocab_size = 256
  eos_id = None

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids: Sequence[int]) -> str:
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class JSONTokenizer:
  """A Hugging Face `tokenizers` tokenizer.json (needs the `tokenizers` package)."""

  def __init__(self, path: str):
    try:
      from tokenizers import Tokenizer
    except ImportError:
      raise SystemExit(f"--tokenizer {path}: reading tokenizer.json needs the `tokenizers` package "
                       f"(pip install tokenizers), or use --tokenizer byte") from None
    self.tokenizer = Tokenizer.from_file(path)
    self.vocab_size = self.tokenizer.get_vocab_size()
    self.eos_id = next((self.tokenizer.token_to_id(t) for t in ("<|endoftext|>", "</s>", "<eos>")
                        if self.tokenizer.token_to_id(t) is not None), None)

  def encode(self, text: str) -> list[int]:
    return self.tokenizer.encode(text).ids

  def decode(self, ids: Sequence[int]) -> str:
    return self.tokenizer.decode([int(i) for i in ids])


def load_tokenizer(name: str) -> ByteTokenizer | JSONTokenizer:
  return ByteTokenizer() if name == "byte" else JSONTokenizer(name)


def init_model(config: ModelConfig, seed: int = 0) -> LM:
  """The LM with random parameters, initialised in one compiled program (not op by op)."""
  return nnx.jit(lambda: LM(config, rngs=nnx.Rngs(seed)))()


def _batch_arg(text: str) -> int | str:
  if text == "max":
    return text
  if not text.isdigit() or int(text) < 1:
    raise argparse.ArgumentTypeError(f"a batch size is a positive integer or 'max', got {text!r}")
  return int(text)


def peak_bytes(model: LM, *, batch: int, prompt_len: int, new_tokens: int) -> int:
  """Device bytes that prefill and the decode loop need at once at most (weights, caches, temporaries), from the
  compiled programs' memory analysis: no run, so the largest batch is found without running out of memory."""
  graphdef, state = nnx.split(model)
  prompt_BT = jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32)
  lengths_B = jax.ShapeDtypeStruct((batch,), jnp.int32)
  prefill = _prefill.lower(graphdef, state, prompt_BT, lengths_B, max_length=prompt_len + new_tokens)
  logits_BV, cache = prefill.out_info
  decode = _decode.lower(graphdef, state, logits_BV, cache, jax.random.key(0), max_new_tokens=new_tokens,
                         sampling=SamplingConfig(0.0), stop_tokens=(), pad_id=0)

  def peak(lowered) -> int:
    m = lowered.compile().memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes

  return max(peak(prefill), peak(decode))


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


def _run_benchmarks(model: LM, args: argparse.Namespace) -> None:
  """Each requested batch in turn; 'max' is the largest power-of-two multiple of 64 that fits the device."""
  name = os.path.basename(args.config)
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


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m jaxlm.generate", description=__doc__.split("\n\n")[0])
  p.add_argument("--config", required=True, help="model YAML path or preset name (configs/models/)")
  p.add_argument("--checkpoint", help="orbax checkpoint (run dir, checkpoints dir or one step); default: random")
  p.add_argument("--tokenizer", default="byte", help="'byte' or a path to a tokenizer.json")
  p.add_argument("--prompt", nargs="+", action="extend", help="one or more prompts, generated side by side")
  p.add_argument("--max-new-tokens", type=int, default=64)
  p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
  p.add_argument("--top-k", type=int, default=0)
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--stop", type=int, action="append", default=None,
                 help="stop token id (repeatable); default: the tokenizer's end-of-text token if it has one")
  p.add_argument("--seed", type=int, default=0, help="sampling seed (and the random init's)")
  p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="override the config's compute dtype")
  p.add_argument("--benchmark", action="store_true", help="time prefill and decode on random prompts")
  p.add_argument("--batch", nargs="+", default=["1"], type=_batch_arg,
                 help="benchmark batch sizes; 'max': the largest 64·2^k whose compiled programs fit the device")
  p.add_argument("--prompt-len", type=int, default=1024)
  p.add_argument("--new-tokens", type=int, default=1024)
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args(argv)
  if not args.benchmark and not args.prompt:
    p.error("give --prompt TEXT (or --benchmark)")
  return args


def main(argv: Sequence[str] | None = None) -> None:
  args = _parse_args(argv)
  config = load_preset(args.config)
  if args.dtype:
    config = dataclasses.replace(config, dtype=args.dtype)
  model = init_model(config, args.seed)
  if args.checkpoint:
    from jaxlm.checkpoint import load_params
    step = load_params(model, args.checkpoint)
    print(f"loaded parameters from {args.checkpoint} (step {step})", file=sys.stderr)
  else:
    print(f"no --checkpoint: parameters are a random init (seed {args.seed}), so the text is noise",
          file=sys.stderr)
  if args.benchmark:
    _run_benchmarks(model, args)
    return
  tokenizer = load_tokenizer(args.tokenizer)
  if tokenizer.vocab_size > config.vocab_size:
    raise SystemExit(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {config.vocab_size}")
  stop = args.stop if args.stop is not None else ([tokenizer.eos_id] if tokenizer.eos_id is not None else [])
  prompt_BT, lengths_B = pad_prompts([tokenizer.encode(text) for text in args.prompt])
  out = generate(model, prompt_BT, lengths_B, max_new_tokens=args.max_new_tokens,
                 sampling=SamplingConfig(args.temperature, args.top_k, args.top_p), stop_tokens=stop,
                 seed=args.seed)
  tokens_BN, num_B = np.asarray(out.tokens_BN), np.asarray(out.num_tokens_B)
  for text, row, n in zip(args.prompt, tokens_BN, num_B):
    print(text + tokenizer.decode(row[:n]))


if __name__ == "__main__":
  main()
