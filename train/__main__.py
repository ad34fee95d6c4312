"""`python -m train --config configs/<name>.yaml [key=value ...]`: train with dotted overrides.

Exit codes: 0 done (or early-stopped), 2 a bad setting or an unusable checkpoint (one line, before any
compilation where it can be found early), 1 a run that cannot go on (e.g. every step non-finite), 128 + N
stopped by signal N after saving a checkpoint."""

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
  except ConfigError as e:
    print(f"config error: {e}", file=sys.stderr)
    return 2
  # jax is imported only once the config is known to be valid
  from train.checkpoint import CheckpointError
  from train.run import TrainingError, train
  try:
    summary = train(config)
  except ConfigError as e:
    print(f"config error: {e}", file=sys.stderr)
    return 2
  except CheckpointError as e:
    print(f"checkpoint error: {e}", file=sys.stderr)
    return 2
  except TrainingError as e:
    print(f"training stopped: {e}", file=sys.stderr)
    return 1
  if summary.get("interrupted"):
    return 128 + int(getattr(signal, summary["signal"]))
  return 0


if __name__ == "__main__":
  sys.exit(main())
