"""English text from Debian's documentation packages, as files `python -m train.prepare_data` reads:
`python -m train.data.debian_docs --input UNPACKED... --output TEXT_DIR`.

The packages (nothing here downloads; apt-get does, on a machine that reaches a Debian mirror):

  mkdir -p /tmp/debdocs && cd /tmp/debdocs
  apt-get download linux-doc-6.1 python3.11-doc    # linux-doc itself is an empty meta-package
  dpkg -x linux-doc-6.1_*.deb linux && dpkg -x python3.11-doc_*.deb python

Each package ships its reStructuredText sources and the HTML built from them (linux-doc also the sources again,
copied under html/_sources). The sources are the text, so only they are taken: `*.rst` and `*.txt` files, gzipped
or not (Python's sources are html/_sources/**/*.rst.txt); HTML, YAML device-tree schemas, images and scripts are
left out. A document whose bytes were already taken (the same file under two names) is taken once, so the same
text cannot land in both the train and the eval split. Each document becomes one .txt file under TEXT_DIR,
named after its path, ready for

  python -m train.prepare_data --input TEXT_DIR --output data/linux-doc --tokenizer RUN_DIR/tokenizer.json \\
      --extensions .txt --errors replace

(a few kernel documents hold Latin-1 bytes; `replace` keeps the rest of their text).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import sys
from collections.abc import Iterator, Sequence

TAKEN_SUFFIXES = (".rst", ".txt")  # after a .gz is stripped


def documents(root: str) -> Iterator[tuple[str, bytes]]:
  """(path relative to `root` without .gz, bytes) of every text source under `root`, in sorted order."""
  for folder, dirs, names in os.walk(root):
    dirs.sort()
    for name in sorted(names):
      path = os.path.join(folder, name)
      plain = name[:-3] if name.endswith(".gz") else name
      if os.path.islink(path) or not plain.endswith(TAKEN_SUFFIXES):
        continue
      with (gzip.open(path) if name.endswith(".gz") else open(path, "rb")) as f:
        yield os.path.relpath(os.path.join(folder, plain), root), f.read()


def extract(inputs: Sequence[str], output: str) -> dict[str, int]:
  """Writes each distinct non-empty document of `inputs` to `output` as a .txt file; returns counts."""
  seen: set[bytes] = set()
  counts = dict(documents=0, duplicates=0, empty=0, bytes=0)
  for root in inputs:
    if not os.path.isdir(root):
      raise FileNotFoundError(f"--input {root}: no such folder (an unpacked package: dpkg -x PACKAGE.deb FOLDER)")
    top = os.path.basename(os.path.normpath(root))
    for rel, raw in documents(root):
      digest = hashlib.sha256(raw.strip()).digest()
      if not raw.strip():
        counts["empty"] += 1
        continue
      if digest in seen:
        counts["duplicates"] += 1
        continue
      seen.add(digest)
      target = os.path.join(output, top, rel if rel.endswith(".txt") else f"{rel}.txt")
      os.makedirs(os.path.dirname(target), exist_ok=True)
      with open(target, "wb") as f:
        f.write(raw)
      counts["documents"] += 1
      counts["bytes"] += len(raw)
  return counts


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m train.data.debian_docs", description=__doc__.split("\n\n")[0])
  p.add_argument("--input", nargs="+", required=True, help="folders of unpacked packages (dpkg -x)")
  p.add_argument("--output", required=True, help="folder for the .txt documents")
  args = p.parse_args(argv)
  try:
    counts = extract(args.input, args.output)
  except FileNotFoundError as e:
    print(f"debian_docs: {e}", file=sys.stderr)
    return 2
  print(f"{counts['documents']} documents ({counts['bytes'] / 2**20:.1f} MiB) -> {args.output}; "
        f"{counts['duplicates']} duplicates and {counts['empty']} empty files left out")
  return 0


if __name__ == "__main__":
  sys.exit(main())
