"""`python -m train.linearize --config configs/lolcats/<name>.yaml [--stage all|transfer|lora] [key=value ...]`
linearizes a Transformer run directory with the LoLCATs recipe (train/linearize/recipe.py);
`python -m train.linearize eval --run DIR --data DATA_DIR` reports a run's held-out perplexity
(train/linearize/evaluate.py). Bad settings exit with code 2 and a line naming the key.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from train.config import ConfigError
from train.linearize.config import STAGES, load_linearize_config


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv[:1] == ["eval"]:
    from train.linearize.evaluate import main as eval_main
    return eval_main(argv[1:])
  p = argparse.ArgumentParser(prog="python -m train.linearize", description=__doc__.split("\n\n")[0])
  p.add_argument("--config", required=True, help="a recipe YAML (configs/lolcats/)")
  p.add_argument("--stage", default="all", choices=STAGES, help="transfer: stage 1 only; lora: from out/stage1")
  p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. transfer.steps=10")
  args = p.parse_args(argv)
  from train.linearize.recipe import linearize
  try:
    summary = linearize(load_linearize_config(args.config, args.overrides), args.stage)
  except ConfigError as e:
    print(f"linearize: {e}", file=sys.stderr)
    return 2
  print(f"done in {summary['wall_s']:.0f}s: {summary['out']} (summary.json there)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
