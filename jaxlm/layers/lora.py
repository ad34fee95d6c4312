"""Low-rank adapters (LoRA, Hu et al. 2021) around dense linear maps, and their merge back into the weights.

  y = x W + b + (α / r) · (x A) B,   A [I, R] (uniform ±1/√I, as peft's kaiming init), B [R, O] zeros

so an adapted layer starts equal to its base. Only A and B train (`is_lora_param` selects them); `merge_lora`
folds (α / r)·A B into W and puts the base layer back, so a merged model has the parameters (names and shapes) of
the model before `add_lora` and costs nothing extra to run.

A wrapper keeps the leading axes of its base kernel: around a stacked layer (jaxlm/models/lm.py builds runs of
identical layers with a leading "layers" axis on every parameter) A and B get the same leading axis, and the
layer scan slices them with the rest. Written here rather than taken from a library: the flax-native LoRA
(`nnx.LoRA`/`nnx.LoRALinear`) builds a new linear layer instead of wrapping the pretrained one, has no merge, and
knows nothing of stacked layers; it would be more code around it than this file.

Letters: I input width, O output width, R rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

LORA_PARAMS = ("lora_a_IR", "lora_b_RO")


class LoRALinear(nnx.Module):
  """`base` (an nnx.Linear, stacked or not) plus a trainable rank-`rank` update scaled by alpha / rank."""

  def __init__(self, base: nnx.Linear, *, rank: int, alpha: float, rngs: nnx.Rngs):
    if not isinstance(base, nnx.Linear):
      raise ValueError(f"LoRA wraps dense layers (nnx.Linear), got {type(base).__name__}")
    if not isinstance(rank, int) or rank < 1:
      raise ValueError(f"rank={rank!r} must be a positive integer")
    self.base = base
    self.scale = float(alpha) / rank
    kernel = base.kernel[...]
    *lead, width_in, width_out = kernel.shape
    bound = 1.0 / width_in ** 0.5
    self.lora_a_IR = nnx.Param(jax.random.uniform(rngs.params(), (*lead, width_in, rank), kernel.dtype,
                                                  -bound, bound))
    self.lora_b_RO = nnx.Param(jnp.zeros((*lead, rank, width_out), kernel.dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.base(x)
    a, b = self.lora_a_IR[...].astype(y.dtype), self.lora_b_RO[...].astype(y.dtype)
    return y + (self.scale * ((x.astype(y.dtype) @ a) @ b)).astype(y.dtype)

  def merged(self) -> nnx.Linear:
    """The base layer with W + (α / r)·A B as its kernel (computed in float32, stored in W's dtype)."""
    kernel = self.base.kernel[...]
    update = self.scale * jnp.matmul(self.lora_a_IR[...].astype(jnp.float32), self.lora_b_RO[...].astype(jnp.float32))
    self.base.kernel[...] = (kernel.astype(jnp.float32) + update).astype(kernel.dtype)
    return self.base


def is_lora_param(path: Sequence[Any], _variable: Any) -> bool:
  """nnx filter: the adapters' A and B."""
  return bool(path) and path[-1] in LORA_PARAMS


def _mixers(model: nnx.Module):
  for stack in model.stacks:
    yield stack.blocks.mixer


def add_lora(model: nnx.Module, targets: Sequence[str], *, rank: int, alpha: float, rngs: nnx.Rngs) -> int:
  """Wraps the projections named `targets` (e.g. q_proj, k_proj, v_proj, out_proj) of every layer's mixer of a
  jaxlm LM in place; returns how many (stacked) projections were wrapped. ValueError naming a target that a
  mixer lacks."""
  wrapped = 0
  for mixer in _mixers(model):
    for name in targets:
      base = getattr(mixer, name, None)
      if base is None:
        raise ValueError(f"lora target {name!r}: mixer {type(mixer).__name__} has no such projection")
      if isinstance(base, LoRALinear):
        raise ValueError(f"lora target {name!r} already has an adapter")
      setattr(mixer, name, LoRALinear(base, rank=rank, alpha=alpha, rngs=rngs))
      wrapped += 1
  return wrapped


def merge_lora(model: nnx.Module) -> int:
  """Folds every adapter of `model` into its base kernel in place (module docstring); returns how many."""
  merged = 0
  for mixer in _mixers(model):
    for name, value in list(vars(mixer).items()):
      if isinstance(value, LoRALinear):
        setattr(mixer, name, value.merged())
        merged += 1
  return merged
