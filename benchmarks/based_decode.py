"""BASED decode benchmark: one token per row through the recurrent form, in GB/s against the device's copy rate
measured in the same run. The step reads the float32 state once and writes it back updated (memory-bound: about
2 FLOPs per state byte), which is the whole cost of BASED generation.

Letters: B batch, H heads, F q/k feature dim, D value head dim, U = F(F+1)/2 symmetric order-2 pairs. State per
(b, h), float32: s0 [D], s1 [F, D], s2 [U, D], z0, z1 [F], z2 [U] (pallas_kernels/based/symmetric.py).

Bytes counted: the state read and written, 2·4·B·H·(1 + F + U)·(D + 1), plus q, k, v in and y out. The
`xla:copy` peer copies the state (read once, written once): the same bytes, so the ratio column is the fraction
of the copy bandwidth a kernel reaches (the issue's target: >= 0.70 at batch 128 and 512). Our steps are timed as
generation runs them: the state donated and the updated state fed to the next step (Suite.carried_inputs), so a
kernel that updates it in place moves these bytes and no copy of the state.
"""

from __future__ import annotations

import dataclasses
import functools

from benchmarks import harness
from benchmarks.harness import Candidate, Skipped, Suite, copy_peer

STATE_INPUTS = (3, 4, 5, 6, 7, 8)  # s0, s1, s2, z0, z1, z2 after q, k, v


@dataclasses.dataclass(frozen=True)
class DecodeShape:
  name: str
  batch: int
  num_heads: int
  feature_dim: int = 16
  head_dim: int = 64


def _shape(batch, heads=16, feature_dim=16, head_dim=64, prefix="") -> DecodeShape:
  return DecodeShape(f"{prefix}B{batch}-H{heads}-F{feature_dim}-D{head_dim}", batch, heads, feature_dim, head_dim)


DEFAULT = (_shape(128), _shape(512), _shape(128, head_dim=128))
TINY = (_shape(2, heads=2, head_dim=32, prefix="tiny-"),)
SHAPES = {s.name: s for s in DEFAULT + TINY}
SHAPE_SETS = {"default": tuple(s.name for s in DEFAULT), "tiny": tuple(s.name for s in TINY), "all": tuple(SHAPES)}


def decode_bytes(shape: DecodeShape, mode: str, itemsize: int = 2) -> float:
  del mode  # forward only
  b, h, f, d = shape.batch, shape.num_heads, shape.feature_dim, shape.head_dim
  state = 4 * b * h * (1 + f + f * (f + 1) // 2) * (d + 1)
  return float(2 * state + b * h * (2 * f + 2 * d) * itemsize)


def array_shapes(shape: DecodeShape):
  """((q, k, v, s0, s1, s2, z0, z1, z2) shapes, output shape)."""
  b, h, f, d = shape.batch, shape.num_heads, shape.feature_dim, shape.head_dim
  u = f * (f + 1) // 2
  state = ((b, h, d), (b, h, f, d), (b, h, u, d), (b, h), (b, h, f), (b, h, u))
  return ((b, h, f), (b, h, f), (b, h, d), *state), (b, h, d)


def our_candidates(names) -> list[Candidate | Skipped]:
  def make(api, name: str, shape: DecodeShape):
    step = functools.partial(api.based_decode_step, normalize=True, implementation=name)
    def run(q, k, v, *state):
      y, new_state = step(q, k, v, api.BasedState(*state))
      return y, tuple(new_state)
    return run
  return harness.our_candidates(names, "pallas_kernels.based.api", make)


def peer_candidates() -> list[Candidate | Skipped]:
  return [copy_peer(lambda inputs: inputs[3:])]


SUITE = Suite(
    op="based_decode",
    shapes=SHAPES,
    shape_sets=SHAPE_SETS,
    unit="GB/s",
    work=decode_bytes,
    array_shapes=array_shapes,
    ours=our_candidates,
    peers=peer_candidates,
    ratio_peers=("xla:copy",),
    modes=("fwd",),
    float32_inputs=STATE_INPUTS,
    carried_inputs=STATE_INPUTS,
)
