"""Opt-in XLA flags that overlap the mesh's collectives with compute on GPU (`python -m train --overlap`).

FSDP gathers each layer's weights before its matmuls and reduce-scatters its gradients after them; by default XLA
may run those collectives between the matmuls instead of beside them. These flags ask the GPU compiler to schedule
them asynchronously behind compute (the latency-hiding scheduler), to start the next scanned layer's gathers and
the previous layer's reductions one loop iteration early (pipelined collectives, double-buffered while loops),
to reduce accumulated gradients after the micro-batch loop rather than in it, and to batch small collectives into
fewer large ones. They are the set public JAX GPU stacks recommend for FSDP.

Opt-in and untimed here: issue 21 measures them on the multi-GPU machines. Every flag below exists in jaxlib
0.10.2's XLA; a jaxlib that dropped one refuses to start ("Unknown flags in XLA_FLAGS"), which names it. XLA
reads XLA_FLAGS when the first backend starts, so `apply` must run before that.
"""

from __future__ import annotations

import os

COMBINE_BYTES = 128 * 1024 * 1024  # fuse collectives up to this size: fewer, larger transfers

GPU_FLAGS: tuple[str, ...] = (
  "--xla_gpu_enable_latency_hiding_scheduler=true",
  "--xla_gpu_enable_pipelined_all_gather=true",
  "--xla_gpu_enable_pipelined_reduce_scatter=true",
  "--xla_gpu_enable_pipelined_all_reduce=true",
  "--xla_gpu_enable_while_loop_double_buffering=true",
  # Gradient accumulation: the micro-batch scan's body reduce-scatters each micro-batch's gradients (seen in the
  # compiled CPU program); this lets XLA hoist the reduce-scatter out of the loop, once per step.
  "--xla_gpu_enable_while_loop_reduce_scatter_code_motion=true",
  f"--xla_gpu_all_gather_combine_threshold_bytes={COMBINE_BYTES}",
  f"--xla_gpu_reduce_scatter_combine_threshold_bytes={COMBINE_BYTES}",
  f"--xla_gpu_all_reduce_combine_threshold_bytes={COMBINE_BYTES}",
)


def with_overlap_flags(xla_flags: str) -> str:
  """`xla_flags` plus every GPU_FLAGS entry whose flag it does not already set (a flag set by hand wins)."""
  present = {f.split("=", 1)[0] for f in xla_flags.split()}
  extra = [f for f in GPU_FLAGS if f.split("=", 1)[0] not in present]
  return " ".join([*xla_flags.split(), *extra])


def apply(environ: dict | None = None) -> str:
  """Adds the overlap flags to XLA_FLAGS (os.environ by default) and returns the new value."""
  environ = os.environ if environ is None else environ
  environ["XLA_FLAGS"] = with_overlap_flags(environ.get("XLA_FLAGS", ""))
  return environ["XLA_FLAGS"]
