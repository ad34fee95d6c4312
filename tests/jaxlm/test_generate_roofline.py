"""The generation benchmark's sizes: the --batch max formula on known sizes, cache bytes per row and the bytes a
decode step moves against hand counts for tiny models, the bandwidth table, and --batch max through the CLI."""

import argparse

import jax
import pytest
from flax import nnx

import jaxlm.generate.benchmark as generate_benchmark
from jaxlm.generate import roofline
from jaxlm.models import LM, ModelConfig, load_preset
from jaxlm.models.lm import count_params

V, E, K, D, W, I = 64, 32, 2, 8, 3, 64  # vocabulary, width, kv heads, head dim, conv taps, conv width (2·E)


def tiny(dtype="float32", tie=True, **kw) -> LM:
  config = ModelConfig(vocab_size=V, d_model=E, num_layers=3, mixers=["attention", "sliding_window", "base_conv"],
                       mixer_options={"attention": {"num_heads": 4, "num_kv_heads": K},
                                      "sliding_window": {"num_heads": 4, "num_kv_heads": K, "window": 6},
                                      "base_conv": {"kernel_size": W, "expand": 2}},
                       mlp="swiglu", mlp_hidden=64, dtype=dtype, tie_embeddings=tie, max_length=64, **kw)
  return LM(config, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))


def test_largest_batch_formula_on_known_sizes():
  # floor((0.9·M - W) / row), then down to a multiple of 64 (of 8 below 64).
  assert roofline.largest_batch(1000, 100, 10, margin=0.1) == 64  # 80
  assert roofline.largest_batch(1000, 100, 3, margin=0.1) == 256  # 266
  assert roofline.largest_batch(1000, 100, 20, margin=0.1) == 40  # 40
  assert roofline.largest_batch(1000, 100, 17, margin=0.1) == 40  # 47
  assert roofline.largest_batch(80 << 30, 2 << 30, 8 << 20) == 8960  # (72 - 2) GiB / 8 MiB = 8960
  assert roofline.largest_batch(1000, 950, 1, margin=0.1) == 0  # the weights alone overflow
  with pytest.raises(ValueError, match="row_bytes"):
    roofline.largest_batch(1000, 0, 0)


def test_cache_bytes_per_row_is_the_hand_count():
  model = tiny()
  ring = lambda slots: 2 * slots * K * D * 4 + 4  # noqa: E731  k and v float32, and the int32 length
  want = ring(20) + ring(6) + (W - 1) * I * 4 + 4  # full attention, window 6, the conv state, LMCache lengths
  assert roofline.cache_bytes_per_row(model, 20) == want


def test_decode_step_bytes_is_the_hand_count():
  model, batch, prompt, new = tiny(), 3, 5, 4
  got = roofline.decode_step_bytes(model, batch=batch, prompt_len=prompt, new_tokens=new)
  assert got["weights"] == 4 * count_params(model.config)  # float32, tied: the head reads the whole table
  # 3 steps with 5, 6, 7 tokens before them: the full ring (9 slots) reads 6, 7, 8 filled slots, mean 7, after
  # writing 1; the window of 6 reads 6 each time. Lengths read and written; the conv state read and written.
  slot, length = 2 * K * D * 4, 2 * 4
  per_row = (7 + 1) * slot + length + (6 + 1) * slot + length + 2 * (W - 1) * I * 4 + length
  assert got["caches"] == batch * per_row
  assert got["logits"] == batch * 2 * 4 * V
  assert got["total"] == got["weights"] + got["caches"] + got["logits"]
  # bf16 compute over float32 parameters, untied: weights at 2 bytes, the input table read 3 rows per step.
  untied = tiny("bfloat16", tie=False)
  got = roofline.decode_step_bytes(untied, batch=batch, prompt_len=prompt, new_tokens=new)
  assert got["weights"] == 2 * (count_params(untied.config) - V * E + batch * E)


def test_bandwidth_table():
  assert roofline.peak_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
  assert roofline.peak_bandwidth("NVIDIA H200") == 4.8e12
  assert roofline.peak_bandwidth("NVIDIA H100 PCIe") == 2.0e12
  assert roofline.peak_bandwidth("cpu") is None
  assert roofline.copy_rate(1 << 20, repeats=2) > 0


def test_batch_max_takes_the_formulas_batch_and_checks_it(monkeypatch, capsys):
  """Device memory sized so that the formula gives 64: chosen, and the compiled programs at 64 fit."""
  model = LM(load_preset("transformer-tiny"), rngs=nnx.Rngs(0))
  args = argparse.Namespace(prompt_len=8, new_tokens=4, prefill_chunk=3)
  sizes = generate_benchmark.batch_sizes(model, prompt_len=8, new_tokens=4, prefill_chunk=3)
  assert sizes.cache == roofline.cache_bytes_per_row(model, 12) and sizes.fixed >= sizes.weights > 0
  memory = int((sizes.fixed + 64.5 * (sizes.cache + sizes.activations)) / (1 - roofline.MARGIN))
  monkeypatch.setattr(generate_benchmark, "device_bytes", lambda: memory)
  monkeypatch.setattr(generate_benchmark, "batch_sizes", lambda *a, **k: sizes)  # computed above already
  assert generate_benchmark.largest_fitting_batch(model, args) == 64
  out = capsys.readouterr().out
  assert "per row) -> 64" in out and "batch 64: the compiled programs need" in out, out
  assert "batch 56" not in out, out  # no step down: the line through batches 8 and 16 holds at 64


def test_batch_max_steps_down_when_running_out_of_memory(monkeypatch, capsys):
  """A batch the memory analysis admits can still fail to allocate (a fragmented pool): --batch max then retries
  smaller batches, 64 rows at a time, and reports the one that ran; a fixed batch's failure is raised as it is."""
  model = LM(load_preset("transformer-tiny"), rngs=nnx.Rngs(0))
  tried = []

  def fake_benchmark(model, *, batch, **_):
    tried.append(batch)
    if batch > 128:
      raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 59.62GiB")
    return dict(prefill_ms=1.0, decode_s=1.0, decode_tokens_per_s=float(batch), decode_ms_per_step=1.0)

  reported = []
  monkeypatch.setattr(generate_benchmark, "benchmark", fake_benchmark)
  monkeypatch.setattr(generate_benchmark, "largest_fitting_batch", lambda model, args: 256)
  monkeypatch.setattr(generate_benchmark, "measure_bandwidth", lambda: dict(peak=None, copy=1.0))
  monkeypatch.setattr(generate_benchmark, "_report", lambda name, model, batch, *a: reported.append(batch))
  args = argparse.Namespace(run=None, config="transformer-tiny", checkpoint=None, setting=None, prompt_len=8,
                            new_tokens=4, batch=["max"], repeats=1, seed=0, prefill_chunk=None)
  generate_benchmark.run_benchmarks(model, args)
  assert tried == [256, 192, 128] and reported == [128]
  assert "batch 256: out of memory when run" in capsys.readouterr().out
  args.batch = [256]
  with pytest.raises(jax.errors.JaxRuntimeError, match="RESOURCE_EXHAUSTED"):
    generate_benchmark.run_benchmarks(model, args)
