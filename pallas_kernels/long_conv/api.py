"""The public long convolution: validation, then `implementation=` dispatch.

Letters: B batch, L length, D channels.

  long_conv(u, k) = out_gate ⊙ causal_conv(in_gate ⊙ u, k) + skip ⊙ u,   causal_conv(x, k)[t] = Σ_{s<=t} k[t-s]·x[s]

per channel, with u, gates [B, L, D], filter k [L, D] (from s4d_kernel, shift_ssm_kernel or hyena_filter) and
skip [D]. Implementations in auto's order: "pallas" (pallas.py and split.py: the FFT as matrix products with the
gates, the filter product and the skip fused, FlashFFTConv's algorithm; auto takes it on GPU and TPU), "reference"
(XLA's FFT) and "direct" (the O(L²) Toeplitz product, taken only by name, to cross-check them). `block_sizes=`
tunes the kernel (pallas.BlockSizes).
"""

from __future__ import annotations

import functools

import jax

from pallas_kernels.common import validation
from pallas_kernels.common.dispatch import Dispatcher, Implementation
from pallas_kernels.long_conv import hopper, pallas, reference

DISPATCHER = Dispatcher("long_conv", (
    # By name only (fail-closed): on the H100 (2026-12-07, 1d616d0) its GPU tests passed in bf16 and failed in
    # float32 at L 2048 and 65536 (Triton asked for more shared memory than the card has, at 16 channels per
    # program; the defaults take 2-4 since, untested there), and its best forward ran 1.6-2.2x slower than XLA's
    # FFT (docs/benchmarks.md); TPU is export-checked only. Auto should take it where it passes and wins:
    # in_auto=True, auto_backends=("gpu", "tpu").
    Implementation("pallas", pallas.gated_long_conv, supports=pallas.supports, in_auto=False, per_shard=True,
                   block_sizes=pallas.BlockSizes),
    # By name only (fail-closed): the Hopper forward (Mosaic GPU, wgmma) has never run on a GPU.
    Implementation("hopper", hopper.gated_long_conv, supports=hopper.supports, in_auto=False, per_shard=True,
                   block_sizes=hopper.BlockSizes),
    Implementation("reference", reference.gated_long_conv),
    Implementation("direct", functools.partial(reference.gated_long_conv,
                                               causal_conv=reference.direct_causal_conv), in_auto=False),
))


def _check_inputs(u: jax.Array, k: jax.Array, skip: jax.Array | None, in_gate: jax.Array | None,
                  out_gate: jax.Array | None) -> None:
  validation.check_rank("u", u, 3, "batch, length, channels")
  validation.check_dtype("u", u)
  _, length, channels = u.shape
  validation.check_rank("k", k, 2, "length, channels")
  validation.check_dtype("k", k)
  validation.check_shape("k", k, (length, channels), "length, channels")
  if skip is not None:
    validation.check_dtype("skip", skip)
    validation.check_shape("skip", skip, (channels,), "channels")
  for name, gate in (("in_gate", in_gate), ("out_gate", out_gate)):
    if gate is not None:
      validation.check_dtype(name, gate)
      validation.check_shape(name, gate, u.shape, "batch, length, channels")
      # Gates are activations like u; the filter and skip are parameters and may stay in float32.
      validation.check_same_dtype(u=u, **{name: gate})


def long_conv(u: jax.Array, k: jax.Array, *, skip: jax.Array | None = None, in_gate: jax.Array | None = None,
              out_gate: jax.Array | None = None, implementation: str = "auto",
              block_sizes: pallas.BlockSizes | None = None) -> jax.Array:
  """out_gate ⊙ causal_conv(in_gate ⊙ u, k) + skip ⊙ u per channel; u, gates [B, L, D], k [L, D], skip [D].
  block_sizes must be the running implementation's (name it), None its defaults for the shape."""
  _check_inputs(u, k, skip, in_gate, out_gate)
  batch, length, channels = u.shape
  options = dict(batch=batch, length=length, channels=channels, dtype=u.dtype, filter_dtype=k.dtype,
                 has_skip=skip is not None, has_in_gate=in_gate is not None, has_out_gate=out_gate is not None)
  # Channels are independent: under a mesh the kernel runs per shard, batch over the data axes and channels over
  # the tensor axis (H in the layouts: the axis sharding.py splits over it).
  return DISPATCHER.run(
      implementation, options, positional=("u", "k", "skip", "in_gate", "out_gate"),
      arrays=dict(u=u, k=k, skip=skip, in_gate=in_gate, out_gate=out_gate),
      layouts=dict(u="BLH", k="LH", skip="H", in_gate="BLH", out_gate="BLH"), out_layouts="BLH", static={},
      block_sizes=block_sizes)
