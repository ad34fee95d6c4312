"""The MQAR generator against Zoology's definition: ranges, uniqueness, query gaps, label mask, determinism."""

import numpy as np
import pytest

from train.config import MQARDataConfig, MQARSetting
from train.data import mqar
from train.step import IGNORE


def _queries(inputs, labels, k):
  rows, cols = np.nonzero(labels != IGNORE)
  return rows.reshape(-1, k), cols.reshape(-1, k)


@pytest.mark.parametrize("vocab, length, k", [(8192, 64, 4), (256, 128, 16), (64, 32, 8)])
def test_layout_ranges_and_labels(rng, vocab, length, k):
  seed = int(rng.integers(1 << 30))
  inputs, labels = mqar.multiquery_ar(vocab, 500, length, k, seed=seed, random_non_queries=False)
  assert inputs.shape == labels.shape == (500, length)
  keys, values = inputs[:, 0:2 * k:2], inputs[:, 1:2 * k:2]
  assert keys.min() >= 1 and keys.max() < vocab // 2
  assert values.min() >= vocab // 2 and values.max() < vocab
  for row in range(500):  # keys and values are distinct within an example
    assert len(set(keys[row])) == k and len(set(values[row])) == k
  assert ((labels != IGNORE).sum(1) == k).all()  # exactly one label per query
  rows, cols = _queries(inputs, labels, k)
  assert (cols >= 2 * k).all() and ((cols - 2 * k) % 2 == 0).all()  # queries sit on even slots after the context
  for row in range(500):
    lookup = dict(zip(keys[row], values[row]))
    for col in cols[row]:
      assert labels[row, col] == lookup[inputs[row, col]]  # the label is the queried key's value
    assert sorted(inputs[row, cols[row]]) == sorted(keys[row])  # every key is queried once
  other = np.ones_like(inputs, bool)
  other[:, :2 * k] = False
  other[rows, cols] = False
  assert (inputs[other] == 0).all()  # without random_non_queries everything else is 0


def test_random_non_queries_fill_zeros(rng):
  seed = int(rng.integers(1 << 30))
  plain, labels = mqar.multiquery_ar(512, 300, 64, 4, seed=seed, random_non_queries=False)
  noisy, labels2 = mqar.multiquery_ar(512, 300, 64, 4, seed=seed, random_non_queries=True)
  np.testing.assert_array_equal(labels, labels2)
  np.testing.assert_array_equal(noisy[plain != 0], plain[plain != 0])
  filled = noisy[plain == 0]
  assert filled.min() >= 0 and filled.max() < 512 and len(np.unique(filled)) > 400


def test_query_gaps_follow_zoology_sequential_draws(rng):
  """Gumbel top-k draws the same ordered gaps as Zoology's np.random.choice(space, k, replace=False, p)."""
  length, k, n = 64, 4, 20000
  seed = int(rng.integers(1 << 30))
  inputs, labels = mqar.multiquery_ar(8192, n, length, k, seed=seed, random_non_queries=False)
  rows, cols = _queries(inputs, labels, k)
  # recover each query's gap and its draw index (query j repeats key j)
  keys = inputs[:, 0:2 * k:2]
  gap_of_draw = np.empty((n, k), int)
  for j in range(k):
    hit = inputs[rows, cols] == keys[rows, j]
    gap_of_draw[:, j] = ((cols - 2 * k) // 2)[hit]
  space = (length - 2 * k) // 2
  p = mqar.query_gap_probs(space, 0.01)
  ref_rng = np.random.default_rng(seed + 1)
  reference = np.stack([ref_rng.choice(space, k, replace=False, p=p) for _ in range(n)])
  for j in (0, k - 1):  # first and last draws
    ours = np.bincount(gap_of_draw[:, j], minlength=space) / n
    theirs = np.bincount(reference[:, j], minlength=space) / n
    assert 0.5 * np.abs(ours - theirs).sum() < 0.03, (j, ours, theirs)
  # short gaps dominate: the power law puts the most mass on the first slot
  assert np.bincount(gap_of_draw[:, 0], minlength=space).argmax() == 0


def test_deterministic_by_seed_and_mixture():
  config = MQARDataConfig(vocab_size=256, train=(MQARSetting(32, 2, 50), MQARSetting(64, 8, 30)),
                          test=(MQARSetting(64, 4, 10),))
  a, b = mqar.build(config, 7, "train"), mqar.build(config, 7, "train")
  np.testing.assert_array_equal(a.inputs, b.inputs)
  assert not np.array_equal(a.inputs, mqar.build(config, 8, "train").inputs)
  assert a.inputs.shape == (80, 64) and list(np.bincount(a.setting)) == [50, 30]
  short = a.setting == 0
  assert (a.labels[short, 32:] == IGNORE).all() and (a.inputs[short, 32:] == 0).all()  # right padding
  assert ((a.labels[short] != IGNORE).sum(1) == 2).all() and ((a.labels[~short] != IGNORE).sum(1) == 8).all()
  test = mqar.build(config, 7, "test")
  assert not np.array_equal(test.inputs[:10], a.inputs[50:60])


def test_rejects_zoology_invalid_settings():
  with pytest.raises(ValueError, match="seq_len"):
    mqar.multiquery_ar(256, 1, 63, 4, seed=0)
  with pytest.raises(ValueError, match="num_kv_pairs"):
    mqar.multiquery_ar(256, 1, 32, 9, seed=0)
