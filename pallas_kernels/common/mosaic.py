"""What the Mosaic GPU (sm90) kernels share: the chip's budgets, the warp-specialised launch, the TMA ring
producer, and the small helpers that broadcast vectors across wgmma tiles.

Every Hopper kernel here runs three warpgroups per CTA: two consumers that own WG_ROWS rows each (the wgmma M) and
compute, and one producer that TMA-loads the streamed tiles; registers move from the producer to the consumers.
A kernel file holds its schedule (what each consumer computes, which tiles stream, the shared-memory layout) and
calls `launch`, `warp_specialized` and `produce_ring` for the rest.

The ring protocol (`produce_ring`): step j of [lo, hi) lands in slot (j - lo) % num_stages; each stream's copy
completes that slot's `ready` barrier; a slot is refilled only after its `free` barrier completes (one arrival per
consumer), and after the loop the producer awaits the last releases too, so that every barrier phase is observed
before the CTA exits. A persistent kernel keeps one ring over its tiles: each tile's steps continue the slot
count (`offset`) and only the last tile drains.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

SMEM_BYTES = 232_448  # opt-in shared memory per block on sm90
SMEM_RESERVED = 4096  # Mosaic's reduction scratch, the barriers, alignment (about 2.7 KiB measured)
SMEM_USABLE = SMEM_BYTES - SMEM_RESERVED
CONSUMERS = 2  # warpgroups that compute; one more loads
WG_ROWS = 64  # wgmma M: the rows each consumer owns
CTA_ROWS = CONSUMERS * WG_ROWS  # the rows a CTA owns
CONSUMER_REGISTERS = 232  # 2·128·232 + 128·40 <= 65536 registers per SM
PRODUCER_REGISTERS = 40
DTYPES = (jnp.bfloat16, jnp.float16)  # wgmma's 16-bit operand types


def is_16bit(dtype) -> bool:
  return dtype is not None and jnp.dtype(dtype) in tuple(map(jnp.dtype, DTYPES))


def is_sm90() -> bool:
  return str(getattr(jax.devices()[0], "compute_capability", "")).split(".")[0] == "9"


def check_ring(blocks, need: int, detail: str = "") -> None:
  """Raises ValueError when `blocks` (block sizes with a `num_stages`-deep shared-memory ring) cannot overlap loads
  with compute or need more shared memory than a block may use."""
  if blocks.num_stages < 2:
    raise ValueError(f"{blocks.num_stages=} must be at least 2 for loads to overlap compute")
  if need > SMEM_USABLE:
    raise ValueError(f"{blocks} needs {need} bytes of shared memory{detail}; the limit is {SMEM_BYTES}")


def swizzled(swizzle: int, itemsize: int = 2):
  """SMEM transforms of a tile that wgmma reads: `swizzle`-byte swizzling over (8, swizzle / itemsize) tiles.
  Rows of 32 or 64 bytes take that swizzle, wider ones 128; wgmma wants both shared operands of one product to
  share a swizzle."""
  return plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle)


def rows(x, shape):
  """A per-row vector broadcast across the columns of a wgmma tile."""
  return lax.broadcast_in_dim(x, shape, [0])


def cols(x, shape):
  """A per-column vector broadcast across the rows of a wgmma tile."""
  return lax.broadcast_in_dim(x, shape, [1])


def sync(barrier):
  """Arrives on `barrier` and waits for it: every consumer (one arrival each) has reached this point."""
  plgpu.barrier_arrive(barrier)
  plgpu.barrier_wait(barrier)


_INTERPRET = contextvars.ContextVar("mosaic_interpret", default=None)


def interpreter_available() -> bool:
  """Whether this jax has Mosaic GPU's interpreter (jax 0.10.2 has it under jax._src, no public name yet)."""
  try:
    return importlib.util.find_spec("jax._src.pallas.mosaic_gpu.interpret.params") is not None
  except ImportError:  # a parent package missing
    return False


@contextlib.contextmanager
def interpreted() -> Iterator[None]:
  """Kernels launched inside run on the CPU in Mosaic GPU's interpreter: shared memory, barriers, TMA copies and
  wgmma simulated, one warpgroup at a time, so a kernel's body is checked on CPU (tests; slow, tiny shapes). The
  interpreter does not yet take every primitive (2026-12: not `plgpu.load` with a layout, nor accumulators made
  from values); tests/pallas_kernels/mosaic_interpreter.py fills those gaps for tests."""
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
  token = _INTERPRET.set(InterpretGPUParams())
  try:
    yield
  finally:
    _INTERPRET.reset(token)


def launch(body: Callable[..., None], *args, name: str, out_type, scratch, grid: dict[str, int],
           approx_math: bool = True):
  """Runs body(*input refs, *output refs, scratch) on CONSUMERS + 1 warpgroups (axis "wg") per CTA of `grid` (axis
  name -> size); `name` is the kernel's name in profiles. approx_math: fast approximate exp2/tanh/division.
  Inside `interpreted()` the kernel runs in the interpreter instead."""

  def kernel(*refs):
    body(*refs)

  kernel.__name__ = name
  return plgpu.kernel(
      kernel, out_type=out_type, scratch_types=[scratch], grid=tuple(grid.values()), grid_names=tuple(grid),
      num_threads=CONSUMERS + 1, thread_name="wg", compiler_params=plgpu.CompilerParams(approx_math=approx_math),
      **interpret_kwargs())(*args)


def interpret_kwargs() -> dict[str, Any]:
  """plgpu.kernel's `interpret=` inside `interpreted()`, nothing outside: for kernels launched without `launch`."""
  return {} if _INTERPRET.get() is None else {"interpret": _INTERPRET.get()}


def ref_union(*members):
  """plgpu.RefUnion(*members): scratch whose members share one shared-memory range, for phases that never overlap.
  Inside `interpreted()` the members get ranges of their own: jax 0.10.2's interpreter cannot read or write through
  a union's aliased views ('Unsupported transform: ExtractAliasedRef'), and a kernel that uses a union passes no
  data from one member to another, so apart they compute the same."""
  return members if _INTERPRET.get() is not None else plgpu.RefUnion(*members)


def warp_specialized(produce: Callable[[], None], consume: Callable[[Any], None], *,
                     static_consumers: bool = False):
  """Runs produce() on warpgroup CONSUMERS and consume(wg) on warpgroups 0 .. CONSUMERS-1, with registers moved
  to the latter. static_consumers: consume(w) is traced once per consumer with w a Python int (for schedules in
  which the consumers own different static work); otherwise wg is the traced warpgroup index."""
  wg = lax.axis_index("wg")

  @pl.when(wg == CONSUMERS)
  def _():
    plgpu.set_max_registers(PRODUCER_REGISTERS, action="decrease")
    produce()

  if static_consumers:
    for w in range(CONSUMERS):
      @pl.when(wg == w)
      def _():
        plgpu.set_max_registers(CONSUMER_REGISTERS, action="increase")
        consume(w)
    return

  @pl.when(wg < CONSUMERS)
  def _():
    plgpu.set_max_registers(CONSUMER_REGISTERS, action="increase")
    consume(wg)


class Stream(NamedTuple):
  """One tensor streamed through a ring: where step j comes from, its slots, and their `ready` barriers."""
  source: Callable[[Any], Any]  # j -> the gmem ref view of step j
  slots: Any  # smem [num_stages, ...]
  ready: Any  # barriers [num_stages]


def produce_ring(lo, hi, stages: int, groups: Sequence[tuple[Any, Sequence[Stream]]], *, offset=0,
                 drain: bool = True):
  """The producer's loop: TMA-loads steps [lo, hi) of every stream into slot (offset + j - lo) % stages. groups:
  (free barriers [stages], streams) pairs; a group's streams refill a slot once its `free` barrier has completed,
  so that streams freed at different times (K before V) load as early as they may. Static bounds stay static.
  offset: the steps this ring carried before (a persistent kernel's earlier tiles); drain=False leaves the last
  releases to `drain_ring`, once the ring's last tile is loaded."""
  slot = lambda j: lax.rem(offset + j - lo, stages)

  def load(j, carry):
    for free, streams in groups:
      pl.when(offset + j - lo >= stages)(functools.partial(plgpu.barrier_wait, free.at[slot(j)]))
      for stream in streams:
        plgpu.copy_gmem_to_smem(stream.source(j), stream.slots.at[slot(j)], stream.ready.at[slot(j)])
    return carry

  lax.fori_loop(lo, hi, load, None)
  if drain:
    drain_ring(offset + hi - lo, stages, [free for free, _ in groups])


def drain_ring(count, stages: int, frees: Sequence[Any]):
  """Awaits the last releases of a ring that carried `count` steps (step g in slot g % stages), so that every
  phase of its free barriers is observed before the CTA exits."""
  def drain(g, carry):
    for free in frees:
      plgpu.barrier_wait(free.at[lax.rem(g, stages)])
    return carry

  lax.fori_loop(max(0, count - stages) if isinstance(count, int) else jnp.maximum(0, count - stages), count,
                drain, None)
