"""Matrix products inside kernels, float32-accumulated, written so Triton, Mosaic TPU and interpret mode all
lower them (no transposed operands materialised: the contraction dims say it)."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def exact_precision(dtype):
  """float32 operands get IEEE float32 products (Triton's default would be TF32, ~1e-3 relative error);
  16-bit operands are exact in the tensor cores anyway."""
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def dot(a, b, precision=None):
  """a @ b."""
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)


def dot_nt(a, b, precision=None):
  """a @ b.T."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)


def dot_tn(a, b, precision=None):
  """a.T @ b."""
  return lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)


# A kernel's products as its static spec fixes them: operands cast to `spec.operand_dtype` (the inputs' dtype: 16-bit
# at tensor-core rate), `spec.precision` (exact_precision), float32 accumulation.
def mm(spec, a, b):
  """a @ b."""
  return dot(a.astype(spec.operand_dtype), b.astype(spec.operand_dtype), spec.precision)


def mm_nt(spec, a, b):
  """a @ b.T."""
  return dot_nt(a.astype(spec.operand_dtype), b.astype(spec.operand_dtype), spec.precision)


def mm_tn(spec, a, b):
  """a.T @ b."""
  return dot_tn(a.astype(spec.operand_dtype), b.astype(spec.operand_dtype), spec.precision)
