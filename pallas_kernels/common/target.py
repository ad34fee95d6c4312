"""Where a portable kernel runs: interpret mode on CPU, Triton on GPU, Mosaic on TPU, and what follows from it."""

from __future__ import annotations

import dataclasses

import jax
from jax.experimental import pallas as pl

from pallas_kernels.common.layout import Layout


@dataclasses.dataclass(frozen=True)
class Target:
  backend: str  # jax.default_backend(): "cpu", "gpu" or "tpu"
  interpret: bool

  @classmethod
  def current(cls, interpret: bool | None = None) -> "Target":
    backend = jax.default_backend()
    return cls(backend, backend == "cpu" if interpret is None else interpret)

  @property
  def triton(self) -> bool:
    return self.backend == "gpu" and not self.interpret

  @property
  def mosaic_tpu(self) -> bool:
    return self.backend == "tpu" and not self.interpret

  @property
  def layout(self) -> Layout:
    return Layout(heads_major=self.mosaic_tpu)

  def padded_dim(self, dim: int) -> int:
    """Triton tiles (and so interpret mode, which stands in for it in CI) need power-of-two sizes >= 16."""
    return dim if self.mosaic_tpu else max(16, pl.next_power_of_2(dim))

  def pallas_call(self, kernel, *, num_warps: int = 4, num_stages: int = 2, **kwargs):
    if self.triton:
      from jax.experimental.pallas import triton as pltriton  # importable only where Triton lowering exists
      kwargs["compiler_params"] = pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    return pl.pallas_call(kernel, interpret=self.interpret, **kwargs)
