"""Reported tokens/s agree with wall time. The model does slow device work in each step (dispatch returns at once
and the device is busy long after), so a window closed before the device finished would leave most of the
training time outside every window and report a rate far above the truth: here the windows, compile, setup, eval
and checkpoint time must account for the whole wall time, and the summary's rate is the windows' median."""

import statistics
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.models import LM, load_preset
from train.config import load_config
from train.logs import read_metrics
from train.models import ModelSpec
from train.run import train

BUSY = 512  # the side matrix's size: 48 matmuls of BUSY³ keep a CPU device busy ~0.1 s per step


class _SlowLM(nnx.Module):
  """transformer-tiny plus a chain of matmuls on the side whose (zero) result is added to the logits."""

  def __init__(self, rngs: nnx.Rngs):
    self.lm = LM(load_preset("transformer-tiny"), rngs=rngs)

  def __call__(self, tokens_BT, segment_ids=None):
    logits_BTV = self.lm(tokens_BT, segment_ids=segment_ids)
    x = jax.lax.stop_gradient(logits_BTV[0, 0, 0]).astype(jnp.float32)
    m = jnp.full((BUSY, BUSY), 1.0 / BUSY, jnp.float32) + 0.0 * x
    m = jax.lax.fori_loop(0, 48, lambda _, a: a @ m, m)
    return logits_BTV + 0.0 * m[0, 0]


def test_reported_rate_agrees_with_device_time(tmp_path):
  seq_len, batch, steps, every = 16, 4, 12, 3
  config = load_config(None, [
      "model=transformer-tiny", "data.kind=synthetic", f"data.synthetic_seq_len={seq_len}", f"batch_size={batch}",
      f"steps={steps}", "compute_dtype=float32", f"run_dir={tmp_path / 'run'}", "log.progress=none",
      f"log.every={every}", "eval_every=6", "checkpoint.enabled=false"])
  spec = ModelSpec(model_fn=lambda: _SlowLM(nnx.Rngs(0)), vocab_size=256)
  summary = train(config, model=spec)
  windows = [r for r in read_metrics(str(tmp_path / "run")) if "window_s" in r]
  assert [w["step"] for w in windows] == [3, 6, 9, 12]  # one window per fetch; the eval at 6 lies between two
  for w in windows:
    assert np.isclose(w["tokens_per_s"], w["window_steps"] * batch * seq_len / w["window_s"])
  rates = [w["tokens_per_s"] for w in windows]
  assert np.isclose(summary["tokens_per_s"], statistics.median(rates[1:]))
  assert np.isclose(summary["train_s"], sum(w["window_s"] for w in windows))
  accounted = sum(summary[k] for k in ("setup_s", "compile_s", "train_s", "eval_s", "checkpoint_s"))
  unaccounted = summary["wall_s"] - accounted
  assert -1e-3 <= unaccounted <= 0.1 * summary["train_s"] + 0.2, summary
  assert summary["compile_s"] > 0


def test_profiled_steps_print_their_kernels_and_count_in_no_window(tmp_path, capsys):
  """log.profile_steps: steps 4-6 run under jax.profiler (a CPU trace has no device kernels, and says so) and
  fall in no throughput window, so the rate is the untraced steps' alone."""
  config = load_config(None, [
      "model=transformer-tiny", "data.kind=synthetic", "data.synthetic_seq_len=16", "batch_size=4", "steps=12",
      "compute_dtype=float32", f"run_dir={tmp_path / 'run'}", "log.progress=plain", "log.every=3",
      "log.profile_steps=3", "checkpoint.enabled=false"])
  summary = train(config, model=ModelSpec(model_fn=lambda: _SlowLM(nnx.Rngs(0)), vocab_size=256))
  windows = [r for r in read_metrics(str(tmp_path / "run")) if "window_s" in r]
  assert [(w["step"], w["window_steps"]) for w in windows] == [(3, 3), (9, 3), (12, 3)]
  assert np.isclose(summary["train_s"], sum(w["window_s"] for w in windows))
  out = capsys.readouterr().out
  assert "kernels of steps 4-6 under the profiler" in out
  assert "no device kernels in the trace" in out
