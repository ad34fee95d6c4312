"""The LoLCATs recipe end to end: `linearize(config, stage)`.

  teacher  the imported Transformer (config.teacher), frozen throughout
  stage 1  attention transfer (train/linearize/transfer.py): the student (every attention a LoLCATs mixer with
           the teacher's projections) trains its feature maps and window factors on the layer-wise MSE;
           written to out/stage1 as a run directory
  stage 2  LoRA (train/linearize/finetune.py) on the student's projections, next-token loss; the adapters are
           merged and the model written to `out` as a run directory

`stage="transfer"` stops after stage 1; `stage="lora"` starts from out/stage1. Held-out perplexity of the
teacher and after each stage (eval_batches > 0), the stage-1 MSE on a held-out batch before and after, and the
timings go to out/summary.json; every logged step to out/metrics.jsonl.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
from flax import nnx

from jaxlm.layers.lora import add_lora, is_lora_param, merge_lora
from train.config import ConfigError, OptimConfig
from train.linearize.config import LinearizeConfig, save_linearize_config
from train.linearize.data import device_batch, text_data
from train.linearize.evaluate import perplexity
from train.linearize.finetune import make_lora_step
from train.linearize.models import (is_transfer_param, load_run, load_teacher, num_params, save_run,
                                    student_from_teacher)
from train.linearize.transfer import make_transfer_eval, make_transfer_step
from train.optimizer import decay_mask, make_optimizer


class _Log:
  """Lines on stdout and JSON records in out/metrics.jsonl."""

  def __init__(self, out_dir: str):
    os.makedirs(out_dir, exist_ok=True)
    self.file = open(os.path.join(out_dir, "metrics.jsonl"), "a")

  def write(self, record: dict[str, Any]) -> None:
    self.file.write(json.dumps(record) + "\n")
    self.file.flush()

  def print(self, line: str) -> None:
    print(line, flush=True)

  def close(self) -> None:
    self.file.close()


def _train(name: str, step_fn: Callable, trainable: Any, frozen: Any, optim: OptimConfig, steps: int,
           batches: Iterator[dict], tokens_per_step: int, log: _Log, log_every: int) -> tuple[Any, dict]:
  """Runs `steps` of one stage; returns the trained parameters and the stage's timing."""
  optimizer = make_optimizer(optim, steps, decay_mask(trainable))
  trainable = nnx.to_pure_dict(trainable)
  # Committed to one device, as the step's outputs are: uncommitted inputs would compile the step a second time.
  trainable, opt_state, frozen = jax.device_put((trainable, optimizer.init(trainable), frozen), jax.devices()[0])
  step = jax.jit(step_fn(optimizer), donate_argnums=(0, 1))
  t0, compiled_at = time.perf_counter(), None
  for i in range(steps):
    trainable, opt_state, metrics = step(trainable, opt_state, frozen, next(batches))
    if i == 0:
      jax.block_until_ready(metrics)
      compiled_at = time.perf_counter()  # the first step includes compilation: throughput counts the rest
    if (i + 1) % log_every == 0 or i + 1 == steps:
      record = {k: float(v) for k, v in jax.device_get(metrics).items()}
      log.write(dict(stage=name, step=i + 1, **record))
      log.print(f"{name} {i + 1}/{steps}: " + ", ".join(f"{k} {v:.4g}" for k, v in record.items()))
  jax.block_until_ready(trainable)
  end = time.perf_counter()
  timing = dict(steps=steps, seconds=end - t0, tokens=steps * tokens_per_step)
  if steps > 1:
    timing["tokens_per_s"] = (steps - 1) * tokens_per_step / (end - compiled_at)
  return trainable, timing


def _batches(loader, start: int = 0) -> Iterator[dict]:
  step = start
  while True:
    yield device_batch(loader.host_batch(step))
    step += 1


def _stage1(config: LinearizeConfig, teacher, data, log: _Log, summary: dict) -> Any:
  student = student_from_teacher(teacher, config.lolcats, config.seed)
  graph_s, trainable, frozen = nnx.split(student, is_transfer_param, ...)
  graph_t = nnx.split(teacher)[0]
  frozen = nnx.to_pure_dict(frozen)
  summary["transfer_params"] = num_params(trainable)
  held_out = None
  if data.evals:  # one fixed held-out batch scores the transfer before and after
    _, host = next(iter(data.evals[0].batches(config.batch_size, 1)))
    held_out = device_batch(host)["inputs"]
  mses = jax.jit(make_transfer_eval(graph_s, graph_t))
  if held_out is not None:
    summary["transfer_mse_before"] = float(mses(nnx.to_pure_dict(trainable), frozen, held_out).mean())
  tokens = (b["inputs"] for b in _batches(data.train))
  trained, timing = _train("transfer", lambda opt: make_transfer_step(graph_s, graph_t, opt), trainable, frozen,
                           config.transfer.optim, config.transfer.steps, tokens,
                           config.batch_size * data.seq_len, log, config.log_every)
  summary["transfer"] = timing
  if held_out is not None:
    summary["transfer_mse_after"] = float(mses(trained, frozen, held_out).mean())
    log.print(f"transfer: held-out layer MSE {summary['transfer_mse_before']:.4g} -> "
              f"{summary['transfer_mse_after']:.4g}")
  return nnx.merge(graph_s, trained, frozen)


def _stage2(config: LinearizeConfig, student, data, log: _Log, summary: dict):
  add_lora(student, config.lora.targets, rank=config.lora.rank, alpha=config.lora.alpha,
           rngs=nnx.Rngs(config.seed + 1))
  graph, adapters, frozen = nnx.split(student, is_lora_param, ...)
  summary["lora_params"] = num_params(adapters)
  # Stage 2 reads the rows after those stage 1 read, so the two stages see different text.
  batches = _batches(data.train, start=config.transfer.steps)
  trained, timing = _train("lora", lambda opt: make_lora_step(graph, opt, config.loss_chunk), adapters,
                           nnx.to_pure_dict(frozen), config.lora.optim, config.lora.steps, batches,
                           config.batch_size * data.seq_len, log, config.log_every)
  summary["lora"] = timing
  model = nnx.merge(graph, trained, frozen)
  merge_lora(model)
  return model


def _perplexity(name: str, model, config: LinearizeConfig, data, log: _Log, summary: dict) -> None:
  if config.eval_batches and data.evals:
    result = perplexity(model, data.evals[0], config.batch_size, config.eval_batches, config.loss_chunk)
    summary[f"perplexity_{name}"] = result["perplexity"]
    log.write(dict(stage=name, **{f"eval/{k}": v for k, v in result.items()}))
    log.print(f"{name}: held-out perplexity {result['perplexity']:.3f} over {result['tokens']:,} tokens")


def linearize(config: LinearizeConfig, stage: str = "all") -> dict[str, Any]:
  """Runs the recipe (module docstring); returns the summary also written to out/summary.json."""
  if stage not in ("all", "transfer", "lora"):
    raise ConfigError(f"stage: {stage!r} is not one of ('all', 'transfer', 'lora')")
  wall = time.perf_counter()
  teacher = load_teacher(config.teacher, config.compute_dtype)
  data = text_data(config.data, config.batch_size, config.seed, teacher.config.vocab_size)
  for run_dir in ([config.stage1_dir()] if stage != "lora" else []) + ([config.out] if stage != "transfer" else []):
    checkpoints = os.path.join(run_dir, "checkpoints")
    if os.path.isdir(checkpoints) and os.listdir(checkpoints):  # refused before any training
      raise ConfigError(f"out: {run_dir} already holds checkpoints; choose a new directory")
  log = _Log(config.out)
  summary: dict[str, Any] = dict(teacher=config.teacher, out=config.out)
  previous = os.path.join(config.out, "summary.json")
  if stage == "lora" and os.path.isfile(previous):  # keep what the stage-1 run recorded
    with open(previous) as f:
      summary = {**json.load(f), **summary}
  summary["stage"] = stage
  save_linearize_config(config, os.path.join(config.out, "linearize.yaml"))
  try:
    if stage in ("all", "transfer"):
      _perplexity("teacher", teacher, config, data, log, summary)
      student = _stage1(config, teacher, data, log, summary)
      save_run(student, config.stage1_dir(), config.transfer.steps, config.teacher)
      _perplexity("stage1", student, config, data, log, summary)
    else:
      student = load_run(config.stage1_dir(), config.compute_dtype)
    if stage in ("all", "lora"):
      model = _stage2(config, student, data, log, summary)
      save_run(model, config.out, config.transfer.steps + config.lora.steps, config.teacher)
      _perplexity("linearized", model, config, data, log, summary)
  finally:
    log.close()
  summary["wall_s"] = time.perf_counter() - wall
  with open(os.path.join(config.out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  return summary
