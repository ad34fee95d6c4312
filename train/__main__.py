"""`python -m train --config configs/<name>.yaml [key=value ...]`: train with dotted overrides.

Multi-host: one such command per process, with --coordinator/--num-processes/--process-id (or their environment
variables, train/distributed.py); docs/training.md, "Multi-host training".

Exit codes: 0 done (or early-stopped), 2 a bad setting or an unusable checkpoint (one line, before any
compilation where it can be found early), 1 a run that cannot go on (e.g. every step non-finite, or the other
processes never joined), 128 + N stopped by signal N after saving a checkpoint."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from train import distributed, overlap
from train.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m train", description=__doc__)
  parser.add_argument("--config", help="a YAML training config (configs/mqar/*.yaml, configs/train/*.yaml)")
  parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=3e-4 steps=100")
  parser.add_argument("--overlap", action="store_true",
                      help="add XLA's GPU flags that overlap collectives with compute (train/overlap.py) "
                           "[JAXLM_OVERLAP=1]")
  distributed.add_arguments(parser)
  args = parser.parse_args(argv)
  try:
    config = load_config(args.config, args.overrides)
    cluster = distributed.cluster_from(args)
  except (ConfigError, ValueError) as e:
    print(f"config error: {e}", file=sys.stderr)
    return 2
  # jax's backends start only once the config is known to be valid; XLA_FLAGS and joining the others come first
  if args.overlap or os.environ.get("JAXLM_OVERLAP") == "1":
    overlap.apply()
  try:
    distributed.initialize(cluster, force=config.mesh.distributed)
  except Exception as e:  # jax raises its runtime error type for a coordinator that never answers
    print(f"distributed start-up failed ({cluster}): {type(e).__name__}: {(str(e).splitlines() or [''])[0]}",
          file=sys.stderr)
    return 1
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
