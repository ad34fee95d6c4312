"""Where a decode step's time goes: each layer kind's block (mixer + MLP) and mixer alone, the LM head, and the
whole step, timed in the same run at one batch, each with the bytes it must move and the rate that implies.

The generation benchmark gives one number per step (e.g. based-360m at batch 512: 4.68 ms, 47% of the copy rate,
H100, 2026-12-07); this splits it. Each part runs `--steps` times inside one jitted fori_loop (its output fed back
as its input, its cache donated and carried), as the decode loop runs it, so dispatch is not timed. KV caches are
filled to --length tokens (lengths set; the values are zeros, which costs the same to read). Above the table: the
whole step's kernels from a jax.profiler trace (device time per step, and how busy the device is).

  PYTHONPATH=. python benchmarks/scripts/decode_breakdown.py --config based-360m --batch 512 --length 1024
"""
import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks import kernel_profile
from jaxlm.generate import roofline
from jaxlm.layers.attention import KVCache
from jaxlm.models import LM
from jaxlm.models.presets import load_preset


def _filled(cache, length: int):
  """KV caches as if `length` tokens had been seen (capped at their slots, as a ring holds)."""
  def fill(c):
    if isinstance(c, KVCache):
      return c._replace(lengths_B=jnp.full_like(c.lengths_B, length))
    return c
  return jax.tree.map(fill, cache, is_leaf=lambda c: isinstance(c, KVCache))


def _cache_bytes(cache, length: int) -> int:
  """Bytes a decode step moves in one layer's cache: a state is read and written whole; a KV cache's filled slots
  (min(length, slots) of them) are read and one slot per row is written."""
  if not isinstance(cache, KVCache):
    return 2 * roofline.tree_bytes(cache)
  slots = cache.k_BSKD.shape[1]
  kv = roofline.tree_bytes((cache.k_BSKD, cache.v_BSKD))
  return kv * min(length, slots) // slots + kv // slots


def _time(step, carry, steps: int, repeats: int = 3, profile: bool = False):
  """Seconds per step of `step(carry) -> carry` run `steps` times in one program (the carry donated); with
  `profile`, (seconds, the kernels of one more run per step: benchmarks/kernel_profile.py)."""
  loop = jax.jit(lambda c: jax.lax.fori_loop(0, steps, lambda i, c: step(c), c), donate_argnums=0)
  carry = jax.block_until_ready(loop(carry))  # compile and warm up
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    carry = jax.block_until_ready(loop(carry))
    best = min(best, time.perf_counter() - start)
  if not profile:
    return best / steps
  held = [carry]
  kernels = kernel_profile.trace(lambda: held.append(jax.block_until_ready(loop(held.pop()))), steps)
  return best / steps, kernels


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True, help="a model preset name")
  parser.add_argument("--batch", type=int, default=512)
  parser.add_argument("--length", type=int, default=1024, help="tokens already in the KV caches")
  parser.add_argument("--steps", type=int, default=20)
  args = parser.parse_args()
  config = load_preset(args.config)
  model = LM(config, rngs=nnx.Rngs(0))
  B, max_length = args.batch, config.max_length
  cache = _filled(model.init_cache(B, max_length), args.length)
  x_BE = jnp.zeros((B, config.d_model), model.dtype)
  rows = []

  def part(name, layers, fn, module, part_cache, bytes_moved):
    graphdef, state = nnx.split(module)

    def step(carry):
      y, *rest = fn(nnx.merge(graphdef, state), *carry)
      return (y.astype(x_BE.dtype), *rest)
    carry = (x_BE,) if part_cache is None else (x_BE, part_cache)
    seconds = _time(step, jax.tree.map(jnp.copy, carry), args.steps)  # copies: the loop donates its carry
    rows.append((name, layers, seconds, bytes_moved))

  for stack, stack_cache in zip(model.stacks, cache.layers):
    graphdef, state = nnx.split(stack.blocks)
    block = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], state))
    kind = type(block.mixer).__name__
    layer_cache = stack_cache[0]
    moved = _cache_bytes(layer_cache, args.length)
    weights = roofline.tree_bytes(nnx.state(block, nnx.Param))
    mixer_weights = roofline.tree_bytes(nnx.state(block.mixer, nnx.Param))
    part(f"{kind} block", stack.num_layers, lambda b, x, c: b.decode(x, c), block, layer_cache, weights + moved)
    part(f"{kind} mixer", stack.num_layers, lambda m, x, c: m.decode(x, c), block.mixer, layer_cache,
         mixer_weights + moved)
  head_bytes = roofline.tree_bytes(model.head_EV()) + B * config.vocab_size * 4
  part("LM head (logits)", 1, lambda m, x: (m._logits(x)[:, :config.d_model].astype(x.dtype),), model, None,
       head_bytes)
  tokens_B = jnp.zeros((B,), jnp.int32)
  graphdef, state = nnx.split(model)
  whole, kernels = _time(lambda c: (lambda logits, cache: (jnp.argmax(logits, -1).astype(jnp.int32), cache))(
      *nnx.merge(graphdef, state).decode(*c)), (tokens_B, jax.tree.map(jnp.copy, cache)), args.steps, profile=True)

  # 1 GiB as the generation benchmark measures it: over 64 MiB the copy ran at 954 GB/s, launch-bound (H100).
  copy = roofline.copy_rate(1 << 30)
  print(f"{args.config}, batch {B}, caches at {args.length} tokens, {jax.devices()[0].device_kind}, "
        f"{args.steps} steps in one loop (best of 3); device copy rate {copy / 1e9:.0f} GB/s (x + 1 over 1 GiB)")
  # The whole step's kernels first (the table ends stdout): device time against the step's wall time says how
  # much of a step the GPU idles between launches, the names which kernels cost most.
  busy = sum(k.us for k in kernels) / (1e6 * whole) if kernels else None
  print(f"kernels of the whole decode step, per step (device busy {busy:.0%} of the step):" if busy is not None
        else "kernels of the whole decode step: none traced (no GPU)")
  print(kernel_profile.format_breakdown(kernels, top=15))
  print("| part | layers | ms per layer | ms per step | MB per layer | GB/s |")
  print("|---|---:|---:|---:|---:|---:|")
  blocks_ms = 0.0
  for name, layers, seconds, moved in rows:
    if not name.endswith("mixer"):
      blocks_ms += 1e3 * seconds * layers
    print(f"| {name} | {layers} | {1e3 * seconds:.3f} | {1e3 * seconds * layers:.3f} | {moved / 1e6:.1f} | "
          f"{moved / seconds / 1e9:.0f} |")
  print(f"| sum of blocks and head | | | {blocks_ms:.3f} | | |")
  print(f"| whole decode step | | | {1e3 * whole:.3f} | | |")


if __name__ == "__main__":
  main()
