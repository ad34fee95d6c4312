"""From text files to samples: prepare a BPE corpus, train on it, then generate from the run directory alone. The run
directory describes itself (model.yaml, tokenizer.json, config.yaml), a tokenizer other than the run's and a
checkpoint of other shapes are refused in one line, and resuming with a changed model names the keys and leaves
every file of the run untouched."""

import hashlib
import os

import pytest

from jaxlm.generate.cli import main as generate_main
from jaxlm.tokenizer import load_tokenizer
from train.__main__ import main as train_main
from train.prepare_data import prepare

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "mesh", "shard", "kernel", "tile", "warp"]
TRAIN = ["model=transformer-tiny", "model.vocab_size=320", "model.max_length=32", "data.kind=text",
         "data.text.seq_len=32", "batch_size=4", "steps=4", "compute_dtype=float32", "log.progress=none",
         "checkpoint.async_save=false", "eval_batches=1"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A finished 4-step run on a BPE (300 tokens) corpus of random words."""
  import numpy as np
  tmp = tmp_path_factory.mktemp("run_to_samples")
  rng = np.random.default_rng(0)
  (tmp / "text").mkdir()
  for i in range(30):
    (tmp / "text" / f"doc{i}.txt").write_text(" ".join(rng.choice(WORDS, size=80)), encoding="utf-8")
  prepare([str(tmp / "text")], str(tmp / "data"), "bpe:300", eval_fraction=0.2)
  run = tmp / "run"
  assert train_main(TRAIN + [f"data.text.path={tmp / 'data'}", f"run_dir={run}"]) == 0
  return run


def test_run_directory_describes_itself(run_dir):
  assert {"config.yaml", "model.yaml", "tokenizer.json", "summary.json", "checkpoints"} <= set(os.listdir(run_dir))
  assert load_tokenizer(str(run_dir / "tokenizer.json")).vocab_size <= 300


def test_generate_from_the_run_directory_uses_its_tokenizer(run_dir, capsys):
  assert generate_main(["--run", str(run_dir), "--prompt", "alpha beta", "gamma", "--max-new-tokens", "4",
                        "--temperature", "0"]) == 0
  out, err = capsys.readouterr()
  lines = out.splitlines()
  assert lines[0] == "[sample 1/2: 4 new tokens]" and lines[1].startswith("alpha beta"), out
  assert "[sample 2/2: 4 new tokens]" in lines and "loaded parameters from" in err and "step 4" in err
  # --checkpoint alone finds the same run (model, tokenizer), and the samples are the same
  assert generate_main(["--checkpoint", str(run_dir / "checkpoints"), "--prompt", "alpha beta", "gamma",
                        "--max-new-tokens", "4", "--temperature", "0"]) == 0
  assert capsys.readouterr().out == out


@pytest.mark.parametrize("args, message", [
    (["--tokenizer", "byte"], "was trained with"),
    (["--tokenizer", "/nonexistent.json"], "'/nonexistent.json': no such file"),
    (["--config", "transformer-tiny"], "parameter embed/embedding is (320, 64) there but (256, 64) in the model"),
])
def test_refusals_are_one_line_with_rc_2(run_dir, capsys, args, message):
  where = ["--checkpoint", str(run_dir)] if "--config" in args else ["--run", str(run_dir)]
  assert generate_main(where + args + ["--prompt", "alpha", "--max-new-tokens", "2"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].startswith("generate: ") and message in err[-1], err


def test_a_missing_tokenizer_names_its_path(capsys):
  assert generate_main(["--config", "transformer-tiny", "--tokenizer", "/nowhere/tok.json", "--prompt", "a"]) == 2
  assert "'/nowhere/tok.json': no such file" in capsys.readouterr().err


def _digests(directory) -> dict[str, str]:
  out = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[path] = hashlib.sha256(f.read()).hexdigest()
  return out


def test_resume_with_another_model_names_the_keys_and_touches_nothing(run_dir, capsys):
  before = _digests(run_dir)
  data = [a for a in TRAIN if not a.startswith("model=")]
  rc = train_main(data + ["model=based-tiny", "model.vocab_size=320", f"run_dir={run_dir}",
                          f"data.text.path={run_dir.parent / 'data'}"])
  err = capsys.readouterr().err
  assert rc == 2 and len(err.strip().splitlines()) == 1, err
  assert "model.mixers: 'attention' -> 'base_conv; based@1%5; sliding_window@2%5'" in err
  assert "model.num_layers: 2 -> 5" in err and "Nothing in" in err
  assert _digests(run_dir) == before


def test_a_finished_run_is_not_extended(run_dir, capsys):
  before = _digests(run_dir)
  rc = train_main(TRAIN + ["steps=8", f"run_dir={run_dir}", f"data.text.path={run_dir.parent / 'data'}"])
  err = capsys.readouterr().err
  assert rc == 2 and "already finished (step 4 of 4" in err, err
  assert _digests(run_dir) == before
