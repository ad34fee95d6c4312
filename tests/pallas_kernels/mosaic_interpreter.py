"""Mosaic GPU's interpreter (jax 0.10.2, under jax._src) with three of its gaps filled, for tests only.

`mosaic.interpreted()` runs a Hopper kernel's body on the CPU. The interpreter of jax 0.10.2 does not take three
things our kernels use: `plgpu.load` with a layout, `layout_cast`, and an accumulator written from a value
(`acc[...] = x`); and its wgmma reads its A operand from shared memory only, where ours may hold it in registers.
On the CPU a layout is only a promise about registers, so here a layout load is a plain read, a layout cast is
the value itself, and the other two are done on the interpreter's simulated memory, each threaded on the
interpreter's token so that it stays ordered with the reads and writes around it. This leans on jax internals:
`available()` says whether this jax has them, and tests skip otherwise.

Transposed shared-memory operands (`plgpu.transpose_ref`, a K tile read as wgmma's B) are read through their
transforms here, so the wgmma is ours for every operand kind. It runs the long_conv Hopper forward, the Hopper
attention forward and both backward kernels, and the BASED Hopper kernels (chunked forward and backward, parallel
forward and backward). Two things it needs from outside this file: scratch unions made by `mosaic.ref_union`
(members apart here), and XLA's CPU pool larger than the number of warpgroups blocked at once (tests/conftest.py
sets PJRT_NPROC): with one thread per core a warpgroup could wait for a thread forever. One rule of the GPU's compiler
that jax 0.10.2 does not enforce is enforced here (`_strided_view`): a shared-memory read or write through a view
whose innermost stride is not 1 raises, as jax 0.11.2 refuses it at compile time. (The BASED hang noted
here before: a write through a union's view raised in consumer 1, and the others waited for it at a barrier.)
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.common import mosaic


def available() -> bool:
  if not mosaic.interpreter_available():
    return False
  try:
    from jax._src.pallas.mosaic_gpu.interpret import jaxpr_interpret
  except ImportError:
    return False
  return hasattr(jaxpr_interpret.JaxprInterpreter, "_interpret_wgmma_ref_p")


def _on_cpu() -> bool:
  return available() and jax.default_backend() == "cpu"


# The mark of a test that runs a kernel's body here: on CPU only (on a GPU the kernels themselves are tested).
on_cpu = pytest.mark.skipif(not _on_cpu(), reason="the interpreter on CPU (jax 0.10.2 has it); on a GPU the "
                                                   "kernels themselves are tested")


def _gap_eqn(eqn):
  """An equation the interpreter takes in place of one it does not (or the equation itself)."""
  from jax._src.lax import lax as lax_internal
  from jax._src.pallas.mosaic_gpu import core as gpu_core
  from jax._src.pallas.mosaic_gpu import primitives as gpu_primitives
  from jax._src.state import primitives as state_primitives

  if eqn.primitive is gpu_primitives.load_p:
    return eqn.replace(primitive=state_primitives.get_p,
                       params={k: v for k, v in eqn.params.items() if k != "optimized"})
  if eqn.primitive is gpu_core.layout_cast_p:
    return eqn.replace(primitive=lax_internal.copy_p, params={})
  if eqn.primitive is gpu_primitives.wgmma_accumulator_store_p:
    return eqn.replace(primitive=gpu_primitives.wgmma_ref_p, params={"accumulator_store": True})
  return eqn


def _strided_view(eqn) -> str | None:
  """Why a shared-memory read or write of this equation goes through a view whose innermost stride is not 1, or
  None. jax 0.11.2's Mosaic GPU layout inference refuses such views at compile time ("We cannot apply swizzle to
  non-contiguous refs", swizzled or not: the long_conv Hopper forward's first GPU run, 2026-12-07), while jax
  0.10.2 lowers and interprets them; so the interpreter refuses them too. Only views made of plain indexers are
  judged (a column c of a [.., N, C] buffer, or a strided slice of its last axis, is the case that failed)."""
  from jax._src.pallas.mosaic_gpu import primitives as gpu_primitives
  from jax._src.state import indexing
  from jax._src.state import primitives as state_primitives

  if eqn.primitive in (gpu_primitives.load_p, state_primitives.get_p):
    ref, leaves = eqn.invars[0], eqn.invars[1:]
  elif eqn.primitive is state_primitives.swap_p:
    ref, leaves = eqn.invars[0], eqn.invars[2:]
  else:
    return None
  if "smem" not in str(getattr(ref.aval, "memory_space", "")).lower():
    return None
  transforms = eqn.params["tree"].unflatten(leaves)
  if not all(isinstance(t, indexing.NDIndexer) for t in transforms):
    return None
  for t in transforms:
    last, size = t.indices[-1], t.shape[-1]
    if size > 1 and not isinstance(last, indexing.Slice):
      return f"a scalar index on the innermost axis (size {size}) of a {t.shape} shared-memory view"
    if isinstance(last, indexing.Slice) and last.stride != 1 and last.size > 1:
      return f"a stride-{last.stride} slice of the innermost axis of a {t.shape} shared-memory view"
  return None


def _memory(device_id, grid_point_coords, thread_id):
  """(simulated memory, the thread's global id, logging info) for a callback."""
  from jax._src.pallas.mosaic.interpret import utils
  from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks

  memory = gpu_callbacks._get_shared_memory()
  info = utils.GPULoggingInfo(device_id=int(device_id), grid_point_coords=tuple(int(x) for x in grid_point_coords),
                              thread_id=int(thread_id), source_info=None)
  return memory, memory.get_global_thread_id(int(device_id), int(thread_id)), info


def _store(token, device_id, grid_point_coords, thread_id, acc_key, value):
  from jax._src.pallas.mosaic.interpret import utils
  from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks

  memory, thread, info = _memory(device_id, grid_point_coords, thread_id)
  memory.store_buffer_content(gpu_callbacks.HostAllocationKey.from_array(acc_key), utils.to_range(()),
                              np.asarray(value), thread, logging_info=info)
  return token


def _read(memory, key, transforms, thread, info) -> np.ndarray:
  """A buffer's view through its transforms: indexers up to the first transpose as the interpreter reads them,
  the rest (transposes, e.g. a K tile read transposed as a wgmma B operand) applied in numpy."""
  from jax._src.pallas.mosaic.interpret import utils
  from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
  from jax._src.state.types import TransposeTransform

  transforms = gpu_callbacks._remove_noop_transforms(transforms)
  first = next((i for i, t in enumerate(transforms) if isinstance(t, TransposeTransform)), len(transforms))
  value, _, _ = memory.get_buffer_content(gpu_callbacks.HostAllocationKey.from_array(key),
                                          utils.to_range(jax.tree.map(int, transforms[:first])), thread,
                                          logging_info=info)
  for t in transforms[first:]:
    value = (np.transpose(value, t.permutation) if isinstance(t, TransposeTransform)
             else value[utils.to_range((jax.tree.map(int, t),))])
  return value


def _wgmma(token, device_id, grid_point_coords, thread_id, acc_key, a, a_transforms, b_key, b_transforms, *,
           acc_dtype, a_in_registers: bool):
  """acc += a @ b on the simulated memory, a a value (registers) or a buffer key, b a buffer key."""
  from jax._src.pallas.mosaic.interpret import utils
  from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks

  memory, thread, info = _memory(device_id, grid_point_coords, thread_id)
  a = np.asarray(a) if a_in_registers else _read(memory, a, a_transforms, thread, info)
  b = _read(memory, b_key, b_transforms, thread, info)
  acc_key = gpu_callbacks.HostAllocationKey.from_array(acc_key)
  acc, _, _ = memory.get_buffer_content(acc_key, utils.to_range(()), thread, logging_info=info)
  memory.store_buffer_content(acc_key, utils.to_range(()), acc + np.matmul(a, b, dtype=acc_dtype), thread,
                              logging_info=info)
  return token


@contextlib.contextmanager
def interpreted() -> Iterator[None]:
  """mosaic.interpreted() with the gaps above filled."""
  from jax._src import callback
  from jax._src import core as jax_core
  from jax._src.pallas.mosaic_gpu import core as gpu_core
  from jax._src.pallas.mosaic_gpu import primitives as gpu_primitives
  from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
  from jax._src.pallas.mosaic_gpu.interpret import jaxpr_interpret

  interpreter = jaxpr_interpret.JaxprInterpreter
  original_interpret, original_wgmma = interpreter.interpret, interpreter._interpret_wgmma_ref_p
  gaps = (gpu_primitives.load_p, gpu_core.layout_cast_p, gpu_primitives.wgmma_accumulator_store_p)

  def interpret(self, jaxpr, token, *args):
    from jax._src import source_info_util
    for e in jaxpr.eqns:
      if (why := _strided_view(e)) is not None:
        raise ValueError(f"{e.primitive} through {why}: Mosaic GPU (jax 0.11.2) refuses views whose innermost "
                         f"stride is not 1 (at {source_info_util.summarize(e.source_info)})")
    if any(e.primitive in gaps for e in jaxpr.eqns):
      jaxpr = jaxpr.replace(eqns=[_gap_eqn(e) for e in jaxpr.eqns])
    return original_interpret(self, jaxpr, token, *args)

  def wgmma(self, eqn, token, get_invals):
    where = (jnp.int32(self.device_info.device_id), self.grid_point_coords, self.thread_id)
    if eqn.params.get("accumulator_store"):
      acc, value = get_invals()
      return callback.io_callback(_store, gpu_callbacks.TOKEN_SHAPE_DTYPE, token, *where, acc, value), [value]
    acc, a, b, *leaves = get_invals()
    empty = jax.tree.structure([])
    trees = [eqn.params[f"{x}_transforms_tree"] or empty for x in ("acc", "a", "b")]
    _, a_transforms, b_transforms = jax.tree.unflatten(jax.tree_util.treedef_tuple(trees), leaves)
    run = functools.partial(_wgmma, acc_dtype=eqn.invars[0].aval.dtype,
                            a_in_registers=isinstance(eqn.invars[1].aval, jax_core.ShapedArray))
    return callback.io_callback(run, gpu_callbacks.TOKEN_SHAPE_DTYPE, token, *where, acc, a, a_transforms, b,
                                b_transforms), []

  interpreter.interpret, interpreter._interpret_wgmma_ref_p = interpret, wgmma
  try:
    with mosaic.interpreted():
      yield
  finally:
    interpreter.interpret, interpreter._interpret_wgmma_ref_p = original_interpret, original_wgmma
