"""The benchmark CLI end to end on tiny shapes (a table on stdout, one JSON line per row) and the arithmetic the
table rests on: visible-pair counts, ratios, failure classification."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import attention, attention_decode, based, based_decode, harness, long_conv, matmul, monarch, report

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run_cli(*args: str, out: pathlib.Path) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
  return subprocess.run([sys.executable, "-m", "benchmarks", *args, "--out", str(out)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def _table_rows(stdout: str) -> list[list[str]]:
  """The cells of the table that ends stdout (header and rule excluded)."""
  lines = stdout.rstrip().splitlines()
  assert lines and lines[-1].startswith("| "), f"stdout does not end with a table:\n{stdout}"
  start = max(i for i, line in enumerate(lines) if line.startswith("| implementation"))
  return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[start + 2:]]


# On a GPU only jax.nn:xla of the attention peers runs here (tokamax compiles for long): the test stays < 60 s.
@pytest.mark.parametrize("op, extra", [
    ("attention", ["--impls", "reference", "no-such-impl", "--peers", "jax.nn:xla"]),
    ("based", []),
    ("attention_decode", ["--impls", "reference", "pallas"]),
    ("based_decode", ["--impls", "reference", "pallas"]),
    ("long_conv", ["--impls", "reference", "pallas", "direct"]),
    ("monarch", ["--impls", "reference", "pallas", "xla"]),
])
def test_cli_prints_table_last_and_appends_json_lines(op, extra, tmp_path):
  result = _run_cli(op, "--shapes", "tiny", "--repeats", "2", *extra, out=tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = _table_rows(result.stdout)
  suite = {"attention": attention.SUITE, "based": based.SUITE, "attention_decode": attention_decode.SUITE,
           "based_decode": based_decode.SUITE, "long_conv": long_conv.SUITE, "monarch": monarch.SUITE}[op]
  tiny = suite.shape_sets["tiny"]
  ours = [r for r in rows if r[0] == "reference"]
  assert {(r[1], r[2]) for r in ours} == {(s, m) for s in tiny for m in suite.modes}
  assert all(float(r[3]) > 0 for r in ours), rows
  if op == "attention":  # an implementation the api rejects is a row, not a crash
    assert {r[6].split(":")[0] for r in rows if r[0] == "no-such-impl"} == {"unsupported"}
    assert [r[5] for r in rows if r[0] == "jax.nn:xla"] == ["1.00x"] * 2 * len(tiny)  # the ratio peer
  if op.endswith("_decode"):  # memory-bound: GB/s against the same run's device copy, and no backward rows
    assert [r[5] for r in rows if r[0] == "xla:copy"] == ["1.00x"] * len(tiny)
    assert all(r[0] != "pallas" or float(r[3]) > 0 for r in rows) and {r[2] for r in rows} == {"fwd"}
  if op == "long_conv":  # GB/s in both modes, ratios against XLA's FFT; the copy rate is a forward-only row
    assert [r[5] for r in rows if r[0] == "reference"] == ["1.00x"] * 2 * len(tiny)
    assert all(float(r[4]) > 0 for r in rows if r[0] in ("pallas", "direct"))
    copy = {r[2]: r for r in rows if r[0] == "xla:copy"}
    assert float(copy["fwd"][4]) > 0 and copy["fwd_bwd"][6].startswith("unsupported")
  if op == "monarch":  # the fused kernel and the XLA form timed beside the dense MLP, ratios against it
    assert [r[5] for r in rows if r[0] == "xla:dense"] == ["1.00x"] * 2 * len(tiny)
    assert all(float(r[4]) > 0 for r in rows if r[0] in ("pallas", "xla"))

  files = list(tmp_path.glob(f"{op}-*.jsonl"))
  assert len(files) == 1, files
  records = [json.loads(line) for line in files[0].read_text().splitlines()]
  assert len(records) == len(rows)
  for record in records:
    assert record["op"] == op and record["command"].startswith(f"python -m benchmarks {op}")
    assert {"device", "jax_version", "timestamp", "shape_params", "status", "ms"} <= record.keys()
  ok = [r for r in records if r["impl"] == "reference"]
  rate_key = "tflops" if suite.unit == "TFLOP/s" else "gbps"
  assert all(r["status"] == "ok" and r["ms"] > 0 and r[rate_key] > 0 for r in ok)


def test_matmul_yardstick_prints_its_rate(tmp_path):
  assert matmul.matmul_flops(matmul.SHAPES["M8192-N8192-K8192"], "fwd") == 2 * 8192 ** 3
  result = _run_cli("matmul", "--shapes", "tiny", "--repeats", "2", out=tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = _table_rows(result.stdout)
  assert [(r[0], r[1], r[2], r[5]) for r in rows] == [("xla:dot", "tiny-M128-N128-K128", "fwd", "1.00x")]
  assert float(rows[0][4]) > 0


@pytest.mark.parametrize("name", sorted(attention.SHAPES))
@pytest.mark.parametrize("seq_len", [200, 1500])  # below and above the widest window
def test_visible_pairs_counts_the_reference_mask(name, seq_len):
  shape = dataclasses.replace(attention.SHAPES[name], seq_len=seq_len)
  t = np.arange(seq_len)[:, None]
  s = np.arange(seq_len)[None, :]
  mask = np.ones((seq_len, seq_len), bool)
  if shape.causal:
    mask &= s <= t
  if shape.window is not None:
    mask &= t - s < shape.window
  if shape.documents:
    ids = attention.segment_ids(shape)
    mask &= ids[:, None] == ids[None, :]
  assert attention.visible_pairs(shape) == mask.sum()


def test_flop_counts_follow_the_documented_conventions():
  causal = attention.SHAPES["B4-S4096-H16-D128-causal"]
  full = attention.SHAPES["B4-S4096-H16-D128"]
  assert attention.attention_flops(full, "fwd") == 4 * 4 * 16 * 128 * 4096**2
  assert attention.attention_flops(causal, "fwd") == pytest.approx(attention.attention_flops(full, "fwd") / 2,
                                                                   rel=1e-3)
  assert attention.attention_flops(causal, "fwd_bwd") == 3.5 * attention.attention_flops(causal, "fwd")
  shape = based.SHAPES["B8-T2048-H16-F16-D64"]
  per_token_head = 2 * 64 * (16 + 64 + 1) + 4 * 273 * 65
  assert based.based_flops(shape, "fwd") == 8 * 2048 * 16 * per_token_head


def test_decode_byte_counts_match_the_arrays_moved():
  """Bytes = what the arrays hold: the KV cache read once; the float32 BASED state read and written once."""
  shape = attention_decode.SHAPES["B64-S8192-H16-K4-D128"]
  (q, k_cache, v_cache), out = attention_decode.array_shapes(shape)
  moved = (np.prod(k_cache) + np.prod(v_cache) + np.prod(q) + np.prod(out)) * 2
  assert attention_decode.decode_bytes(shape, "fwd", 2) == moved
  shape = based_decode.SHAPES["B128-H16-F16-D64"]
  inputs, out = based_decode.array_shapes(shape)
  state = sum(np.prod(inputs[i]) for i in based_decode.STATE_INPUTS) * 4
  tokens = (sum(np.prod(s) for s in inputs[:3]) + np.prod(out)) * 2
  assert based_decode.decode_bytes(shape, "fwd", 2) == 2 * state + tokens


def test_long_conv_bytes_count_the_signals():
  """GB/s of the signals a call moves: u, both gates in and y out forward; u, both gates and the cotangent in and
  their three gradients out for the gradient; xla:copy moves the forward's bytes."""
  shape = long_conv.SHAPES["B64-D768-L1024"]
  (u, in_gate, out_gate, k, skip), out = long_conv.array_shapes(shape)
  signal = np.prod(u) * 2
  assert u == in_gate == out_gate == out == (64, 1024, 768) and k == (1024, 768) and skip == (768,)
  assert long_conv.long_conv_bytes(shape, "fwd", 2) == 4 * signal
  assert long_conv.long_conv_bytes(shape, "fwd_bwd", 2) == 7 * signal
  assert set(long_conv.SUITE.shape_sets["default"]) == {"B64-D768-L1024", "B16-D768-L4096", "B4-D768-L16384",
                                                         "B1-D768-L65536"}


def test_monarch_flops_count_each_factor_entry_once_per_token():
  """2 FLOPs per factor entry and token forward (every entry multiplies one value), 3x that with the gradients;
  the dense MLP does 3.2x the forward's FLOPs at E 2048 nb4, 6.4x at nb8."""
  for nblocks, dense_ratio in ((4, 3.2), (8, 6.4)):
    shape = monarch.SHAPES[f"T16384-E2048-I8192-nb{nblocks}"]
    inputs, out = monarch.array_shapes(shape)
    assert inputs[0] == out == (16384, 2048)
    fwd = monarch.monarch_mlp_flops(shape, "fwd")
    assert fwd == 2 * shape.tokens * sum(np.prod(s) for s in inputs[1:5])
    assert monarch.monarch_mlp_flops(shape, "fwd_bwd") == 3 * fwd
    dense = 2 * shape.tokens * (np.prod(inputs[5]) + np.prod(inputs[6]))
    assert dense / fwd == pytest.approx(dense_ratio)
  assert len(monarch.SUITE.shape_sets["default"]) == 12  # tokens 16k, 64k; E 1024, 2048, 4096; nb 4, 8


def test_brief_shapes_exist():
  assert set(attention.SUITE.shape_sets["default"]) == {
      "B4-S4096-H16-D128-causal", "B4-S4096-H16-D128", "B16-S2048-H16-D64-causal", "B1-S16384-H16-D128-causal",
      "B1-S8192-H32-K8-D128-causal", "B1-S8192-H16-D128-causal-W64", "B1-S8192-H16-D128-causal-W256",
      "B1-S8192-H16-D128-causal-W1024"}
  assert set(based.SUITE.shape_sets["default"]) == {
      "B8-T2048-H16-F16-D64", "B2-T16384-H16-F16-D64", "B1-T65536-H16-F16-D64", "B8-T2048-H16-F16-D128"}
  assert [s.name for s in attention.SUITE.resolve_shapes(["tiny", "window"])][-3:] == [
      "B1-S8192-H16-D128-causal-W64", "B1-S8192-H16-D128-causal-W256", "B1-S8192-H16-D128-causal-W1024"]


def test_ratio_is_peer_time_over_row_time_within_shape_and_mode():
  rows = [harness.Row("ours", "a", "fwd", "ok", ms=2.0), harness.Row("peer", "a", "fwd", "ok", ms=3.0),
          harness.Row("ours", "a", "fwd_bwd", "ok", ms=5.0), harness.Row("peer", "a", "fwd_bwd", "OOM"),
          harness.Row("ours", "b", "fwd", "unsupported")]
  ratios = [r.ratio for r in harness.with_ratios(rows, "peer")]
  assert ratios == [1.5, 1.0, None, None, None]
  table = report.format_table(harness.with_ratios(rows, "peer"), unit="TFLOP/s", ratio_peer="peer")
  assert "1.50x" in table.splitlines()[2] and "vs peer" in table.splitlines()[0]


@pytest.mark.parametrize("error, status", [
    (RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 17.2GiB"), "OOM"),
    (type("OutOfMemoryError", (RuntimeError,), {})("CUDA out of memory. Tried to allocate 2 GiB"), "OOM"),
    (ValueError("attention: implementation='pallas' does not support this call: head_dim=96"), "unsupported"),
    (NotImplementedError("mosaic: window not supported"), "unsupported"),
    (TypeError("unexpected keyword argument 'window'"), "error"),
])
def test_failures_are_classified(error, status):
  assert harness.classify_failure(error)[0] == status


def test_decode_breakdown_times_every_part_of_a_step():
  """benchmarks/scripts/decode_breakdown.py on the tiny BASED preset: a row per layer kind's block and mixer, the
  head, their sum and the whole step, all positive."""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
  done = subprocess.run([sys.executable, "benchmarks/scripts/decode_breakdown.py", "--config", "based-tiny",
                         "--batch", "2", "--length", "5", "--steps", "2"], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  lines = done.stdout.rstrip().splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith("| part"))
  rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[start + 2:]]
  names = [row[0] for row in rows]
  for kind in ("BaseConv", "Based", "Attention"):
    assert f"{kind} block" in names and f"{kind} mixer" in names
  assert names[-2:] == ["sum of blocks and head", "whole decode step"]
  assert all(float(row[3]) > 0 for row in rows)


def test_mqar_pick_takes_each_ops_fastest_path_that_ran_every_point():
  """benchmarks/scripts/mqar_pick.py on point_time lines: per op the label with the most tokens/s summed over the
  op's points; a label that failed a point is out; an op timed under auto alone gets no override."""
  sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "benchmarks" / "scripts"))
  try:
    from mqar_pick import pick
  finally:
    sys.path.pop(0)
  rate = lambda tokens: f"done at step 80: loss 8.3, 0 skipped step(s), {tokens:,} tokens/s (median of 8 windows)"
  slow = int(np.random.default_rng().integers(2_000_000, 9_000_000))
  fast = 2 * slow
  lines = [f"^based-L256_kv16-d128-lr1.0e-02    auto       {rate(slow)}",
           f"^based-L256_kv16-d128-lr1.0e-02    reference  {rate(fast)}",
           "^based-L256_kv16-d128-lr1.0e-02    quadratic  ",  # cut by its timeout: no line from the run
           f"^h3-L256_kv16-d128-lr1.0e-02       auto       {rate(fast)}",
           f"^h3-L256_kv16-d128-lr1.0e-02       direct     {rate(slow)}",
           f"^hyena-L256_kv16-d128-lr1.0e-02    auto       {rate(slow)}",
           f"^hyena-L256_kv16-d128-lr1.0e-02    direct     {rate(slow + 1)}",
           f"^attention-L64_kv4-d128-lr1.0e-02  auto       {rate(fast)}"]
  # long_conv sums over H3 and Hyena: auto fast + slow beats direct slow + slow + 1.
  assert pick(lines) == ["model.implementation.based=reference", "model.implementation.long_conv=auto"]
  assert pick(lines[:2] + ["^based-L256_kv16-d128-lr1.0e-02    quadratic  " + rate(fast + 1)]) == [
      "model.implementation.based=quadratic"]


def test_loss_vs_time_reads_training_time_and_compares_with_the_baseline(tmp_path):
  """benchmarks/scripts/loss_vs_time.py: training time at an eval is the sum of the windows ending by it; a run's
  time to reach the baseline's final eval loss is its first eval at or below it, over the baseline's own time."""
  sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "benchmarks" / "scripts"))
  try:
    import loss_vs_time
  finally:
    sys.path.pop(0)
  rng = np.random.default_rng()

  def write(name, window_s, losses):  # a window of 5 steps each, an eval every 10 steps
    lines = []
    for i, seconds in enumerate(window_s):
      lines.append({"step": 5 * (i + 1), "loss": 1.0, "window_s": seconds})
      if (i + 1) % 2 == 0:
        lines.append({"step": 5 * (i + 1), loss_vs_time.EVAL_LOSS: losses[i // 2]})
    (tmp_path / name).mkdir()
    (tmp_path / name / "metrics.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return str(tmp_path / name)

  dense_s, fast_s = rng.uniform(1, 2, 6), rng.uniform(0.5, 1, 6)
  dense = loss_vs_time.read_curve("dense", write("dense", dense_s, [5.0, 4.0, 3.0]))
  fast = loss_vs_time.read_curve("monarch", write("monarch", fast_s, [4.5, 2.9, 2.5]))
  never = loss_vs_time.read_curve("never", write("never", fast_s, [4.5, 3.5, 3.1]))
  np.testing.assert_allclose(dense.seconds, np.cumsum(dense_s)[1::2])
  assert dense.steps == (10, 20, 30) and fast.losses[-1] == 2.5
  assert loss_vs_time.time_to_reach(fast, 3.0) == fast.seconds[1]
  rows = loss_vs_time.table([dense, fast, never], "dense").splitlines()
  assert rows[2].endswith("| 1.00x |") and rows[4].endswith("not reached |")
  assert rows[3].endswith(f"| {fast.seconds[1] / dense.seconds[-1]:.2f}x |")


_TRACE = '''
planes {
  id: 1 name: "/device:GPU:0"
  lines { id: 1 name: "Stream #13(Compute)" timestamp_ns: 1000
    events { metadata_id: 1 offset_ps: 0 duration_ps: 6000000 }
    events { metadata_id: 2 offset_ps: 7000000 duration_ps: 2000000 }
    events { metadata_id: 1 offset_ps: 9000000 duration_ps: 4000000 }
    events { metadata_id: 3 offset_ps: 14000000 duration_ps: 1000000 } }
  lines { id: 2 name: "Stream #14(MemcpyH2D)" timestamp_ns: 1000
    events { metadata_id: 4 offset_ps: 0 duration_ps: 3000000 } }
  lines { id: 3 name: "XLA Ops" timestamp_ns: 1000
    events { metadata_id: 1 offset_ps: 0 duration_ps: 6000000 } }
  event_metadata { key: 1 value { id: 1 name: "attention_fwd" } }
  event_metadata { key: 2 value { id: 2 name: "fusion_7" } }
  event_metadata { key: 3 value { id: 3 name: "fusion_8" } }
  event_metadata { key: 4 value { id: 4 name: "MemcpyH2D" } }
}
planes {
  id: 2 name: "/host:CPU"
  lines { id: 1 name: "python" timestamp_ns: 1000
    events { metadata_id: 1 offset_ps: 0 duration_ps: 50000000 } }
  event_metadata { key: 1 value { id: 1 name: "PjitFunction(step)" } }
}
'''


def test_kernel_breakdown_counts_device_streams_only_per_call():
  from jax.profiler import ProfileData

  from benchmarks import kernel_profile
  kernels = kernel_profile.breakdown(ProfileData.from_text_proto(_TRACE), calls=2)
  # Stream events only (not the derived "XLA Ops" line, not the host plane), per call, longest first.
  assert [(k.name, k.launches, k.us) for k in kernels] == [
      ("attention_fwd", 1.0, 5.0), ("MemcpyH2D", 0.5, 1.5), ("fusion_7", 0.5, 1.0), ("fusion_8", 0.5, 0.5)]
  text = kernel_profile.format_breakdown(kernels, top=2)
  assert "attention_fwd" in text and "fusion_8" not in text and "(2 more)" in text
  assert text.splitlines()[-1].split()[:2] == ["8.0", "2.50"]  # the total line: µs and launches per call
  with pytest.raises(ValueError, match="calls=0"):
    kernel_profile.breakdown(ProfileData.from_text_proto(_TRACE), calls=0)


def test_cli_profile_prints_each_rows_kernels_before_the_table(tmp_path):
  result = _run_cli("matmul", "--shapes", "tiny", "--repeats", "1", "--profile", out=tmp_path)
  assert result.returncode == 0, result.stderr
  assert "kernels of xla:dot tiny-M128-N128-K128 fwd" in result.stdout  # on a CPU: the note that none were seen
  assert _table_rows(result.stdout)[0][0] == "xla:dot"
