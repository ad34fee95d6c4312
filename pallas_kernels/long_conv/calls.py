"""How the long_conv kernels are called, shared by the one-pass (pallas.py) and three-pass (split.py) kernels: a
call's static configuration (`Call`), kernel arguments by name (a wrapper lists (name, array, BlockSpec) rows for
the inputs the call has, leaving out the optional ones it lacks; the kernel reads its refs back by name), and the
on-chip transform's tables as refs.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.common.matmul import dot, exact_precision
from pallas_kernels.common.target import Target
from pallas_kernels.long_conv.dft import Complex, Factors, Tables


@dataclasses.dataclass(frozen=True)
class Call:
  """One call's static configuration (hashable: custom_vjp's non-differentiable argument)."""
  factors: Factors
  operand_dtype: Any  # matmul operands: the inputs' dtype (float32 for float32 inputs)
  blocks: Any  # pallas.BlockSizes
  target: Target
  debug: bool = False  # pallas_call prints the kernels' jaxprs

  def mm(self, a: jax.Array, b: jax.Array) -> jax.Array:
    """a @ b with float32 accumulation (IEEE float32 products for float32 operands)."""
    precision = exact_precision(self.operand_dtype)
    return dot(a.astype(self.operand_dtype), b.astype(self.operand_dtype), precision)

  def run(self, kernel, grid, inputs, outputs, name: str, **static) -> dict[str, jax.Array]:
    """pallas_call of kernel(*refs, call=self, names=..., **static) on the (name, array, spec) input rows (rows
    whose array is None are left out) and (name, shape, spec) output rows; returns the outputs by name."""
    inputs = [row for row in inputs if row[1] is not None]
    names = tuple(n for n, _, _ in inputs) + tuple(n for n, _, _ in outputs)
    results = self.target.pallas_call(
        functools.partial(kernel, call=self, names=names, **static), num_warps=self.blocks.num_warps,
        num_stages=self.blocks.num_stages, grid=grid, in_specs=[s for _, _, s in inputs],
        out_specs=[s for _, _, s in outputs], out_shape=[shape for _, shape, _ in outputs],
        name=name, debug=self.debug)(*[a for _, a, _ in inputs])
    return dict(zip((n for n, _, _ in outputs), results, strict=True))


def named_refs(names: tuple[str, ...], refs) -> dict[str, Any]:
  return dict(zip(names, refs, strict=True))


def load(refs: dict[str, Any], name: str, index=None) -> jax.Array | None:
  """refs[name] (its row `index`) in float32, or None where the call has no such input."""
  ref = refs.get(name)
  if ref is None:
    return None
  return (ref[...] if index is None else ref[index]).astype(jnp.float32)


def whole(array: jax.Array) -> pl.BlockSpec:
  """The whole array in every program, for a grid of any rank."""
  return pl.BlockSpec(array.shape, lambda *_, n=array.ndim: (0,) * n)


def inner_table_rows(t: Tables) -> list[tuple[str, jax.Array, pl.BlockSpec]]:
  return [(name, table, whole(table)) for name, table in (("f2", t.f2), ("tw", t.tw), ("f3", t.f3))]


def inner_tables(refs, *, rows_in: int | None = None, rows_out: int | None = None):
  """(F_P[:, :rows_in], F_P[:rows_out], twiddles, F_Q) from the table refs, sliced at the ref (Triton slices no
  values); None rows: all of F_P."""
  fp = refs["f2"]
  cols_in = slice(None) if rows_in is None else pl.ds(0, rows_in)
  rows_cut = slice(None) if rows_out is None else pl.ds(0, rows_out)
  f2_in = Complex(fp[0, :, cols_in], fp[1, :, cols_in])
  f2_out = Complex(fp[0, rows_cut, :], fp[1, rows_cut, :])
  return f2_in, f2_out, Complex(refs["tw"][0], refs["tw"][1]), Complex(refs["f3"][0], refs["f3"][1])


def spectrum_ref(ref) -> Complex:
  """A [2, ...] (re, im) ref's parts."""
  return Complex(ref[0], ref[1])
