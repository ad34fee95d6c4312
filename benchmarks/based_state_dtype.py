"""Decode-state dtype (issue 22): is a bf16 BASED decode state exact enough to ship?

The rule: a state stored in bfloat16 between steps (each step still accumulates in float32, as the step does today,
then rounds the stored sums to bf16) may ship only if its drift from the parallel form, over 4096 decode steps,
stays within the bf16 parallel forward's own error. This script measures both, at two levels:

- op: q, k, v from a random `Based` layer (E 128, H 2, F 16, D 64, the layer's own normal init) on standard-normal
  x, so s = q·k/√F has the layer's O(1) spread. Decode is lax.scan of `reference.based_step` from the empty state;
  the oracle is `reference.based_quadratic` on the float32 q, k, v (float32, exact matmuls).
- model: a tiny all-BASED LM (2 layers of the same mixer, SwiGLU, byte vocabulary), random init, random tokens
  fed to `LM.decode` one per step (teacher forcing) against the float32 parallel forward's logits.

Variants: "f32 state" (today), "bf16 state" (stored sums rounded to bf16 after every step), each with float32
q, k, v (an f32 model) and bf16 ones (the layer run with dtype=bfloat16, as a bf16 model decodes), and
"bf16 parallel": the same layer/model with compute dtype bfloat16 in the parallel form, the bound the rule names.
"bf16 state, f32 z0" keeps the token count in float32 to tell the count's rounding from the sums'.

Error at step n: ‖out - ref‖ / ‖ref‖ per token (over D per head for the op, over V for logits), max and mean over
the 64 tokens ending at n and every row (and head).

  python -m benchmarks.based_state_dtype                 # both levels, 4096 steps (about 20 s on 2 CPU cores)
  python -m benchmarks.based_state_dtype --levels op --steps 1024
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.layers.based import Based, BasedConfig
from jaxlm.models import LM, ModelConfig
from pallas_kernels.based import BasedState, reference

WINDOW = 64  # tokens ending at each reported step over which max and mean are taken
CHECKPOINTS = (128, 512, 1024, 2048, 4096)
LAYER = BasedConfig(d_model=128, num_heads=2, feature_dim=16)


def stored_as(dtype, *, count_dtype=None) -> Callable[[BasedState], BasedState]:
  """Rounds a float32 state as storing it in `dtype` would (the step upcasts it again); z0 in count_dtype if set."""

  def round_state(state: BasedState) -> BasedState:
    rounded = BasedState(*(x.astype(dtype).astype(x.dtype) for x in state))
    if count_dtype is not None:
      rounded = rounded._replace(z0_BH=state.z0_BH.astype(count_dtype).astype(state.z0_BH.dtype))
    return rounded

  return round_state


VARIANTS = {"f32 state": stored_as(jnp.float32), "bf16 state": stored_as(jnp.bfloat16),
            "bf16 state, f32 z0": stored_as(jnp.bfloat16, count_dtype=jnp.float32)}


def relative_errors(out: jax.Array, ref: jax.Array) -> np.ndarray:
  """‖out - ref‖ / ‖ref‖ over the last axis, as float64 numpy (token axis second)."""
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  return np.linalg.norm(out - ref, axis=-1) / np.linalg.norm(ref, axis=-1)


def at_checkpoints(err: np.ndarray, checkpoints: Sequence[int]) -> list[tuple[float, float]]:
  """(max, mean) of err [B, T, ...] over the WINDOW tokens ending at each checkpoint step (1-based)."""
  return [(float(err[:, n - WINDOW:n].max()), float(err[:, n - WINDOW:n].mean())) for n in checkpoints]


# --- op level -----------------------------------------------------------------------------------------------------

def layer_qkv(layer: Based, x_BTE: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The layer's q, k [B, T, H, F] and v [B, T, H, D] in its compute dtype."""
  c = layer.config
  lead = x_BTE.shape[:-1]
  return (layer.q_proj(x_BTE).reshape(*lead, c.num_heads, c.feature_dim),
          layer.k_proj(x_BTE).reshape(*lead, c.num_heads, c.feature_dim),
          layer.v_proj(x_BTE).reshape(*lead, c.num_heads, c.head_dim))


@functools.partial(jax.jit, static_argnames=("round_state",))
def decode_outputs(q_BTHF, k_BTHF, v_BTHD, round_state):
  """y [B, T, H, D] of based_step token by token from the empty state, the state rounded after every step."""
  batch, _, heads, feature_dim = q_BTHF.shape
  state = BasedState.zeros(batch, heads, feature_dim, v_BTHD.shape[-1])

  def token_step(state, xs):
    y_BHD, state = reference.based_step(*xs, state)
    return round_state(state), y_BHD

  xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q_BTHF, k_BTHF, v_BTHD))
  _, y_TBHD = jax.lax.scan(token_step, state, xs)
  return jnp.moveaxis(y_TBHD, 0, 1)


def op_level(steps: int, batch: int, seed: int, checkpoints) -> dict[str, list[tuple[float, float]]]:
  with nnx.use_eager_sharding(False):  # logical axis names without a mesh: annotate, do not place
    layers = {name: Based(LAYER, dtype=dtype, rngs=nnx.Rngs(seed))  # same seed: the same float32 parameters
              for name, dtype in (("f32", jnp.float32), ("bf16", jnp.bfloat16))}
  x_BTE = jax.random.normal(jax.random.key(seed + 1), (batch, steps, LAYER.d_model), jnp.float32)
  qkv = {name: layer_qkv(layer, x_BTE) for name, layer in layers.items()}
  ref = reference.based_quadratic(*qkv["f32"])
  rows = {"bf16 parallel": at_checkpoints(relative_errors(reference.based_quadratic(*qkv["bf16"]), ref),
                                          checkpoints)}
  for inputs in ("f32", "bf16"):
    for name, round_state in VARIANTS.items():
      y = decode_outputs(*qkv[inputs], round_state)
      rows[f"{name} ({inputs} q, k, v)"] = at_checkpoints(relative_errors(y, ref), checkpoints)
  return rows


# --- model level --------------------------------------------------------------------------------------------------

def tiny_model(dtype: str, steps: int, seed: int) -> LM:
  config = ModelConfig(vocab_size=256, d_model=LAYER.d_model, num_layers=2, mixers="based",
                       mixer_options={"based": {"num_heads": LAYER.num_heads, "feature_dim": LAYER.feature_dim}},
                       mlp="swiglu", max_length=steps, dtype=dtype)
  return LM(config, rngs=nnx.Rngs(seed))


def round_based_states(cache, round_state):
  """The cache with every BasedState in it rounded (other mixers' caches untouched)."""
  return jax.tree.map(lambda x: round_state(x) if isinstance(x, BasedState) else x, cache,
                      is_leaf=lambda x: isinstance(x, BasedState))


@functools.partial(jax.jit, static_argnames=("graphdef", "round_state"))
def decode_logits(graphdef, params, tokens_BT, round_state):
  """logits [B, T, V] of LM.decode fed tokens_BT one per step from the empty cache (teacher forcing)."""
  model = nnx.merge(graphdef, params)
  batch, length = tokens_BT.shape

  def token_step(cache, tokens_B):
    logits_BV, cache = model.decode(tokens_B, cache)
    return round_based_states(cache, round_state), logits_BV

  _, logits_TBV = jax.lax.scan(token_step, model.init_cache(batch, length), tokens_BT.T)
  return jnp.moveaxis(logits_TBV, 0, 1)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def parallel_logits(graphdef, params, tokens_BT):
  with jax.default_matmul_precision("highest"):
    return nnx.merge(graphdef, params)(tokens_BT)


def model_level(steps: int, batch: int, seed: int, checkpoints) -> dict[str, list[tuple[float, float]]]:
  models = {name: nnx.split(tiny_model(dtype, steps, seed)) for name, dtype in (("f32", "float32"),
                                                                                 ("bf16", "bfloat16"))}
  same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), models["f32"][1], models["bf16"][1])
  assert all(jax.tree.leaves(same)), "the f32 and bf16 models must share parameters"
  tokens_BT = jax.random.randint(jax.random.key(seed + 1), (batch, steps), 0, 256, jnp.int32)
  ref = parallel_logits(*models["f32"], tokens_BT)
  rows = {"bf16 parallel": at_checkpoints(relative_errors(parallel_logits(*models["bf16"], tokens_BT), ref),
                                          checkpoints)}
  for compute in ("f32", "bf16"):
    for name, round_state in VARIANTS.items():
      logits = decode_logits(*models[compute], tokens_BT, round_state)
      rows[f"{name} ({compute} model)"] = at_checkpoints(relative_errors(logits, ref), checkpoints)
  return rows


# --- report -------------------------------------------------------------------------------------------------------

def format_table(rows: dict[str, list[tuple[float, float]]], checkpoints) -> str:
  lines = ["| variant | " + " | ".join(f"step {n}" for n in checkpoints) + " |",
           "|---|" + "---:|" * len(checkpoints)]
  for name, cells in rows.items():
    lines.append(f"| {name} | " + " | ".join(f"{hi:.2e} / {mean:.2e}" for hi, mean in cells) + " |")
  return "\n".join(lines)


def verdict(rows: dict[str, list[tuple[float, float]]]) -> str:
  """Whether each bf16-state row stays within the bf16 parallel forward's error (max and mean) at every step."""
  bound = rows["bf16 parallel"]
  out = []
  for name, cells in rows.items():
    if name.startswith("bf16 state"):
      within = all(hi <= b_hi and mean <= b_mean for (hi, mean), (b_hi, b_mean) in zip(cells, bound))
      out.append(f"  {name}: {'within' if within else 'NOT within'} the bf16 parallel forward's error")
  return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.based_state_dtype", description=__doc__.splitlines()[0])
  parser.add_argument("--levels", nargs="+", choices=("op", "model"), default=["op", "model"])
  parser.add_argument("--steps", type=int, default=4096)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  if args.steps < WINDOW:
    parser.error(f"--steps must be at least {WINDOW}, got {args.steps}")
  checkpoints = tuple(n for n in CHECKPOINTS if WINDOW <= n <= args.steps) or (args.steps,)
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()}); relative error "
        f"max / mean over the {WINDOW} tokens ending at each step, batch {args.batch}, seed {args.seed}")
  for level in args.levels:
    start = time.perf_counter()
    rows = (op_level if level == "op" else model_level)(args.steps, args.batch, args.seed, checkpoints)
    what = "y per head vs based_quadratic (f32)" if level == "op" else "logits vs the f32 parallel forward"
    print(f"\n{level} level: {what} ({time.perf_counter() - start:.0f} s)\n")
    print(format_table(rows, checkpoints))
    print(verdict(rows))
  return 0


if __name__ == "__main__":
  sys.exit(main())
