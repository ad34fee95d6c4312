"""What the Mosaic GPU (sm90) kernels share: the chip's budgets, the producer/consumer warpgroup split, and the
small helpers that broadcast vectors across wgmma tiles.

Every Hopper kernel here runs three warpgroups per CTA: two consumers that own WG_ROWS rows each (the wgmma M) and
compute, and one producer that TMA-loads the streamed tiles; registers move from the producer to the consumers.
"""

from __future__ import annotations

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


def cdiv(x, d: int):
  """Ceiling division of a traced int."""
  return lax.div(x + (d - 1), d)


def rows(x, shape):
  """A per-row vector broadcast across the columns of a wgmma tile."""
  return lax.broadcast_in_dim(x, shape, [0])


def cols(x, shape):
  """A per-column vector broadcast across the rows of a wgmma tile."""
  return lax.broadcast_in_dim(x, shape, [1])


def warp_specialized(produce, consume):
  """Runs produce() on warpgroup CONSUMERS and consume(wg) on warpgroups 0 .. CONSUMERS-1, with registers moved
  to the latter."""
  wg = lax.axis_index("wg")

  @pl.when(wg == CONSUMERS)
  def _():
    plgpu.set_max_registers(PRODUCER_REGISTERS, action="decrease")
    produce()

  @pl.when(wg < CONSUMERS)
  def _():
    plgpu.set_max_registers(CONSUMER_REGISTERS, action="increase")
    consume(wg)
