"""Monarch MLP benchmark (issue 19): y = down(gelu(up(x))) with both maps Monarch matrices of nblocks blocks (the
GPT-2-Monarch MLP, biases left out), by our implementations (the fused Pallas kernel "pallas", the XLA einsum
form "xla", the float32 oracle "reference" by --impls), against the dense MLP through jnp.dot (cuBLAS on the
GPU), `xla:dense`, in the same run.

Letters: T tokens, E model width, I hidden width, nb blocks per factor. Inputs, all in --dtype: x [T, E]; the
up map's factors w1 [nb, E/nb, E/nb], w2 [nb, I/nb, E/nb] and the down map's w1 [nb, E/nb, I/nb],
w2 [nb, E/nb, E/nb] (monarch_init's shapes: intermediate width min(in, out)); the dense weights [E, I], [I, E].
Every candidate receives all of them (the harness gives one input list per shape) and uses its own, so in
fwd_bwd a Monarch row also writes the zero gradient of the dense weights (8·E² values) and a dense row that of
the factors: a memset that slows the Monarch rows by about 2% at E 2048 (the acceptance ratios are, if anything,
understated).

FLOPs are the Monarch MLP's: a map in -> out costs 2·(in + out)·(E/nb) per token in its two factors, so
  fwd      T · 4·(E + I)·E/nb          (E 2048, I 8192, nb 4: 1/3.2 of the dense MLP's T · 4·E·I)
  fwd_bwd  3 · fwd                     (the input and the weight gradients each repeat every product once)
and the dense row's TFLOP/s counts the same Monarch FLOPs (one work per shape): read it from ms and the ratio
column, which is `xla:dense`'s time over the row's (the issue's acceptance: >= 2.4x in fwd_bwd at
T16384-E2048-I8192-nb4, >= 3x at nb8).
"""

from __future__ import annotations

import dataclasses

from benchmarks import harness
from benchmarks.harness import Candidate, Skipped, Suite


@dataclasses.dataclass(frozen=True)
class MonarchShape:
  name: str
  tokens: int
  d_model: int  # E
  hidden: int  # I
  nblocks: int


def _shape(tokens, d_model, nblocks, prefix="") -> MonarchShape:
  hidden = 4 * d_model
  return MonarchShape(f"{prefix}T{tokens}-E{d_model}-I{hidden}-nb{nblocks}", tokens, d_model, hidden, nblocks)


DEFAULT = tuple(_shape(tokens, width, nblocks) for tokens in (16384, 65536) for width in (1024, 2048, 4096)
                for nblocks in (4, 8))
TINY = (_shape(100, 64, 4, prefix="tiny-"),)  # CPU smoke run (an odd token count: the kernel pads)
SHAPES = {s.name: s for s in DEFAULT + TINY}
SHAPE_SETS = {"default": tuple(s.name for s in DEFAULT), "tiny": tuple(s.name for s in TINY), "all": tuple(SHAPES),
              "headline": ("T16384-E2048-I8192-nb4", "T16384-E2048-I8192-nb8")}


def monarch_mlp_flops(shape: MonarchShape, mode: str, itemsize: int = 2) -> float:
  del itemsize
  forward = shape.tokens * 4.0 * (shape.d_model + shape.hidden) * (shape.d_model // shape.nblocks)
  return forward if mode == "fwd" else 3.0 * forward


def factor_shapes(in_features: int, out_features: int, nblocks: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(w1, w2) shapes of monarch_init."""
  block_in, block_out = in_features // nblocks, out_features // nblocks
  mid = min(block_in, block_out)
  return (nblocks, mid, block_in), (nblocks, block_out, mid)


def array_shapes(shape: MonarchShape):
  """((x, up w1, up w2, down w1, down w2, dense up, dense down) shapes, output shape)."""
  e, i = shape.d_model, shape.hidden
  return ((shape.tokens, e), *factor_shapes(e, i, shape.nblocks), *factor_shapes(i, e, shape.nblocks),
          (e, i), (i, e)), (shape.tokens, e)


def _gelu(h):
  import jax
  return jax.nn.gelu(h, approximate=True)  # GPT-2's, as jaxlm.layers.mlp.GeluMLP


def our_candidates(names) -> list[Candidate | Skipped]:
  def make(api, name: str, shape: MonarchShape):
    def mlp(x, up_w1, up_w2, down_w1, down_w2, dense_up, dense_down):
      del dense_up, dense_down
      hidden = api.monarch_linear(x, up_w1, up_w2, implementation=name)
      return api.monarch_linear(_gelu(hidden), down_w1, down_w2, implementation=name)
    return mlp
  return harness.our_candidates(names, "pallas_kernels.monarch.api", make)


def _dense_candidate() -> Candidate:
  import jax.numpy as jnp

  def make(shape: MonarchShape):
    def mlp(x, up_w1, up_w2, down_w1, down_w2, dense_up, dense_down):
      del up_w1, up_w2, down_w1, down_w2
      hidden = jnp.dot(x, dense_up, preferred_element_type=x.dtype)
      return jnp.dot(_gelu(hidden), dense_down, preferred_element_type=x.dtype)
    return mlp
  return Candidate("xla:dense", "jax", make)


def peer_candidates() -> list[Candidate | Skipped]:
  return [_dense_candidate()]


SUITE = Suite(
    op="monarch",
    shapes=SHAPES,
    shape_sets=SHAPE_SETS,
    unit="TFLOP/s",
    work=monarch_mlp_flops,
    array_shapes=array_shapes,
    ours=our_candidates,
    peers=peer_candidates,
    ratio_peers=("xla:dense",),
    default_impls=("pallas", "xla"),
)
