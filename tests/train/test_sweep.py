"""Sweeps: state sizes against hand counts, sweep-file validation naming the key, and the smoke sweep end to end
(expand, run, stop mid-run, resume, results without duplicates, plot)."""

import io
import json
import os
import signal
import subprocess
import sys

import pytest
import yaml

from jaxlm.models.config import ModelConfig
from jaxlm.models.registry import MIXERS
from jaxlm.models.state_size import STATE_SIZES, mixer_state_size, model_state_size
from train.config import ConfigError
from train.sweep import load_sweep
from train.sweep.plot import pareto_frontier, plot_sweep
from train.sweep.results import RESULTS, read_results
from train.sweep.runner import parse_shard, run_sweep, select

SMOKE = "configs/zoology/smoke.yaml"


def _model(d_model, mixers, num_layers=1, **options):
  return ModelConfig(vocab_size=64, d_model=d_model, num_layers=num_layers, mixers=mixers, mixer_options=options,
                     max_length=1024)


# --- state size --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mixer, options, seq_len, expected", [
    # attention: 2·d·L (MHA), 2·K·D·L with GQA (1 kv head of width 16)
    ("attention", {"num_heads": 4}, 256, 2 * 64 * 256),
    ("attention", {"num_heads": 4, "num_kv_heads": 1}, 256, 2 * 1 * 16 * 256),
    ("attention", {"num_heads": 1, "window": 32}, 256, 2 * 64 * 32),
    # sliding window: 2·d·w, and no more than the sequence holds
    ("sliding_window", {"num_heads": 1, "window": 32}, 256, 2 * 64 * 32),
    ("sliding_window", {"num_heads": 2, "window": 1024}, 256, 2 * 64 * 256),
    # BASED: H·D·X + H·X, X = 1+F+F(F+1)/2 (order-2 pairs once): F=16 -> 153 features, F=8 -> 45
    ("based", {"num_heads": 1, "feature_dim": 16}, 256, 64 * 153 + 153),
    ("based", {"num_heads": 2, "feature_dim": 8}, 4096, 2 * 32 * 45 + 2 * 45),
    ("based", {"num_heads": 1, "feature_dim": 16, "normalize": False}, 256, 64 * 153),
    # BaseConv: taps x conv width (expand·d)
    ("base_conv", {"kernel_size": 3}, 256, 3 * 128),
    ("base_conv", {"kernel_size": 4, "expand": 1}, 256, 4 * 64),
    # H3: shift SSM (N·d) + diagonal SSM (N/2 complex = N floats per channel)
    ("h3", {"state_dim": 16}, 256, 2 * 16 * 64),
    # ... with head dim 2: the diagonal SSM runs over (64/2)·2² = 128 channels
    ("h3", {"state_dim": 16, "head_dim": 2}, 256, 16 * 64 + 16 * 128),
    # Hyena: (order-1)·d·L
    ("hyena", {}, 256, 64 * 256),
    ("hyena", {"order": 3}, 512, 2 * 64 * 512),
])
def test_mixer_state_size_by_hand(mixer, options, seq_len, expected):
  model = _model(64, mixer, **{mixer: options})
  assert mixer_state_size(mixer, model.mixer_configs()[mixer], d_model=64, seq_len=seq_len) == expected


def test_model_state_size_sums_layers():
  """BASED's MQAR layout, 4 layers of BaseConv and BASED alternating, d=128, F=8 (45 features)."""
  model = _model(128, "base_conv; based@1%2", num_layers=4, based={"num_heads": 1, "feature_dim": 8})
  assert model_state_size(model, 1024) == 2 * (3 * 256) + 2 * (128 * 45 + 45)


def test_state_grows_with_length_only_where_it_should():
  for mixer, grows in (("attention", True), ("hyena", True), ("based", False), ("h3", False), ("base_conv", False)):
    options = {"based": {"num_heads": 1}} if mixer == "based" else {}
    model = _model(32, mixer, **options)
    short, long = model_state_size(model, 128), model_state_size(model, 512)
    assert (long == 4 * short) if grows else (long == short), mixer


def test_every_registered_mixer_has_a_state_size():
  assert set(MIXERS) <= set(STATE_SIZES)


def test_pareto_frontier():
  points = [(10, 0.2), (10, 0.5), (20, 0.4), (30, 0.9), (40, 0.9), (50, 1.0), (5, 0.1)]
  assert pareto_frontier(points) == [(5, 0.1), (10, 0.5), (30, 0.9), (50, 1.0)]


# --- sweep files ---------------------------------------------------------------------------------------------------


def _smoke() -> dict:
  with open(SMOKE) as f:
    return yaml.safe_load(f)


def _write(tmp_path, data) -> str:
  data = dict(data)
  data["base"] = os.path.abspath(os.path.join(os.path.dirname(SMOKE), data["base"]))
  path = tmp_path / "sweep.yaml"
  path.write_text(yaml.safe_dump(data, sort_keys=False))
  return str(path)


def test_smoke_expands_to_named_runs(tmp_path):
  sweep = load_sweep(SMOKE, out_dir=str(tmp_path))
  assert [r.name for r in sweep.runs] == ["based-L32_kv4-d16-lr3.0e-03", "attention-L32_kv4-d16-lr3.0e-03"]
  based = sweep.runs[0].config
  assert based.model["mixers"] == "base_conv; based@1" and based.model["d_model"] == 16
  assert based.optim.lr == pytest.approx(3e-3) and based.run_dir == os.path.join(str(tmp_path), sweep.runs[0].name)
  assert sweep.runs[1].state_size == 2 * 16 * 32  # one attention layer at L=32
  tiny = load_sweep(SMOKE, budget="tiny", overrides=["optim.lr=1e-3"])
  assert tiny.out_dir == os.path.join("runs", "smoke-tiny") and all(r.config.steps == 8 for r in tiny.runs)
  assert all(r.config.optim.lr == pytest.approx(1e-3) for r in tiny.runs)


def test_grid_lr_logspace_and_budget(tmp_path):
  data = _smoke()
  data["architectures"]["based"]["grid"] = {"model.d_model": [16, 32],
                                            "model.mixer_options.based.feature_dim": [4, 8]}
  data["lr"] = {"logspace": [-4, -2, 3]}
  data["budgets"] = {"cut": {"lr": [1e-3], "architectures": {"based": {"grid": {"model.d_model": [32]}}}}}
  path = _write(tmp_path, data)
  names = [r.name for r in load_sweep(path).runs]
  assert len(names) == 4 * 3 + 3 and "based-L32_kv4-d32-f8-lr1.0e-02" in names
  assert [r.lr for r in load_sweep(path).runs[:3]] == pytest.approx([1e-4, 1e-3, 1e-2])
  cut = load_sweep(path, budget="cut").runs
  assert [r.name for r in cut] == ["based-L32_kv4-d32-f4-lr1.0e-03", "based-L32_kv4-d32-f8-lr1.0e-03",
                                   "attention-L32_kv4-d16-lr1.0e-03"]


def _set(data, dotted, value):
  node = data
  *parents, last = dotted
  for key in parents:
    node = node[key]
  node[last] = value


@pytest.mark.parametrize("path, value, key", [
    (("colour",), "red", "colour: unknown key"),
    (("architectures", "based", "grid", "model.d_model"), [], "architectures.based.grid.model.d_model: empty grid"),
    (("architectures",), {}, "architectures: empty grid"),
    (("data",), {}, "data: empty grid"),
    (("lr",), [], "lr: empty grid"),
    (("lr",), ["fast"], "lr[0]: "),
    (("lr",), [-1e-3], "lr[0]: "),
    (("lr",), {"logspace": [-4, -2]}, "lr.logspace: "),
    (("seeds",), [1.5], "seeds[0]: "),
    (("architectures", "based", "sett"), {}, "architectures.based.sett: unknown key"),
    (("set", "optim.lrr"), 1, "set.optim.lrr: optim.lrr: unknown key"),
    (("set", "batch_size"), 0, "set.batch_size: batch_size: "),
    (("data", "L32_kv4", "batch_size"), "many", "data.L32_kv4.batch_size: batch_size: "),
    (("architectures", "based", "set", "model.mixer_options"), {"based": {"num_heads": 1, "windw": 3}},
     "architectures.based.set.model.mixer_options: model.mixer_options.based.windw: "),
    (("architectures", "attention", "grid", "model.d_model"), [-16], "architectures.attention.grid.model.d_model: "),
    (("budgets", "tiny", "lr"), [], "budgets.tiny.lr: empty grid"),
    (("name",), "a/b", "name: "),
])
def test_bad_sweep_file_names_the_key(tmp_path, path, value, key):
  data = _smoke()
  _set(data, path, value)
  with pytest.raises(ConfigError) as info:
    load_sweep(_write(tmp_path, data), budget="tiny" if path[0] == "budgets" else None)
  assert str(info.value).startswith(key), str(info.value)


def test_shipped_sweeps_expand():
  zoology, based = load_sweep("configs/zoology/figure2_zoology.yaml"), load_sweep("configs/zoology/figure2_based.yaml")
  assert len(zoology.runs) == 4 * 5 * 4 * 4 and len(based.runs) == (2 + 9 + 8 + 3 + 3) * 4
  reduced = load_sweep("configs/zoology/figure2_based.yaml", budget="reduced")
  assert len(reduced.runs) == 25 * 3 and reduced.out_dir == os.path.join("runs", "figure2_based-reduced")
  by_name = {r.name: r for r in based.runs}
  # BaseConv (3 taps x 64) then BASED (d=64, F=16: 153 features, plus the normaliser), at the longest test length
  assert by_name["based-d64-f16-lr1.0e-03"].state_size == 3 * 64 + 64 * 153 + 153
  assert by_name["h3-d128-n32-lr1.0e-03"].config.model["mixer_options"]["h3"]["state_dim"] == 32
  assert {r.state_len for r in based.runs} == {1024}


def test_only_and_shard_select_runs(tmp_path):
  runs = load_sweep(SMOKE, overrides=()).runs
  assert [r.arch for r in select(runs, "^att")] == ["attention"]
  data = _smoke()
  data["architectures"]["based"]["grid"]["model.d_model"] = [16, 32, 48, 64]
  data["lr"] = [1e-3, 2e-3, 3e-3, 4e-3]
  runs = load_sweep(_write(tmp_path, data)).runs
  shards = [select(runs, None, (i, 4)) for i in range(4)]
  assert sorted(r.name for shard in shards for r in shard) == sorted(r.name for r in runs)  # a partition
  assert all(len({r.lr for r in shard}) > 1 for shard in shards)  # not one learning rate per shard
  for bad in ("2/2", "x", "1/0"):
    with pytest.raises(ConfigError, match="^--shard: "):
      parse_shard(bad)
  with pytest.raises(ConfigError, match="^--only: "):
    select(runs, "(")


def test_cli_reports_a_bad_sweep_in_one_line(tmp_path):
  data = _smoke()
  data["architectures"]["based"]["grid"]["model.d_model"] = []
  result = subprocess.run([sys.executable, "-m", "train.sweep", "--config", _write(tmp_path, data), "--dry-run"],
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 2, result.stderr
  assert result.stderr.strip() == "config error: architectures.based.grid.model.d_model: empty grid"


# --- the smoke sweep end to end ----------------------------------------------------------------------------------


def test_smoke_sweep_stops_resumes_records_and_plots(tmp_path):
  out = str(tmp_path / "smoke")
  sweep = load_sweep(SMOKE, out_dir=out)
  based, attention = (r.name for r in sweep.runs)

  def stop_attention(name, step):
    if name == attention and step == 5:
      os.kill(os.getpid(), signal.SIGTERM)  # as a kill of the sweep mid-run: train saves and returns

  log = io.StringIO()
  assert run_sweep(sweep, on_step=stop_attention, stream=log) == 128 + signal.SIGTERM
  assert [line["name"] for line in read_results(out)] == [based]
  summary = json.load(open(os.path.join(out, attention, "summary.json")))
  assert summary["interrupted"] and summary["step"] == 5
  assert os.listdir(os.path.join(out, attention, "checkpoints")) and not os.path.exists(
      os.path.join(out, based, "checkpoints"))  # the stopped run keeps its checkpoint, the finished one not

  steps = []
  log = io.StringIO()
  assert run_sweep(load_sweep(SMOKE, out_dir=out), on_step=lambda name, step: steps.append((name, step)),
                   stream=log) == 0
  assert f"{based}: finished, skipped" in log.getvalue()
  assert steps == [(attention, s) for s in range(6, 25)]  # resumed after step 5, the finished run not rerun
  assert not os.path.exists(os.path.join(out, attention, "checkpoints"))  # deleted once its line was written
  lines = read_results(out)
  raw = open(os.path.join(out, RESULTS)).read().splitlines()
  assert [line["name"] for line in lines] == [based, attention] and len(raw) == 2
  for line in lines:
    assert line["steps"] == line["total_steps"] == 24 and line["error"] is None
    assert line["num_params"] > 0 and line["state_size"] == {r.name: r.state_size for r in sweep.runs}[line["name"]]
    assert 0.0 <= line["accuracy"] <= line["best_accuracy"] <= 1.0
    assert set(line["per_setting"]) == {"L32_kv4"}
    assert line["per_setting"]["L32_kv4"]["final"] == pytest.approx(line["accuracy"])

  # Killed after its summary but before its line: recorded from the summary, without training again.
  with open(os.path.join(out, RESULTS), "w") as f:
    f.write(raw[0] + "\n")
  log = io.StringIO()
  assert run_sweep(load_sweep(SMOKE, out_dir=out), on_step=lambda *_: pytest.fail("trained again"), stream=log) == 0
  assert "ended before its result was recorded" in log.getvalue()
  assert [line["name"] for line in read_results(out)] == [based, attention]

  # A line written before a setting existed counts it at its default; at another value it is a change.
  lines = [json.loads(r) for r in raw]
  for line in lines:
    del line["config"]["loss_chunk"]
  with open(os.path.join(out, RESULTS), "w") as f:
    f.write("".join(json.dumps(line) + "\n" for line in lines))
  assert run_sweep(load_sweep(SMOKE, out_dir=out), on_step=lambda *_: pytest.fail("trained again"),
                   stream=io.StringIO()) == 0
  with pytest.raises(ConfigError, match=r"\(loss_chunk: 0 -> 8\)"):
    run_sweep(load_sweep(SMOKE, out_dir=out, overrides=("loss_chunk=8",)), stream=io.StringIO())
  # The kernel that runs an op is a speed choice: finished runs are kept.
  assert run_sweep(load_sweep(SMOKE, out_dir=out, overrides=("model.implementation.attention=reference",)),
                   on_step=lambda *_: pytest.fail("trained again"), stream=io.StringIO()) == 0

  # A finished run with other settings is not silently reused.
  with pytest.raises(ConfigError, match=r"^based-L32_kv4-d16-lr3\.0e-03: finished .*\(steps: 24 -> 8\)"):
    run_sweep(load_sweep(SMOKE, out_dir=out, budget="tiny"), stream=io.StringIO())

  figures = str(tmp_path / "figures")
  try:
    paths = plot_sweep(out, dest=figures)
  except ImportError:  # no matplotlib (the plots extra): the table is written first; test_plot_pngs is skipped
    paths = []
  table = open(os.path.join(figures, "smoke.md")).read()
  assert "| based | 351 |" in table and "| attention | 1,024 |" in table
  for path in paths[1:]:
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_pngs(tmp_path):
  """Both figures from a results file of two lengths, three architectures, two widths and two rates."""
  pytest.importorskip("matplotlib")
  lines = []
  for length in (64, 256):
    for arch, state in (("attention", 2 * length), ("based", 300), ("h3", 40)):
      for d_model in (16, 32):
        for lr, acc in ((1e-3, 0.2), (1e-2, 0.9 if arch != "h3" else 0.1)):
          lines.append(dict(name=f"{arch}-L{length}-d{d_model}-lr{lr:.1e}", arch=arch, data=f"L{length}_kv4",
                            options={"model.d_model": d_model}, lr=lr, d_model=d_model,
                            train_settings=[f"L{length}_kv4"], test_settings=[f"L{length}_kv4"],
                            state_size=state * d_model, state_len=length, accuracy=acc, best_accuracy=acc))
  out = tmp_path / "fake"
  out.mkdir()
  (out / RESULTS).write_text("".join(json.dumps(line) + "\n" for line in lines))
  paths = plot_sweep(str(out))
  assert [os.path.basename(p) for p in paths] == ["fake.md", "fake_width.png", "fake_state.png"]
  for path in paths[1:]:
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  table = open(paths[0]).read()
  assert "| h3 | 640 | 0.200 | 16 | lr=1.0e-03 | yes |" in table  # the best rate; smallest state: on the frontier
  assert "| based | 4,800 | 0.900 | 16 | lr=1.0e-02 | yes |" in table and "| based | 9,600 | 0.900 |" in table
