"""Packed documents: the portable kernel's passes loop only over the tiles that hold a block's documents.

The ranges (documents.py) cover every same-document pair and, for sorted ids, are tight; the kernel matches the
reference in outputs, lse and all three gradients for ragged and equal-length documents, a document spanning many
tiles, many documents in one tile, and non-contiguous ids (the masked fallback), with causal, window and GQA;
and tiles of other documents are never computed: NaNs planted in another document's whole tiles do not reach a
document's outputs or gradients (a masked tile would still multiply 0 by NaN).

Letters: B batch, T query length, S key length, H query heads, K kv heads, D head dim, J blocks.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.attention import documents, pallas
from pallas_kernels.attention import reference as ref
from tests.pallas_kernels.test_attention_kernel import _check_against_reference
from tests.tolerances import assert_close, normal

BLOCK = 16
BLOCKS = pallas.BlockSizes(BLOCK, BLOCK, BLOCK, BLOCK, BLOCK, BLOCK)


def _ids(lengths_per_row) -> jnp.ndarray:
  """[B, sum(lengths)] sorted ids numbered from 1, one run per document length."""
  return jnp.asarray([np.repeat(np.arange(1, len(ls) + 1), ls) for ls in lengths_per_row], jnp.int32)


RAGGED = [[5, 3, 1, 30, 41], [80]]  # row 0: three documents in the first tile, one over three tiles; row 1: one
EQUAL = [[20, 20, 20, 20], [20, 20, 20, 20]]


def _unsorted(rng, batch: int, length: int) -> jnp.ndarray:
  return jnp.asarray(rng.integers(0, 3, (batch, length)), jnp.int32)


@pytest.mark.parametrize("own_block,other_block", [(16, 16), (16, 32), (32, 16)])
def test_ranges_cover_every_same_document_pair_and_are_tight(rng, own_block, other_block):
  for ids in (_ids(RAGGED), _ids(EQUAL), _unsorted(rng, 2, 80)):
    ids = np.asarray(ids)
    num_own = -(-ids.shape[1] // own_block)
    ranges = np.asarray(documents.block_ranges(jnp.asarray(ids), jnp.asarray(ids), own_block=own_block,
                                               other_block=other_block, num_own_blocks=num_own))
    assert ranges.shape == (ids.shape[0], num_own, 1, 2)
    for b in range(ids.shape[0]):
      is_sorted = bool(np.all(np.diff(ids[b]) >= 0))
      for j in range(num_own):
        lo, hi = ranges[b, j, 0]
        same = np.isin(ids[b], ids[b, j * own_block:(j + 1) * own_block])  # positions this block can see
        blocks = np.unique(np.nonzero(same)[0] // other_block)
        assert lo <= blocks.min() and blocks.max() < hi, f"row {b} block {j}: {blocks} not in [{lo}, {hi})"
        if is_sorted:  # exactly the blocks holding the documents: the first and last hold one of them
          assert (lo, hi - 1) == (blocks.min(), blocks.max()), f"row {b} block {j}: [{lo}, {hi}) vs {blocks}"
        else:
          assert (lo, hi) == (0, -(-ids.shape[1] // other_block))


def test_eight_equal_documents_read_an_eighth_of_the_tiles():
  """The benchmark's layout in small: 8 documents of 4 tiles each, so each query tile reads its 4 key tiles."""
  ids = _ids([[64] * 8])
  ranges = np.asarray(documents.block_ranges(ids, ids, own_block=16, other_block=16, num_own_blocks=32))
  assert np.all(ranges[0, :, 0, 1] - ranges[0, :, 0, 0] == 4)


CASES = {
    "ragged_causal_gqa": dict(causal=True, T=80, S=80, H=4, K=2, ids=RAGGED),
    "equal_window_noncausal": dict(window=23, T=80, S=80, H=2, K=1, ids=EQUAL),
    "ragged_suffix_queries_bf16": dict(causal=True, T=50, S=80, ids=RAGGED, dtype=jnp.bfloat16),
    "noncontiguous_causal": dict(causal=True, T=64, S=64, ids="unsorted"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_packed_documents_match_reference(rng, case):
  case = dict(CASES[case])
  ids, T = case.pop("ids"), case["T"]
  kv_ids = _unsorted(rng, 2, case["S"]) if ids == "unsorted" else _ids(ids)
  case.update(D=32, segment_ids=kv_ids[:, kv_ids.shape[1] - T:], kv_segment_ids=kv_ids)
  kernel_fn = lambda *args, **kw: pallas.flash_attention(*args, block_sizes=BLOCKS, **kw)
  _check_against_reference(rng, kernel_fn, case)


def test_tiles_of_other_documents_are_never_computed(rng):
  """Documents on tile boundaries, [0, 32) and [32, 80): every q, k, v, and output cotangent of the second is NaN.
  The first document's outputs, lse and gradients stay finite and equal the reference run on it alone, so no
  tile of the second was computed for it (a masked tile multiplies its P = 0 by V = NaN)."""
  B, T, H, K, D, first = 1, 80, 2, 1, 32, 32
  ids = _ids([[first, T - first]])
  q, k, v = normal(rng, (B, T, H, D)), normal(rng, (B, T, K, D)), normal(rng, (B, T, K, D))
  d_out = normal(rng, (B, T, H, D))
  poison = lambda x: x.at[:, first:].set(jnp.nan)

  def outputs_and_grads(attention, q, k, v, d_out, **options):
    def loss(q, k, v):
      out, lse = attention(q, k, v, return_lse=True, **options)
      return jnp.sum(out * d_out), (out, lse)
    grads, (out, lse) = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, lse, grads

  got = outputs_and_grads(lambda *a, **kw: pallas.flash_attention(*a, block_sizes=BLOCKS, **kw),
                          poison(q), poison(k), poison(v), poison(d_out), causal=False, segment_ids=ids)
  cut = lambda x: x[:, :first]
  want = outputs_and_grads(ref.attention, cut(q), cut(k), cut(v), cut(d_out), causal=False)
  for name, g, w in zip(("out", "dq", "dk", "dv"), (got[0], *got[2]), (want[0], *want[2])):
    assert_close(cut(g), w, dtype=jnp.float32, reduction_len=first, name=name, scale=4.0)
  assert_close(got[1][:, :, :first], want[1], dtype=jnp.float32, reduction_len=first, name="lse")
