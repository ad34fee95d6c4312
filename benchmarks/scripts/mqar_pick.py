"""Reads mqar_point_time.sh's lines and prints the `--set` overrides that take each op's fastest path.

One override per timed op, `model.implementation.<op>=<label>` for its fastest label, `auto` included (the sweep
files set some ops' paths themselves; gpu_session.sh's `pick` step adds the overrides to SWEEP_SET). An op's labels
are compared on the sum of their tokens/s over the op's timed points, and only labels that ran every point compete:
a path that failed or was not timed somewhere is not known to work there. An op timed under `auto` alone, or
without `auto`, gets no override.
Usage: python3 benchmarks/scripts/mqar_pick.py point_time.log
"""
import collections
import re
import sys

# The sweep run name's architecture -> the op whose implementation the sweep's model config names.
OP_OF_ARCHITECTURE = {"based": "based", "h3": "long_conv", "hyena": "long_conv", "attention": "attention"}
LINE = re.compile(r"^\^?(?P<arch>[a-z_0-9]+?)-L\S+\s+(?P<label>\S+)\s+(?P<rest>.*)$")
RATE = re.compile(r"([\d,]+) tokens/s")


def pick(lines: list[str]) -> list[str]:
  rates = collections.defaultdict(lambda: collections.defaultdict(list))  # op -> label -> tokens/s per point
  for line in lines:
    match = LINE.match(line.strip())
    if not match or match["arch"] not in OP_OF_ARCHITECTURE:
      continue
    rate = RATE.search(match["rest"])
    rates[OP_OF_ARCHITECTURE[match["arch"]]][match["label"]].append(
        float(rate.group(1).replace(",", "")) if rate else None)
  overrides = []
  for op, by_label in rates.items():
    points = max(len(v) for v in by_label.values())
    complete = {label: sum(v) for label, v in by_label.items() if len(v) == points and None not in v}
    if "auto" in complete and len(complete) > 1:
      overrides.append(f"model.implementation.{op}={max(complete, key=complete.get)}")
  return overrides


if __name__ == "__main__":
  with open(sys.argv[1]) as f:
    print(" ".join(pick(f.readlines())))
