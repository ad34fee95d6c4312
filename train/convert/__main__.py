"""`python -m train.convert <subcommand> [options]`: each subcommand is a module with `main(argv) -> int`, imported
only when that subcommand runs (so one converter's dependencies never load for another).

  hf-import   Hugging Face Llama/Mistral/Qwen2 directory -> run directory   (train/convert/hf_import.py)
  hf-export   run directory -> Hugging Face directory                       (train/convert/hf_export.py)
  gguf-import llama.cpp GGUF file (Llama) -> run directory, via hf-import     (train/convert/gguf_import.py)
  monarch     dense -> Monarch projections                                  (train/convert/monarch.py)
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

SUBCOMMANDS = {
    "hf-import": "train.convert.hf_import",
    "hf-export": "train.convert.hf_export",
    "gguf-import": "train.convert.gguf_import",
    "monarch": "train.convert.monarch",
}


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help"):
    print(__doc__.strip())
    return 0 if argv else 2
  name, rest = argv[0], argv[1:]
  if name not in SUBCOMMANDS:
    print(f"convert: unknown subcommand {name!r}; choose from {sorted(SUBCOMMANDS)}", file=sys.stderr)
    return 2
  return importlib.import_module(SUBCOMMANDS[name]).main(rest)


if __name__ == "__main__":
  sys.exit(main())
