"""Document-aware tile ranges for packed rows: which blocks of the other side hold a block's documents, so that a
kernel never loads or computes the tiles in between (with 8 documents in a row, 7/8 of the tiles).

Query t sees key s only if their segment ids are equal. Take the blocks of one side (the "own" rows: query blocks
for the forward and dQ, key blocks for dK/dV) and the ids of the other side. If the other side's ids are sorted
(non-decreasing) along the row, as a packing loader numbers its documents, the positions whose id lies in
[min, max] of the block's ids form one run, from the first id >= min to the last id <= max, and every position
the block can see is inside it: the range is exact whatever the block's own ids are. If the other side's ids are
not sorted, documents may interleave and the row falls back to every block (the causal/window bounds still
apply, and the element mask keeps it exact, at the masked-tile cost).

The ranges are small int32 arrays [B, own blocks, 1, 2] computed with jnp in the wrapper; kernels read them as a
[1, 2] input tile and intersect them with the causal/window block range (a [1, 2] tile is legal on TPU, Triton and
interpret mode, where scalar prefetch is not available to the portable kernel).

Letters: B batch, N own positions (padded to whole blocks), M the other side's positions, J own blocks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common.layout import cdiv


def _edge_pad(ids_BN: jax.Array, length: int) -> jax.Array:
  """Padding positions repeat the last id, so they never widen a block's [min, max]."""
  return jnp.pad(ids_BN, ((0, 0), (0, length - ids_BN.shape[1])), mode="edge")


def _positions(own_ids_BN, other_ids_BM, own_block: int, num_own_blocks: int):
  """Per own block j: (first, stop, single, sorted): the other side's positions [first, stop) whose ids lie in
  the block's [min, max], whether the block holds one id only, and whether the row's other ids are sorted."""
  own_ids_BN, other_ids_BM = own_ids_BN.astype(jnp.int32), other_ids_BM.astype(jnp.int32)
  batch = other_ids_BM.shape[0]
  blocks_BJC = _edge_pad(own_ids_BN, num_own_blocks * own_block).reshape(batch, num_own_blocks, own_block)
  lo_id_BJ, hi_id_BJ = jnp.min(blocks_BJC, axis=2), jnp.max(blocks_BJC, axis=2)
  # Where the other ids are sorted, the first position with id >= v is the count of positions with id < v, so
  # both searches are counts of comparisons: one fused reduction each on a GPU, J·M compares (2M at B4 S8192).
  # jnp.searchsorted's binary search is a chain of dependent gathers: about 28 small kernels at S 8192 (H100,
  # 2026-12-07: 0.095 ms for both ranges as a while loop, 0.097 unrolled; benchmarks/scripts/document_ranges_time.py),
  # about what a one-document row cost over no segment ids. Unsorted rows fall back to every block below.
  first_BJ = jnp.sum(other_ids_BM[:, None, :] < lo_id_BJ[:, :, None], axis=2, dtype=jnp.int32)
  stop_BJ = jnp.sum(other_ids_BM[:, None, :] <= hi_id_BJ[:, :, None], axis=2, dtype=jnp.int32)
  sorted_B1 = jnp.all(other_ids_BM[:, 1:] >= other_ids_BM[:, :-1], axis=1, keepdims=True)
  return first_BJ, stop_BJ, lo_id_BJ == hi_id_BJ, sorted_B1


def _block_range(first_BJ, stop_BJ, sorted_B1, other_block: int, length: int):
  """[B, J] lo, hi of the other side's blocks holding positions [first, stop); every block where unsorted."""
  lo_BJ = jnp.where(sorted_B1, first_BJ // other_block, 0)
  hi_BJ = jnp.where(sorted_B1, jnp.maximum(cdiv(stop_BJ, other_block), lo_BJ), -(-length // other_block))
  return lo_BJ, hi_BJ


def _interior_range(first_BJ, stop_BJ, single_BJ, sorted_B1, other_block: int, length: int):
  """[B, J] lo, hi of the other side's blocks wholly inside [first, stop) for single-id blocks; (0, 0) otherwise."""
  lo_BJ = cdiv(first_BJ, other_block)
  hi_BJ = jnp.where(stop_BJ == length, cdiv(stop_BJ, other_block), stop_BJ // other_block)
  whole_BJ = single_BJ & sorted_B1 & (lo_BJ < hi_BJ)
  return jnp.where(whole_BJ, lo_BJ, 0), jnp.where(whole_BJ, hi_BJ, 0)


def block_ranges(own_ids_BN: jax.Array, other_ids_BM: jax.Array, *, own_block: int, other_block: int,
                 num_own_blocks: int) -> jax.Array:
  """[B, J, 1, 2] int32: for own block j, the [lo, hi) blocks of the other side (of `other_block` positions)
  that hold every position whose id equals an id in block j; [0, all blocks) in rows whose other ids are unsorted.
  J = num_own_blocks covers own_ids (the last blocks may be padding)."""
  first_BJ, stop_BJ, _, sorted_B1 = _positions(own_ids_BN, other_ids_BM, own_block, num_own_blocks)
  lo_BJ, hi_BJ = _block_range(first_BJ, stop_BJ, sorted_B1, other_block, other_ids_BM.shape[1])
  return jnp.stack([lo_BJ, hi_BJ], axis=-1)[:, :, None, :].astype(jnp.int32)


def kernel_ranges(own_ids_BN: jax.Array, other_ids_BM: jax.Array, *, own_block: int, other_block: int,
                  num_own_blocks: int) -> jax.Array:
  """[B, J, 4] int32 (lo, hi, interior lo, interior hi), as the Hopper kernels read them (one small input, scalars
  per CTA), from one search: block_ranges's [lo, hi), and the interior: for own block j whose positions all hold
  one id d, the [lo, hi) blocks of the other side whose positions all hold d. As far as segment ids go, every pair
  of two such blocks is visible, so a kernel needs no element mask there (the causal/window bounds still decide
  theirs). The interior is empty, (0, 0), where block j holds several ids or the row's other ids are unsorted.
  The other side's padding counts as part of its last document: kernels mask padding keys by their own bounds,
  and padding query rows need no mask."""
  first_BJ, stop_BJ, single_BJ, sorted_B1 = _positions(own_ids_BN, other_ids_BM, own_block, num_own_blocks)
  length = other_ids_BM.shape[1]
  ranges = (*_block_range(first_BJ, stop_BJ, sorted_B1, other_block, length),
            *_interior_range(first_BJ, stop_BJ, single_BJ, sorted_B1, other_block, length))
  return jnp.stack(ranges, axis=-1).astype(jnp.int32)
