"""Packed documents: the portable kernel's passes loop only over the tiles that hold a block's documents.

The ranges (documents.py) cover every same-document pair and, for sorted ids, are tight; the kernel matches the
reference in outputs, lse and all three gradients for ragged and equal-length documents, a document spanning many
tiles, many documents in one tile, and non-contiguous ids (the masked fallback), with causal, window and GQA;
and tiles of other documents are never computed: NaNs planted in another document's whole tiles do not reach a
document's outputs or gradients (a masked tile would still multiply 0 by NaN). The same checks run the Hopper
kernels on an sm90 GPU (marked gpu); on CPU they lower for sm90 in test_attention_hopper.py.

Letters: B batch, T query length, S key length, H query heads, K kv heads, D head dim, J blocks.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.attention import api, documents, hopper, hopper_backward, masking, pallas
from pallas_kernels.attention import reference as ref
from pallas_kernels.common import mosaic
from pallas_kernels.common.layout import round_up
from tests.pallas_kernels.test_attention_hopper import _on_sm90, _visible_pairs
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


@pytest.mark.parametrize("own_block,other_block", [(16, 16), (16, 32), (32, 16)])
def test_interior_ranges_are_the_blocks_wholly_inside_a_block_s_one_document(rng, own_block, other_block):
  """Own blocks of one id d get exactly the other side's blocks whose ids are all d (the last block's padding
  counts as its document); other blocks get nothing."""
  for ids in (_ids(RAGGED), _ids(EQUAL), _ids([[37, 43], [80]]), _unsorted(rng, 2, 80)):
    ids = np.asarray(ids)
    num_own = -(-ids.shape[1] // own_block)
    interior = np.asarray(documents.kernel_ranges(jnp.asarray(ids), jnp.asarray(ids), own_block=own_block,
                                                  other_block=other_block, num_own_blocks=num_own))[..., 2:]
    assert interior.shape == (ids.shape[0], num_own, 2)
    padded = np.pad(ids, ((0, 0), (0, num_own * own_block - ids.shape[1])), mode="edge")
    for b in range(ids.shape[0]):
      is_sorted = bool(np.all(np.diff(ids[b]) >= 0))
      for j in range(num_own):
        own = np.unique(padded[b, j * own_block:(j + 1) * own_block])
        whole = [i for i in range(-(-ids.shape[1] // other_block))  # the last block may be cut short
                 if len(own) == 1 and np.all(ids[b, i * other_block:(i + 1) * other_block] == own[0])]
        lo, hi = interior[b, j]
        got = list(range(lo, hi))
        assert got == (whole if is_sorted else []), f"row {b} block {j}: {got} vs {whole}"


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


def _never_computes_other_documents(rng, attention, *, first: int, length: int, dtype):
  """Documents on tile boundaries, [0, first) and [first, length): every q, k, v, and output cotangent of the second
  is NaN. The first document's outputs, lse and gradients stay finite and equal the reference run on it alone, so
  no tile of the second was computed for it (a masked tile multiplies its P = 0 by V = NaN)."""
  B, H, K, D = 1, 2, 1, 64 if dtype != jnp.float32 else 32
  ids = _ids([[first, length - first]])
  q, k, v = (normal(rng, (B, length, h, D), dtype) for h in (H, K, K))
  d_out = normal(rng, (B, length, H, D))
  poison = lambda x: x.at[:, first:].set(jnp.nan)

  def outputs_and_grads(attention, q, k, v, d_out, **options):
    def loss(q, k, v):
      out, lse = attention(q, k, v, return_lse=True, **options)
      return jnp.sum(out.astype(jnp.float32) * d_out), (out, lse)
    grads, (out, lse) = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, lse, grads

  got = outputs_and_grads(attention, poison(q), poison(k), poison(v), poison(d_out), causal=False, segment_ids=ids)
  cut = lambda x: x[:, :first]
  upcast = lambda x: cut(x).astype(jnp.float32)
  want = outputs_and_grads(ref.attention, upcast(q), upcast(k), upcast(v), cut(d_out), causal=False)
  for name, g, w in zip(("out", "dq", "dk", "dv"), (got[0], *got[2]), (want[0], *want[2])):
    assert_close(cut(g), w, dtype=dtype, reduction_len=first, name=name, scale=4.0)
  assert_close(got[1][:, :, :first], want[1], dtype=dtype, reduction_len=first, name="lse")


def test_tiles_of_other_documents_are_never_computed(rng):
  _never_computes_other_documents(rng, lambda *a, **kw: pallas.flash_attention(*a, block_sizes=BLOCKS, **kw),
                                  first=32, length=80, dtype=jnp.float32)


# The Hopper kernels skip other documents by default; the tests name it so that a change of default keeps them on it.
SKIPPING = hopper.BlockSizes(skip_other_documents=True)
# The Hopper kernels' CTAs own 128 rows and stream 128 (forward) or 64 (backward) keys: documents at this scale.
GPU_CASES = {
    "ragged_causal_gqa": dict(causal=True, T=700, S=700, H=8, K=2, ids=[[3, 60, 5, 1, 400, 131, 100], [700]]),
    "eight_equal_window": dict(causal=True, window=100, T=1024, S=1024, ids=[[128] * 8, [128] * 8]),
    "ragged_suffix_queries": dict(causal=True, T=300, S=700, ids=[[3, 60, 5, 1, 400, 131, 100]] * 2),
    "noncontiguous_noncausal": dict(T=300, S=300, ids="unsorted"),
}


@pytest.mark.gpu
@_on_sm90
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_hopper_packed_documents_match_reference(rng, case):
  case = dict(GPU_CASES[case])
  ids, T = case.pop("ids"), case["T"]
  kv_ids = _unsorted(rng, 2, case["S"]) if ids == "unsorted" else _ids(ids)
  case.update(D=128, dtype=jnp.bfloat16, segment_ids=kv_ids[:, kv_ids.shape[1] - T:], kv_segment_ids=kv_ids)
  # The kernel itself, as the portable test above: api.attention rejects unsorted ids (packed documents are sorted),
  # while the kernels' masked fallback for them is what the noncontiguous case checks.
  _check_against_reference(rng, lambda *a, **kw: hopper.flash_attention(*a, block_sizes=SKIPPING, **kw), case)


@pytest.mark.gpu
@_on_sm90
def test_hopper_never_computes_other_documents(rng):
  _never_computes_other_documents(rng, lambda *a, **kw: api.attention(*a, implementation="hopper",
                                                                     block_sizes=SKIPPING, **kw),
                                  first=256, length=640, dtype=jnp.bfloat16)


# Documents of 300, 200, 40 and 160 keys: CTAs of 128 rows inside one document, across two, and across three.
HOPPER_RANGE_CASES = {"self": (700, [300, 200, 40, 160]), "suffix_queries": (300, [300, 200, 40, 160]),
                      "one_document_with_padding": (333, [333])}
HOPPER_MASKS = [dict(causal=True), dict(causal=False), dict(causal=True, window=100),
                dict(causal=False, window=50, window_right=20)]


@pytest.mark.parametrize("case", list(HOPPER_RANGE_CASES))
@pytest.mark.parametrize("mask_options", HOPPER_MASKS)
def test_hopper_blocks_cover_each_document_and_run_unmasked_only_inside_one(case, mask_options):
  """The Hopper kernels' per-CTA (forward) and per-consumer (dQ, dK/dV) ranges from documents.kernel_ranges:
  [lo, hi) holds every pair a row sees, and a block run without the element mask hides no pair from a real row
  (same document and inside the causal/window bounds): the tile arithmetic of hopper.py and hopper_backward.py,
  checked on CPU."""
  q_len, lengths = HOPPER_RANGE_CASES[case]
  kv_ids = np.asarray(_ids([lengths]))[0]
  kv_len = len(kv_ids)
  q_ids = kv_ids[kv_len - q_len:]
  mask = masking.MaskSpec(scale=1.0, softcap=None, q_offset=kv_len - q_len, q_len=q_len, kv_len=kv_len,
                                     **dict(dict(window=None, window_right=None), **mask_options))
  rows, wg_rows = mosaic.CTA_ROWS, mosaic.WG_ROWS
  t_pad, s_pad = round_up(q_len, rows), round_up(kv_len, rows)
  same = np.pad(q_ids[:, None] == kv_ids[None, :], ((0, t_pad - q_len), (0, s_pad - kv_len)))
  pairs = _visible_pairs(mask, t_pad, s_pad) & same  # [t_pad, s_pad]: what each real row sees
  ranges = lambda own, other, own_block, step, n: np.asarray(documents.kernel_ranges(
      jnp.asarray(own)[None], jnp.asarray(other)[None], own_block=own_block, other_block=step, num_own_blocks=n))

  def check(name, seen, block_rows, step, lo, full_lo, full_hi, hi, real_rows, real_cols):
    assert lo <= full_lo <= full_hi <= hi, (name, lo, full_lo, full_hi, hi)
    for j in range(seen.shape[1] // step):
      tile = seen[:, j * step:(j + 1) * step]
      assert lo <= j < hi or not tile.any(), f"{name}: block {j} holds pairs, not in [{lo}, {hi})"
      if full_lo <= j < full_hi:
        assert tile[:max(0, real_rows), :max(0, real_cols - j * step)].all(), f"{name}: block {j} unmasked, hides pairs"

  blocks = hopper.BlockSizes()
  plan = hopper._Plan(mask=mask, blocks=blocks, heads=1, kv_heads=1, head_dim=128, dtype=jnp.bfloat16,
                      q_blocks=t_pad // rows, kv_blocks=s_pad // blocks.block_k, segmented=True)
  fwd_ranges = ranges(q_ids, kv_ids, rows, blocks.block_k, plan.q_blocks)
  for qb in range(plan.q_blocks):
    got = [int(x) for x in hopper._key_blocks(plan, qb * rows, tuple(fwd_ranges[0, qb]))]
    if len(lengths) == 1:  # one document: the same blocks, masked or not, as without segment ids
      plain = dataclasses.replace(plan, segmented=False)
      assert got == [int(x) for x in hopper._key_blocks(plain, qb * rows)], f"forward CTA {qb}"
    check(f"forward CTA {qb}", pairs[qb * rows:(qb + 1) * rows], rows, blocks.block_k, *got,
          real_rows=q_len - qb * rows, real_cols=kv_len)

  back = hopper_backward.BlockSizes()
  bplan = hopper_backward._Plan(mask=mask, blocks=back, heads=1, kv_heads=1, head_dim=128, dtype=jnp.bfloat16,
                                t_pad=t_pad, s_pad=s_pad, segmented=True)
  for transposed, step, own_ids, other_ids, n in ((False, back.block_k_dq, q_ids, kv_ids, t_pad // rows),
                                                  (True, back.block_q_dkv, kv_ids, q_ids, s_pad // rows)):
    seen_all = pairs.T if transposed else pairs  # rows: what a consumer owns; columns: what it streams
    doc_ranges = (None, None, ranges(own_ids, other_ids, rows, step, n))
    for block in range(n):
      start = block * rows
      bounds = (mask.q_block_range(start, rows, step) if transposed else mask.kv_block_range(start, rows, step))
      cta = hopper_backward._Cta(0, 0, start, *hopper_backward._within_documents(*bounds, doc_ranges, 0, block))
      consumer = hopper_backward._dkv_query_blocks if transposed else hopper_backward._dq_key_blocks
      for first in (start, start + wg_rows):
        got = [int(x) for x in consumer(bplan, cta, first)]
        if len(lengths) == 1:
          plain = hopper_backward._Cta(0, 0, start, *bounds)
          assert got == [int(x) for x in consumer(dataclasses.replace(bplan, segmented=False), plain, first)]
        assert int(cta.lo) <= got[0] and got[3] <= int(cta.hi)
        # Padding query rows have P = 0 and need no mask, padding keys do: only real pairs are checked.
        real_rows, real_cols = ((kv_len - first, q_len) if transposed else (q_len - first, kv_len))
        check(f"{'dkv' if transposed else 'dq'} rows {first}", seen_all[first:first + wg_rows], wg_rows, step,
              *got, real_rows=real_rows, real_cols=real_cols)
