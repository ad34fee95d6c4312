"""Tokenize local text into memory-mapped token files: `python -m train.prepare_data --input ... --output DIR`.

Inputs are files or folders (searched recursively) of .txt / .md (one document per file) and .jsonl (one document
per line, its `--text-field`, default "text"). `--tokenizer` is `byte`, `bpe:<vocab>` (a byte-level BPE trained
here on the inputs with the `tokenizers` package; nothing is downloaded) or a path to a tokenizer.json.
A deterministic `--eval-fraction` of the documents forms the eval split. Layout: see train/data/text.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections.abc import Iterator, Sequence

import numpy as np

from train.data.text import load_tokenizer, train_bpe

TEXT_SUFFIXES = (".txt", ".md")


def find_files(inputs: Sequence[str]) -> list[str]:
  """The .txt/.md/.jsonl files named or under the named folders, sorted (a stable document order)."""
  files = []
  for item in inputs:
    if os.path.isdir(item):
      for root, _, names in os.walk(item):
        files += [os.path.join(root, n) for n in names if n.endswith(TEXT_SUFFIXES + (".jsonl",))]
    elif os.path.isfile(item):
      files.append(item)
    else:
      raise FileNotFoundError(f"--input {item}: no such file or folder")
  if not files:
    raise FileNotFoundError(f"--input {list(inputs)}: no .txt, .md or .jsonl files")
  return sorted(files)


def read_documents(files: Sequence[str], text_field: str = "text") -> Iterator[str]:
  """Every document's text, in file order."""
  for path in files:
    if path.endswith(".jsonl"):
      with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
          if line.strip():
            record = json.loads(line)
            if text_field not in record:
              raise KeyError(f"{path}:{n}: no {text_field!r} field")
            yield record[text_field]
    else:
      with open(path, encoding="utf-8") as f:
        yield f.read()


def eval_mask(num_docs: int, eval_fraction: float, seed: int = 0) -> np.ndarray:
  """True for the documents held out for eval (at least one when the fraction is positive and docs > 1)."""
  mask = np.zeros(num_docs, bool)
  count = int(round(num_docs * eval_fraction))
  if eval_fraction > 0 and num_docs > 1:
    count = min(max(count, 1), num_docs - 1)
    mask[np.random.default_rng(seed).permutation(num_docs)[:count]] = True
  return mask


def write_split(directory: str, split: str, docs: list[list[int]], dtype: np.dtype) -> dict:
  starts = np.zeros(len(docs) + 1, np.int64)
  starts[1:] = np.cumsum([len(d) for d in docs])
  tokens = np.memmap(os.path.join(directory, f"{split}.bin"), dtype=dtype, mode="w+", shape=(max(starts[-1], 1),))
  for doc, start in zip(docs, starts):
    tokens[start:start + len(doc)] = doc
  tokens.flush()
  np.save(os.path.join(directory, f"{split}.docs.npy"), starts)
  return dict(tokens=int(starts[-1]), docs=len(docs))


def prepare(inputs: Sequence[str], output: str, tokenizer: str = "byte", eval_fraction: float = 0.01,
            text_field: str = "text", seed: int = 0) -> dict:
  """Tokenize `inputs` into `output`; returns the written meta."""
  files = find_files(inputs)
  texts = list(read_documents(files, text_field))
  os.makedirs(output, exist_ok=True)
  if tokenizer.startswith("bpe:"):
    tok = train_bpe(texts, int(tokenizer.split(":", 1)[1]))
    tok.tokenizer.save(os.path.join(output, "tokenizer.json"))
  else:
    tok = load_tokenizer(tokenizer)
    if tokenizer != "byte":
      shutil.copyfile(tokenizer, os.path.join(output, "tokenizer.json"))
  dtype = np.dtype(np.uint16 if tok.vocab_size <= 2**16 else np.uint32)
  held_out = eval_mask(len(texts), eval_fraction, seed)
  encoded = [tok.encode(t) for t in texts]
  meta = dict(dtype=dtype.name, vocab_size=tok.vocab_size, tokenizer=tok.spec, files=len(files),
              splits={split: write_split(output, split, [d for d, e in zip(encoded, held_out) if e == want], dtype)
                      for split, want in (("train", False), ("eval", True))})
  with open(os.path.join(output, "meta.json"), "w") as f:
    json.dump(meta, f, indent=2)
  return meta


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m train.prepare_data", description=__doc__.splitlines()[0])
  parser.add_argument("--input", nargs="+", required=True, help="files or folders of .txt/.md/.jsonl")
  parser.add_argument("--output", required=True, help="directory for the token files")
  parser.add_argument("--tokenizer", default="byte", help="byte | bpe:<vocab> | path/to/tokenizer.json")
  parser.add_argument("--eval-fraction", type=float, default=0.01, help="share of documents held out")
  parser.add_argument("--text-field", default="text", help="the jsonl field holding a document's text")
  parser.add_argument("--seed", type=int, default=0, help="seed of the eval split")
  args = parser.parse_args(argv)
  meta = prepare(args.input, args.output, args.tokenizer, args.eval_fraction, args.text_field, args.seed)
  print(json.dumps(meta))


if __name__ == "__main__":
  main()
