"""`python -m benchmarks <op> ...`: time our implementations of an op against its peers; see docs/benchmarks.md.

  python -m benchmarks attention --shapes tiny --repeats 2
  python -m benchmarks based --impls reference pallas --peer fla:fused_chunk_based --modes fwd
  python -m benchmarks attention_decode --impls reference pallas     # GB/s against the device's copy rate
  python -m benchmarks long_conv --impls pallas reference             # GB/s against the copy rate, vs XLA's FFT
  python -m benchmarks monarch --impls pallas xla                     # the Monarch MLP against the dense one
  python -m benchmarks matmul                                         # the bf16 8192³ matmul rate (a yardstick)
  python -m benchmarks attention --impls hopper --profile             # each row's kernels and their device time

Progress goes to stderr as rows complete; stdout ends with the table. Exit status 1 when a row failed with an
unexpected error (unsupported shapes and OOM are results, not failures).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

OPS = ("attention", "based", "attention_decode", "based_decode", "long_conv", "monarch", "matmul")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
  parser.add_argument("op", choices=OPS)
  parser.add_argument("--shapes", nargs="+", default=["default"],
                      help="shape names or sets (default, tiny, all; attention also window)")
  parser.add_argument("--impls", nargs="+", default=None, help="our implementation= names (default: reference)")
  parser.add_argument("--peer", default=None, help="peer the ratio column is taken against (default per op)")
  parser.add_argument("--peers", nargs="*", default=None, help="peers to time (default: every available one)")
  parser.add_argument("--modes", nargs="+", choices=("fwd", "fwd_bwd"), default=["fwd", "fwd_bwd"])
  parser.add_argument("--dtype", choices=("bf16", "f16", "f32"), default="bf16")
  parser.add_argument("--repeats", type=int, default=20, help="timed samples per row; the median is reported")
  parser.add_argument("--out", default="benchmarks/results", help="folder for <op>-<UTC date>.jsonl")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--profile", action="store_true",
                      help="after each row's timing, trace one sample and print its kernels' device time")
  args = parser.parse_args(argv)
  if args.repeats < 1:
    parser.error(f"--repeats must be positive, got {args.repeats}")
  return args


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  # jax would otherwise take 75% of the GPU at start-up, leaving torch peers (fla) too little to run.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  from benchmarks import harness, report

  suite: harness.Suite = importlib.import_module(f"benchmarks.{args.op}").SUITE
  shapes = suite.resolve_shapes(args.shapes)
  ours = suite.ours(args.impls or suite.default_impls)
  peers = suite.peers()
  if args.peers is not None:
    wanted = set(args.peers) | ({args.peer} if args.peer else set())
    unknown = wanted - {p.name for p in peers}
    if unknown:
      raise SystemExit(f"{args.op}: unknown peers {sorted(unknown)}; peers: {[p.name for p in peers]}")
    peers = [p for p in peers if p.name in wanted]
  candidates = [c for c in ours + peers if isinstance(c, harness.Candidate)]
  skipped = {c.name: c.reason for c in ours + peers if isinstance(c, harness.Skipped)}
  available = [c.name for c in candidates]
  ratio_peer = args.peer or next((name for name in suite.ratio_peers if name in available), None)

  rows = []
  modes = [mode for mode in args.modes if mode in suite.modes]
  for shape in shapes:
    for mode in modes:
      for candidate in candidates:
        row = harness.measure(candidate, suite, shape, mode, args.dtype, args.repeats, args.seed, args.profile)
        shown = f"{row.ms:.3f} ms" if row.ms is not None else f"{row.status} {row.detail}"
        print(f"[{args.op}] {row.impl} {row.shape} {row.mode}: {shown}", file=sys.stderr, flush=True)
        rows.append(row)
  rows = harness.with_ratios(rows, ratio_peer)

  env = report.environment(argv)
  path = report.write_jsonl(rows, op=args.op, out_dir=args.out, env=env, unit=suite.unit, dtype=args.dtype,
                            repeats=args.repeats, ratio_peer=ratio_peer, shapes=suite.shapes, skipped=skipped)
  for name, reason in skipped.items():
    print(f"skipped: {name}: {reason}")
  if ratio_peer is None:
    print("ratio: no peer available in this run, no ratios")
  elif ratio_peer not in available:
    print(f"ratio: peer {ratio_peer} was not measured in this run, no ratios")
  print(f"{args.op} on {env['device']} ({env['backend']}), jax {env['jax_version']}, {args.dtype}, "
        f"median of {args.repeats}; {len(rows)} rows appended to {path}")
  if args.profile:  # before the table, which ends stdout
    from benchmarks import kernel_profile
    for row in rows:
      if row.status == "ok":
        print(f"kernels of {row.impl} {row.shape} {row.mode} ({row.ms:.3f} ms per call):")
        print(kernel_profile.format_breakdown(row.kernels))
  print(report.format_table(rows, unit=suite.unit, ratio_peer=ratio_peer))
  return 1 if any(row.status == "error" for row in rows) else 0


if __name__ == "__main__":
  sys.exit(main())
