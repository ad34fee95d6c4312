"""The training loop: build mesh, data, model state and steps from a `TrainConfig`, then train, evaluate, save.

Order of a step: batch(step) -> train step (jit, donated state) -> every `log.every` steps fetch the metrics
of the steps since the last fetch (so the device never waits on the host in between) -> eval / checkpoint when
due -> on SIGTERM/SIGINT save synchronously and return. Resuming restores the state and the data position, so
the resumed run continues with exactly the batches and arithmetic of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from train import flops as flops_lib
from train.checkpoint import Checkpointer
from train.config import ConfigError, TrainConfig, save_config
from train.data import Data, EvalSet, build_data
from train.data.loader import to_global
from train.logs import RunLog
from train.mesh import batch_axis_size, make_mesh, maybe_initialize_distributed
from train.models import ModelSpec, build_model
from train.optimizer import decay_mask, lr_schedule, make_optimizer
from train.state import abstract_model, abstract_state, create_state
from train.step import make_eval_step, make_forward, make_train_step


def _check_batch(config: TrainConfig, mesh) -> None:
  shards = batch_axis_size(mesh)
  if config.micro_batches < 1:
    raise ConfigError(f"micro_batches: must be >= 1, got {config.micro_batches}")
  if config.batch_size % (config.micro_batches * shards):
    raise ConfigError(f"batch_size: {config.batch_size} must be a multiple of micro_batches x data x fsdp = "
                      f"{config.micro_batches} x {shards}")
  if config.batch_size % jax.process_count():
    raise ConfigError(f"batch_size: {config.batch_size} must be a multiple of the {jax.process_count()} hosts")
  eval_bs = config.eval_batch_size or config.batch_size
  if eval_bs % shards:
    raise ConfigError(f"eval_batch_size: {eval_bs} must be a multiple of data x fsdp = {shards}")


def _gather(tree: Any) -> Any:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


def evaluate(eval_fn: Callable, params: Any, eval_set: EvalSet, mesh, batch_size: int, limit: int = 0
             ) -> dict[str, float]:
  """loss, accuracy (exact match of labelled tokens), perplexity, and accuracy per group (MQAR setting)."""
  n = eval_set.num_rows
  loss, correct, tokens = np.zeros(n), np.zeros(n), np.zeros(n)
  seen = np.zeros(n, bool)
  p, hosts = jax.process_index(), jax.process_count()
  share = batch_size // hosts
  for rows, host in eval_set.batches(batch_size, limit):
    local = {k: v[p * share:(p + 1) * share] for k, v in host.items()}  # each host feeds its slice of rows
    out = _gather(eval_fn(params, to_global(local, mesh)))
    k = len(rows)
    loss[rows], correct[rows], tokens[rows] = out["loss"][:k], out["correct"][:k], out["tokens"][:k]
    seen[rows] = True
  total = max(tokens[seen].sum(), 1.0)
  prefix = f"eval/{eval_set.name}"
  result = {f"{prefix}/loss": loss[seen].sum() / total, f"{prefix}/accuracy": correct[seen].sum() / total}
  result[f"{prefix}/perplexity"] = float(np.exp(min(result[f"{prefix}/loss"], 50.0)))
  for group, rows in eval_set.groups.items():
    rows = rows[seen[rows]]
    result[f"{prefix}/accuracy/{group}"] = correct[rows].sum() / max(tokens[rows].sum(), 1.0)
  return {k: float(v) for k, v in result.items()}


class _Signals:
  """Records SIGTERM/SIGINT instead of dying, so the loop can save first."""

  def __init__(self):
    self.received: int | None = None

  @contextlib.contextmanager
  def installed(self):
    def handler(signum, _frame):
      self.received = signum
    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
      yield self
    finally:
      for s, h in previous.items():
        signal.signal(s, h)


def train(config: TrainConfig, *, on_step: Callable[[int], None] | None = None,
          model: ModelSpec | None = None) -> dict[str, Any]:
  """Runs `config` to its last step (or to a signal); returns the summary also written to summary.json.

  `on_step(step)` is called after every step (tests use it to send signals); `model` replaces the model that
  `config.model` describes.
  """
  maybe_initialize_distributed(config.mesh)
  wall_start = time.perf_counter()
  run_dir = config.resolved_run_dir()
  os.makedirs(run_dir, exist_ok=True)
  if jax.process_index() == 0:
    save_config(config, os.path.join(run_dir, "config.yaml"))
  mesh = make_mesh(config.mesh)
  _check_batch(config, mesh)
  spec = model or build_model(config)
  data: Data = build_data(config, spec.vocab_size)
  total_steps = config.steps or config.epochs * data.train.steps_per_epoch
  if total_steps <= 0:
    raise ConfigError("steps: set steps > 0, or epochs > 0 for a finite dataset")

  abs_params = nnx.split(abstract_model(spec.model_fn), nnx.Param, ...)[1]
  optimizer = make_optimizer(config.optim, total_steps, decay_mask(abs_params))
  schedule = lr_schedule(config.optim, total_steps)
  state, setup = create_state(spec.model_fn, optimizer, mesh, config.seed)
  with contextlib.ExitStack() as cleanup:
    log = RunLog(config.log, run_dir, total_steps)
    cleanup.callback(log.close)
    log.print(f"{config.name}: {setup.num_params:,} parameters, mesh {dict(mesh.shape)}, "
              f"{total_steps} steps of {config.batch_size} x {data.seq_len} tokens")

    checkpointer = Checkpointer(config.checkpoint, run_dir) if config.checkpoint.enabled else None
    if checkpointer:
      cleanup.callback(checkpointer.close)  # also when a restore fails: its background threads must stop
    step, finished = 0, False  # finished: restored from a run that already ended (its last step or early stop)
    if checkpointer and config.checkpoint.resume:
      want = None if config.checkpoint.resume_step < 0 else config.checkpoint.resume_step
      restored = checkpointer.restore(abstract_state(setup, state), want)
      if restored:
        step, state, data_state = restored
        finished = bool(data_state.get("finished"))
        if data_state.get("step") != step:
          raise ConfigError(f"checkpoint {step}: data position {data_state} does not match the state's step")
        log.print(f"resumed from step {step} ({checkpointer.directory})")

    forward = make_forward(setup.graphdef, setup.rest, compute_dtype=spec.cast_dtype)
    step_fn = jax.jit(make_train_step(forward, optimizer, setup.shardings["params"], schedule),
                      out_shardings=(setup.shardings, None), donate_argnums=0)
    eval_fn = jax.jit(make_eval_step(forward))
    eval_bs = config.eval_batch_size or config.batch_size
    tokens_per_step = config.batch_size * data.seq_len
    peak = flops_lib.device_peak_flops(override_tflops=config.log.peak_tflops)
    flops_per_token = spec.flops_per_token(data.seq_len, setup.num_params)

    def batch_at(s: int):
      host = data.train.host_batch(s, jax.process_index(), jax.process_count())
      return to_global(host, mesh, config.micro_batches)

    summary: dict[str, Any] = dict(name=config.name, run_dir=run_dir, num_params=setup.num_params,
                                   total_steps=total_steps, interrupted=False)

    def run_eval(s: int) -> dict[str, float]:
      results = {}
      with jax.set_mesh(mesh):
        for eval_set in data.evals:
          results.update(evaluate(eval_fn, state["params"], eval_set, mesh, eval_bs, config.eval_batches))
      if results:
        log.write(s, {**results, "elapsed_s": time.perf_counter() - wall_start})
        log.print(f"eval @ {s}: " + ", ".join(f"{k.split('/', 2)[-1]} {v:.4f}" for k, v in results.items()))
      return results

    def save(s: int, wait: bool = False, finished: bool = False) -> None:
      if checkpointer:
        checkpointer.save(s, state, {"step": s, "seed": config.data.seed, "kind": config.data.kind,
                                     "finished": finished}, wait=wait)

    signals = _Signals()
    with jax.set_mesh(mesh), signals.installed():
      if finished:
        log.print(f"the run in {run_dir} already ended at step {step}; evaluating its final state")
        total_steps = step
      batch = batch_at(step) if step < total_steps else None
      if batch is not None:
        t0 = time.perf_counter()
        compiled = step_fn.lower(state, batch).compile()
        summary["compile_s"] = time.perf_counter() - t0
        log.print(f"compiled the train step in {summary['compile_s']:.1f}s")
      pending: list[tuple[int, dict]] = []
      last_time, last_step = time.perf_counter(), step
      log.start(step)
      evals: dict[str, float] = {}
      while step < total_steps:
        state, metrics = compiled(state, batch)
        step += 1
        pending.append((step, metrics))
        if step < total_steps:
          batch = batch_at(step)  # the next batch is prepared while the device works
        if on_step:
          on_step(step)
        if step % config.log.every == 0 or step == total_steps or signals.received:
          now = time.perf_counter()
          tps = (step - last_step) * tokens_per_step / max(now - last_time, 1e-9)
          last_time, last_step = now, step
          fetched = jax.device_get(pending)
          pending = []
          for s, m in fetched:
            record = {k: float(v) for k, v in m.items()}
            log.write(s, record)
          record.update(tokens_per_s=tps, mfu=flops_lib.mfu(tps, flops_per_token, mesh.size, peak))
          log.progress(step, record)
          summary.update(loss=record["loss"], tokens_per_s=tps, mfu=record["mfu"])
        if config.eval_every and step % config.eval_every == 0 and step < total_steps:
          evals = run_eval(step)
          last_time = time.perf_counter()  # tokens/s counts training only
          if config.early_stop_accuracy and evals and _accuracy(evals) >= config.early_stop_accuracy:
            log.print(f"early stop at step {step}: accuracy {_accuracy(evals):.4f}")
            summary["early_stopped"] = True
            break
        if signals.received:
          name = signal.Signals(signals.received).name
          save(step, wait=True)
          log.print(f"{name} at step {step}: checkpoint saved, exiting")
          summary.update(interrupted=True, signal=name)
          break
        if config.checkpoint.every and step % config.checkpoint.every == 0 and step < total_steps:
          save(step)  # the last step is saved below, marked finished

    if not summary["interrupted"]:
      if "early_stopped" not in summary:
        evals = run_eval(step)
      save(step, wait=True, finished=True)
    summary.update(step=step, skipped=int(jax.device_get(state["skipped"])), wall_s=time.perf_counter() - wall_start,
                   **evals)
    acc = _accuracy(evals)
    if acc is not None and config.data.kind == "mqar":
      per = {k.rsplit("/", 1)[-1]: v for k, v in evals.items() if "/accuracy/" in k}
      log.print(f"final MQAR accuracy {acc:.4f} ({', '.join(f'{k} {v:.4f}' for k, v in per.items())}) "
                f"after {step} steps, {summary['wall_s']:.0f}s")
  if jax.process_index() == 0:
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2, default=str)
  return summary


def _accuracy(evals: dict[str, float]) -> float | None:
  accs = [v for k, v in evals.items() if k.endswith("/accuracy")]
  return accs[0] if accs else None
