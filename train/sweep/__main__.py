"""`python -m train.sweep --config configs/zoology/<sweep>.yaml [--budget NAME] [--only REGEX] [--dry-run]` runs a
sweep (resumable: run it again after a kill); `python -m train.sweep plot runs/<sweep>` draws its figures."""

from __future__ import annotations

import argparse
import os
import sys

from train.config import ConfigError


def _run(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog="python -m train.sweep", description=__doc__)
  parser.add_argument("--config", required=True, help="a sweep file (configs/zoology/*.yaml)")
  parser.add_argument("--budget", help="a reduced schedule named in the sweep file's budgets: section")
  parser.add_argument("--only", help="run only the runs whose name matches this regular expression")
  parser.add_argument("--shard", default="0/1", metavar="I/N",
                      help="run shard I of N (runs assigned by a hash of their name): N processes share the sweep")
  parser.add_argument("--dry-run", action="store_true", help="validate and list the runs; train nothing")
  parser.add_argument("--out", help="output directory (default runs/<name>, runs/<name>-<budget> with --budget)")
  parser.add_argument("--time-limit", type=float, default=0.0, metavar="SECONDS",
                      help="stop (saving the current run's checkpoint) after this long; exit status 3")
  parser.add_argument("--keep-checkpoints", action="store_true",
                      help="keep finished runs' checkpoints (default: deleted once their result line is written)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="a dotted training-config override for every run, applied last (repeatable; run names "
                           "do not change)")
  parser.add_argument("--no-compile-cache", action="store_true",
                      help="do not keep compiled steps in <out>/compile_cache")
  args = parser.parse_args(argv)
  from train.sweep.runner import parse_shard, run_sweep
  from train.sweep.spec import load_sweep
  shard = parse_shard(args.shard)
  sweep = load_sweep(args.config, budget=args.budget, out_dir=args.out, overrides=args.set)
  if not (args.no_compile_cache or args.dry_run):
    _use_compile_cache(os.path.join(sweep.out_dir, "compile_cache"))
  return run_sweep(sweep, only=args.only, shard=shard, dry_run=args.dry_run, time_limit=args.time_limit,
                   keep_checkpoints=args.keep_checkpoints)


def _use_compile_cache(directory: str) -> None:
  """jax's persistent compilation cache in `directory`: a sweep's runs that differ only in learning rate (a value
  in the optimizer state, train/optimizer.py) or seed compile to the same program, so all but the first of them,
  in this process or another shard's, load it instead of compiling (4-23 s a point on the H100)."""
  import jax
  os.makedirs(directory, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _plot(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog="python -m train.sweep plot",
                                   description="figures and a markdown table from a sweep's results.jsonl")
  parser.add_argument("directory", help="the sweep's output directory (runs/<name>)")
  parser.add_argument("--out", help="where to write the PNGs and the table (default: the directory)")
  parser.add_argument("--metric", default="final", help="final (end of each run) or best (best eval)")
  args = parser.parse_args(argv)
  from train.sweep.plot import plot_sweep
  try:
    paths = plot_sweep(args.directory, dest=args.out, metric=args.metric)
  except ImportError as e:
    print(f"plot: wrote the table only; {e.name or 'matplotlib'} is not installed (pip install -e '.[plots]')",
          file=sys.stderr)
    return 2
  print("\n".join(paths))
  return 0


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  try:
    return _plot(argv[1:]) if argv[:1] == ["plot"] else _run(argv)
  except ConfigError as e:
    print(f"config error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
