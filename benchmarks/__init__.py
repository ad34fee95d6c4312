"""Benchmarks: `python -m benchmarks <op>` times our implementations of an op against peer libraries.

harness.py times one candidate (warm-up, median of synchronised samples), report.py prints the table and appends
the JSON lines, peers.py imports the peer libraries behind guards, and one module per op (attention.py,
based.py) holds its shapes, FLOP count and candidates. docs/benchmarks.md describes the output.
"""
