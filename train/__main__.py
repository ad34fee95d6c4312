"""`python -m train --config configs/<name>.yaml [key=value ...]`: train with dotted overrides."""

from __future__ import annotations

import argparse
import signal
import sys

from train.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m train", description=__doc__)
  parser.add_argument("--config", help="a YAML training config (configs/mqar/*.yaml, configs/train/*.yaml)")
  parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=3e-4 steps=100")
  args = parser.parse_args(argv)
  try:
    config = load_config(args.config, args.overrides)
    from train.run import train  # jax is imported only once the config is known to be valid
    summary = train(config)
  except ConfigError as e:
    print(f"config error: {e}", file=sys.stderr)
    return 2
  if summary.get("interrupted"):
    return 128 + int(getattr(signal, summary["signal"]))
  return 0


if __name__ == "__main__":
  sys.exit(main())
