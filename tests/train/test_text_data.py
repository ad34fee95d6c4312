"""prepare_data round-trips text through each tokenizer; the packing loader keeps documents apart."""

import json
import subprocess
import sys

import numpy as np
import pytest

from train.data.loader import RowLoader
from train.data.text import PackedRows, TokenFile, load_prepared_tokenizer
from train.prepare_data import prepare
from train.step import IGNORE

WORDS = ["alpha", "beta", "gamma", "delta", "jax", "mesh", "shard", "über", "naïve", "日本", "🙂", "\n", "  "]


def _corpus(rng, tmp_path, docs=24):
  texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(5, 60)))) for _ in range(docs)]
  (tmp_path / "in" / "sub").mkdir(parents=True)
  for i, t in enumerate(texts[:8]):
    (tmp_path / "in" / f"doc{i:02d}.txt").write_text(t, encoding="utf-8")
  for i, t in enumerate(texts[8:12]):
    (tmp_path / "in" / "sub" / f"note{i}.md").write_text(t, encoding="utf-8")
  with open(tmp_path / "in" / "sub" / "more.jsonl", "w", encoding="utf-8") as f:
    for t in texts[12:]:
      f.write(json.dumps({"text": t, "id": 1}) + "\n")
  return texts


@pytest.mark.parametrize("tokenizer", ["byte", "bpe:300"])
def test_round_trip(rng, tmp_path, tokenizer):
  texts = _corpus(rng, tmp_path)
  out = tmp_path / "out"
  meta = prepare([str(tmp_path / "in")], str(out), tokenizer, eval_fraction=0.25)
  assert meta["splits"]["train"]["docs"] + meta["splits"]["eval"]["docs"] == len(texts)
  assert meta["splits"]["eval"]["docs"] == 6 and meta["dtype"] == "uint16"
  tok = load_prepared_tokenizer(str(out))
  decoded = [tok.decode(TokenFile(str(out), split).document(i))
             for split in ("train", "eval") for i in range(TokenFile(str(out), split).num_docs)]
  assert sorted(decoded) == sorted(texts)
  if tokenizer.startswith("bpe"):
    assert tok.vocab_size <= 300 and meta["splits"]["train"]["tokens"] < sum(len(t.encode()) for t in texts)
    # a saved tokenizer.json is a valid --tokenizer for another run
    meta2 = prepare([str(tmp_path / "in")], str(tmp_path / "out2"), str(out / "tokenizer.json"), 0.25)
    assert meta2["splits"] == meta["splits"]


def test_cli(tmp_path, rng):
  _corpus(rng, tmp_path)
  result = subprocess.run([sys.executable, "-m", "train.prepare_data", "--input", str(tmp_path / "in"),
                           "--output", str(tmp_path / "cli"), "--tokenizer", "byte"],
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert "13 file(s) taken:" in result.stdout and "skipped" not in result.stdout, result.stdout
  assert "tokenizer byte (vocabulary 256), tokens stored as uint16" in result.stdout
  with open(tmp_path / "cli" / "meta.json") as f:
    assert json.load(f)["vocab_size"] == 256


def test_packing_segments_and_labels(rng, tmp_path):
  texts = _corpus(rng, tmp_path)
  prepare([str(tmp_path / "in")], str(tmp_path / "out"), "byte", eval_fraction=0.0)
  data = TokenFile(str(tmp_path / "out"), "train")
  rows = PackedRows(data, seq_len=32)
  stream = np.asarray(data.tokens)
  assert rows.num_rows == (len(stream) - 1) // 32
  batch = rows.read(np.arange(rows.num_rows))
  np.testing.assert_array_equal(batch["inputs"].reshape(-1), stream[:rows.num_rows * 32])  # no padding
  doc_of = np.searchsorted(data.doc_starts, np.arange(len(stream)), side="right")
  for r in range(rows.num_rows):
    pos = r * 32 + np.arange(32)
    seg = batch["segment_ids"][r]
    assert seg[0] == 1 and (np.diff(seg) >= 0).all()
    np.testing.assert_array_equal(seg - 1, doc_of[pos] - doc_of[pos[0]])
    crosses = doc_of[pos + 1] != doc_of[pos]
    np.testing.assert_array_equal(batch["labels"][r] == IGNORE, crosses)  # no label across documents
    np.testing.assert_array_equal(batch["labels"][r][~crosses], stream[pos + 1][~crosses])
  assert (batch["labels"] == IGNORE).sum() >= len(texts) - 2
  plain = PackedRows(data, seq_len=32, segment_ids=False).read(np.arange(rows.num_rows))
  assert sorted(plain) == ["inputs", "labels"]  # the same rows, labels still cut at documents, no ids
  for key in plain:
    np.testing.assert_array_equal(plain[key], batch[key])


def test_row_loader_epochs_and_hosts():
  loader = RowLoader(100, lambda rows: {"rows": rows}, batch_size=8, seed=3)
  assert loader.steps_per_epoch == 12
  epoch0 = np.concatenate([loader.rows(s) for s in range(12)])
  assert len(set(epoch0)) == 96  # no row twice within an epoch
  assert not np.array_equal(loader.rows(0), loader.rows(12))  # reshuffled next epoch
  fresh = RowLoader(100, lambda rows: {"rows": rows}, batch_size=8, seed=3)
  np.testing.assert_array_equal(fresh.rows(29), loader.rows(29))  # a function of the step only
  halves = [loader.host_batch(5, p, 2)["rows"] for p in range(2)]
  assert sorted(np.concatenate(halves)) == sorted(loader.rows(5))


# lolcats cannot reset inside a row, so it trains on rows without segment ids (configs/lolcats/*_scratch.yaml).
@pytest.mark.parametrize("model", [["model=transformer-tiny"],
                                   ["model=transformer-tiny", "model.mixers=lolcats", "data.text.segment_ids=false",
                                    "model.mixer_options.lolcats.window=8"]], ids=["transformer", "lolcats"])
def test_train_on_prepared_text_reports_perplexity(rng, tmp_path, model):
  from train.config import load_config
  from train.run import train
  _corpus(rng, tmp_path, docs=40)
  prepare([str(tmp_path / "in")], str(tmp_path / "tok"), "byte", eval_fraction=0.2)
  summary = train(load_config(None, model + [
      "model.max_length=32", "data.kind=text", f"data.text.path={tmp_path / 'tok'}",
      "data.text.seq_len=32", "batch_size=8", "steps=3", "compute_dtype=float32", f"run_dir={tmp_path / 'run'}",
      "log.progress=none", "checkpoint.enabled=false", "eval_batches=2"]))
  assert summary["step"] == 3 and np.isfinite(summary["loss"])
  assert 1.0 < summary["eval/text/perplexity"] < 1000 and "eval/text/accuracy" in summary


def _messy_folder(tmp_path, rng):
  """A folder as users have them: UTF-8 text, a latin-1 file, an extensionless file and an empty file."""
  folder = tmp_path / "messy"
  folder.mkdir()
  good = " ".join(rng.choice(WORDS[:7], size=40))
  (folder / "good.txt").write_text(good, encoding="utf-8")
  prefix = "plain ascii then "
  (folder / "latin1.txt").write_bytes((prefix + "caf\xe9 cr\xe8me").encode("latin-1"))
  (folder / "README").write_text("no extension", encoding="utf-8")
  (folder / "empty.md").write_text("", encoding="utf-8")
  return folder, good, len(prefix) + 3  # the byte offset of é in latin1.txt


def _prepare_cli(*args):
  return subprocess.run([sys.executable, "-m", "train.prepare_data", *map(str, args)], capture_output=True,
                        text=True, timeout=120)


def test_prepare_strict_names_the_file_and_byte_offset(tmp_path, rng):
  folder, _, offset = _messy_folder(tmp_path, rng)
  result = _prepare_cli("--input", folder, "--output", tmp_path / "out")
  assert result.returncode == 2 and "Traceback" not in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1
  assert f"latin1.txt: byte {offset} (0xe9) is not UTF-8" in result.stderr, result.stderr
  assert not (tmp_path / "out" / "meta.json").exists()


@pytest.mark.parametrize("errors", ["replace", "skip"])
def test_prepare_replace_or_skip_and_the_summary(tmp_path, rng, errors):
  folder, good, _ = _messy_folder(tmp_path, rng)
  result = _prepare_cli("--input", folder, "--output", tmp_path / "out", "--errors", errors, "--eval-fraction", 0)
  assert result.returncode == 0, result.stderr
  out = result.stdout
  assert f"{folder / 'README'}: extension not in .txt .md .jsonl" in out and f"{folder / 'empty.md'}: empty" in out
  tok = load_prepared_tokenizer(str(tmp_path / "out"))
  data = TokenFile(str(tmp_path / "out"), "train")
  docs = sorted(tok.decode(data.document(i)) for i in range(data.num_docs))
  if errors == "skip":
    assert docs == [good] and f"{folder / 'latin1.txt'}: not UTF-8 (--errors skip)" in out
    assert "1 file(s) taken:" in out and "3 file(s) skipped:" in out
  else:
    assert docs == sorted([good, "plain ascii then caf\ufffd cr\ufffdme"])
    assert "2 file(s) taken:" in out and "2 file(s) skipped:" in out
  assert "train: " in out and "eval: 0 document(s), 0 tokens" in out and "stored as uint16" in out


def test_prepare_extensions_option_takes_other_files(tmp_path, rng):
  folder, _, _ = _messy_folder(tmp_path, rng)
  meta = prepare([str(folder)], str(tmp_path / "out"), "byte", eval_fraction=0.0, errors="skip",
                 extensions=["txt", ""])
  assert sorted(meta["documents_per_file"]) == [str(folder / "README"), str(folder / "good.txt")]  # "": no suffix


@pytest.mark.parametrize("args, message", [
    (["--eval-fraction", "2"], "--eval-fraction: 2.0 is not in [0, 1)"),
    (["--eval-fraction", "-0.1"], "--eval-fraction: -0.1 is not in [0, 1)"),
    (["--extensions", ".rst"], "no files with extensions .rst"),
    (["--tokenizer", "/nonexistent/tokenizer.json"], "'/nonexistent/tokenizer.json': no such file"),
])
def test_prepare_refuses_bad_options_in_one_line(tmp_path, rng, args, message):
  folder, _, _ = _messy_folder(tmp_path, rng)
  result = _prepare_cli("--input", folder, "--output", tmp_path / "out", "--errors", "skip", *args)
  assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1, (
      result.stderr)


def test_prepare_refuses_empty_input(tmp_path):
  (tmp_path / "in").mkdir()
  (tmp_path / "in" / "empty.txt").write_text("")
  result = _prepare_cli("--input", tmp_path / "in", "--output", tmp_path / "out")
  assert result.returncode == 2 and "no text in 1 file(s)" in result.stderr, result.stderr
