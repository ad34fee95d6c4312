"""Runs that cannot learn fail loudly: every bad numeric setting is named in one line with exit code 2 before
anything compiles; a run whose steps are all non-finite stops with exit code 1 and says why; data whose token ids
exceed the model's vocabulary, or whose eval split cannot fill one row, is refused by name."""

import json

import pytest

from train.__main__ import main as train_main
from train.prepare_data import prepare

TINY = ["model=transformer-tiny", "model.max_length=32", "data.kind=synthetic", "data.synthetic_seq_len=32",
        "batch_size=4", "steps=40", "compute_dtype=float32", "log.progress=plain", "log.every=5",
        "checkpoint.enabled=false"]


@pytest.mark.parametrize("override, message", [
    ("batch_size=0", "batch_size: must be >= 1, got 0"),
    ("data.text.seq_len=0", "data.text.seq_len: must be >= 1, got 0"),
    ("log.every=0", "log.every: must be >= 1, got 0"),
    ("optim.lr=-0.001", "optim.lr: must be >= 0.0, got -0.001"),
    ("optim.b2=1.5", "optim.b2: must be in [0.0, 1.0], got 1.5"),
    ("eval_every=-5", "eval_every: must be >= 0, got -5"),
    ("data.mqar.train=[{seq_len: 64, num_kv_pairs: 0}]", "data.mqar.train[0].num_kv_pairs: must be >= 1, got 0"),
])
def test_bad_values_are_named_in_one_line(capsys, override, message):
  assert train_main(TINY + [override]) == 2
  err = capsys.readouterr().err
  assert err.strip().splitlines() == [f"config error: {message}"], err


def test_a_run_of_non_finite_steps_stops_with_rc_1(tmp_path, capsys):
  # lr 1e30: the first update sends the weights to ~1e30, and every later step's loss is non-finite (skipped).
  rc = train_main(TINY + ["optim.lr=1e30", "optim.clip_norm=0", f"run_dir={tmp_path}", "max_nonfinite_steps=10"])
  out, err = capsys.readouterr()
  assert rc == 1, (out, err)
  assert "consecutive non-finite steps" in err and "Lower optim.lr" in err
  assert "skipped " in out  # the bar shows the skipped steps
  with open(tmp_path / "summary.json") as f:
    summary = json.load(f)
  assert "non-finite" in summary["error"] and summary["step"] <= 20  # noticed at a fetch, long before step 40


def _corpus(tmp_path, eval_fraction):
  (tmp_path / "text").mkdir()
  for i in range(12):
    (tmp_path / "text" / f"d{i}.txt").write_text(("kernel tile warp mesh shard " * 20) + str(i))
  prepare([str(tmp_path / "text")], str(tmp_path / "data"), "bpe:300", eval_fraction=eval_fraction)
  return ["data.kind=text", f"data.text.path={tmp_path / 'data'}", "data.text.seq_len=16"]


def test_token_ids_beyond_the_vocabulary_are_refused(tmp_path, capsys):
  rc = train_main(TINY + _corpus(tmp_path, 0.2) + [f"run_dir={tmp_path / 'run'}"])  # the model has 256 tokens
  err = capsys.readouterr().err
  assert rc == 2 and "holds token id" in err and "the model's vocab_size is 256" in err, err


def test_an_eval_split_shorter_than_a_row_is_refused(tmp_path, capsys):
  data = _corpus(tmp_path, 0.05)  # one short document held out
  rc = train_main(TINY + data + ["model.vocab_size=320", "data.text.seq_len=512", "model.max_length=512",
                                 f"run_dir={tmp_path / 'run'}", "batch_size=1"])
  err = capsys.readouterr().err
  assert rc == 2 and "the eval split of" in err and "fewer than one row of 512" in err, err
