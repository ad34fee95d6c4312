"""Tokenize local text into memory-mapped token files: `python -m train.prepare_data --input ... --output DIR`.

Inputs are files or folders (searched recursively). In folders, files whose suffix is in `--extensions`
(default .txt .md .jsonl; "" takes files without a suffix) are taken and every other file is listed as skipped;
a file named directly is always taken.
.jsonl files hold one document per line (its `--text-field`, default "text"); any other file is one document.
`--errors` says what happens to bytes that are not UTF-8: `strict` (default) stops with the file and byte
offset, `replace` decodes them as U+FFFD, `skip` leaves the whole file out. Empty files are skipped.
`--tokenizer` is `byte`, `bpe:<vocab>` (a byte-level BPE trained here on the inputs; nothing is downloaded) or a
path to a tokenizer.json. A deterministic `--eval-fraction` in [0, 1) of the documents forms the eval split.
The run ends with a summary: files taken and skipped (with why), documents, tokens per split, the token dtype.
Layout of the output: see train/data/text.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from collections.abc import Sequence

import numpy as np

from jaxlm.tokenizer import load_tokenizer, train_bpe

DEFAULT_EXTENSIONS = (".txt", ".md", ".jsonl")
ERRORS = ("strict", "replace", "skip")
SHOWN_SKIPPED = 10  # skipped files listed per reason (a source tree has many build files)


class PrepareError(ValueError):
  """Input that cannot be prepared; the message names the file or option."""


@dataclasses.dataclass
class Sources:
  """The files to read, and those passed over with the reason."""
  files: list[str]
  skipped: list[tuple[str, str]]  # (path, reason)


def find_files(inputs: Sequence[str], extensions: Sequence[str] = DEFAULT_EXTENSIONS) -> Sources:
  """Named files, and files under named folders whose suffix is in `extensions` ("" for files without one), in a
  stable (sorted) order."""
  extensions = tuple(e if e in ("", ".") or e.startswith(".") else f".{e}" for e in extensions)
  extensions = tuple("" if e == "." else e for e in extensions)
  files, skipped = [], []
  for item in inputs:
    if os.path.isdir(item):
      for root, _, names in os.walk(item):
        for name in names:
          path = os.path.join(root, name)
          if os.path.splitext(name)[1] in extensions:
            files.append(path)
          else:
            skipped.append((path, f"extension not in {' '.join(e or '(none)' for e in extensions)}"))
    elif os.path.isfile(item):
      files.append(item)
    else:
      raise PrepareError(f"--input {item}: no such file or folder")
  if not files:
    raise PrepareError(f"--input {' '.join(inputs)}: no files with extensions {' '.join(extensions)}")
  return Sources(sorted(files), sorted(skipped))


def decode(path: str, raw: bytes, errors: str) -> str | None:
  """The UTF-8 text of a file; None when `errors` is `skip` and it is not UTF-8."""
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    if errors == "strict":
      raise PrepareError(f"{path}: byte {e.start} (0x{raw[e.start]:02x}) is not UTF-8; use --errors replace or "
                         f"--errors skip, or convert the file") from None
    if errors == "skip":
      return None
    return raw.decode("utf-8", errors="replace")


def file_documents(path: str, text: str, text_field: str) -> list[str]:
  """The documents of one file's text: a .jsonl line each, else the whole text."""
  if not path.endswith(".jsonl"):
    return [text]
  docs = []
  for n, line in enumerate(text.splitlines(), 1):
    if line.strip():
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise PrepareError(f"{path}:{n}: not a JSON line ({e.msg})") from None
      if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
        raise PrepareError(f"{path}:{n}: no string field {text_field!r} (set --text-field)")
      docs.append(record[text_field])
  return docs


def read_documents(sources: Sources, text_field: str = "text", errors: str = "strict"
                   ) -> tuple[list[str], dict[str, int]]:
  """(every document's text in file order, documents per file taken); files that are empty, or undecodable
  under `errors=skip`, join `sources.skipped`."""
  texts, per_file = [], {}
  for path in sources.files:
    with open(path, "rb") as f:
      raw = f.read()
    text = decode(path, raw, errors)
    if text is None:
      sources.skipped.append((path, "not UTF-8 (--errors skip)"))
      continue
    docs = [d for d in file_documents(path, text, text_field) if d]
    if not docs:
      sources.skipped.append((path, "empty"))
      continue
    texts += docs
    per_file[path] = len(docs)
  return texts, per_file


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
  # The largest id, so that training checks it against the model's vocabulary without reading the tokens again.
  max_token = max((max(d) for d in docs if d), default=-1)
  return dict(tokens=int(starts[-1]), docs=len(docs), max_token=int(max_token))


def prepare(inputs: Sequence[str], output: str, tokenizer: str = "byte", eval_fraction: float = 0.01,
            text_field: str = "text", seed: int = 0, errors: str = "strict",
            extensions: Sequence[str] = DEFAULT_EXTENSIONS) -> dict:
  """Tokenize `inputs` into `output`; returns the written meta (with `skipped`: [path, reason] pairs)."""
  if not 0.0 <= eval_fraction < 1.0:
    raise PrepareError(f"--eval-fraction: {eval_fraction} is not in [0, 1)")
  if errors not in ERRORS:
    raise PrepareError(f"--errors: {errors!r} is not one of {ERRORS}")
  sources = find_files(inputs, extensions)
  texts, per_file = read_documents(sources, text_field, errors)
  if not texts:
    raise PrepareError(f"--input {' '.join(inputs)}: no text in {len(sources.files)} file(s) (all empty or "
                       f"skipped)")
  try:
    tok = train_bpe(texts, int(tokenizer.split(":", 1)[1])) if tokenizer.startswith("bpe:") else load_tokenizer(
        tokenizer)
  except (FileNotFoundError, ValueError) as e:
    raise PrepareError(f"--tokenizer: {e}") from None
  os.makedirs(output, exist_ok=True)
  if tokenizer.startswith("bpe:"):
    tok.save(os.path.join(output, "tokenizer.json"))
  elif tokenizer != "byte":
    shutil.copyfile(tokenizer, os.path.join(output, "tokenizer.json"))
  dtype = np.dtype(np.uint16 if tok.vocab_size <= 2**16 else np.uint32)
  held_out = eval_mask(len(texts), eval_fraction, seed)
  encoded = [tok.encode(t) for t in texts]
  meta = dict(dtype=dtype.name, vocab_size=tok.vocab_size, tokenizer=tok.spec, files=len(per_file),
              splits={split: write_split(output, split, [d for d, e in zip(encoded, held_out) if e == want], dtype)
                      for split, want in (("train", False), ("eval", True))})
  with open(os.path.join(output, "meta.json"), "w") as f:
    json.dump(meta, f, indent=2)
  return dict(meta, documents_per_file=per_file, skipped=sources.skipped)


def summary(meta: dict, output: str) -> str:
  """What was taken and skipped, and what was written, for a person."""
  lines = [f"{len(meta['documents_per_file'])} file(s) taken:"]
  lines += [f"  {path}: {n} document(s)" for path, n in meta["documents_per_file"].items()]
  if meta["skipped"]:
    lines.append(f"{len(meta['skipped'])} file(s) skipped:")
    for reason in dict.fromkeys(why for _, why in meta["skipped"]):  # each reason once, in order of appearance
      paths = [path for path, why in meta["skipped"] if why == reason]
      lines += [f"  {path}: {reason}" for path in paths[:SHOWN_SKIPPED]]
      if len(paths) > SHOWN_SKIPPED:
        lines.append(f"  ... and {len(paths) - SHOWN_SKIPPED} more: {reason}")
  for split, info in meta["splits"].items():
    lines.append(f"{split}: {info['docs']} document(s), {info['tokens']:,} tokens")
  lines.append(f"tokenizer {meta['tokenizer']} (vocabulary {meta['vocab_size']}), tokens stored as {meta['dtype']} "
               f"in {output}")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m train.prepare_data", description=__doc__.splitlines()[0])
  parser.add_argument("--input", nargs="+", required=True, help="files or folders")
  parser.add_argument("--output", required=True, help="directory for the token files")
  parser.add_argument("--tokenizer", default="byte", help="byte | bpe:<vocab> | path/to/tokenizer.json")
  parser.add_argument("--eval-fraction", type=float, default=0.01, help="share of documents held out, in [0, 1)")
  parser.add_argument("--text-field", default="text", help="the jsonl field holding a document's text")
  parser.add_argument("--extensions", nargs="+", default=list(DEFAULT_EXTENSIONS),
                      help="file suffixes taken from folders (default: .txt .md .jsonl)")
  parser.add_argument("--errors", choices=ERRORS, default="strict", help="what to do with bytes that are not UTF-8")
  parser.add_argument("--seed", type=int, default=0, help="seed of the eval split")
  args = parser.parse_args(argv)
  try:
    meta = prepare(args.input, args.output, args.tokenizer, args.eval_fraction, args.text_field, args.seed,
                   args.errors, args.extensions)
  except PrepareError as e:
    print(f"prepare_data: {e}", file=sys.stderr)
    return 2
  print(summary(meta, args.output))
  return 0


if __name__ == "__main__":
  sys.exit(main())
