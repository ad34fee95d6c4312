"""The training loop: build mesh, data, model state and steps from a `TrainConfig`, then train, evaluate, save.

`train(config)` reads as its steps:
  1. `_build`      mesh, model, data, optimizer and the sharded state; every check that can fail runs here,
                   before anything is written to the run directory or compiled
  2. `_resume`     the run directory's checkpoint, if any (a different configuration is refused by name first)
  3. `record_run`  config.yaml, model.yaml and the tokenizer into the run directory (train/run_dir.py)
  4. `_compile`    the train and eval steps
  5. `_loop`       steps until the last, an early stop, a signal or too many non-finite steps
  6. `_finish`     the final eval and checkpoint, summary.json

Order of a step: batch(step) -> train step (jit, donated state) -> every `log.every` steps fetch the metrics of
the steps since the last fetch (so the device never waits on the host in between; the fetch is also where the
throughput window ends, train/throughput.py) -> eval / checkpoint when due -> on SIGTERM/SIGINT save
synchronously and return. Resuming restores the state and the data position, so the resumed run continues with
exactly the batches and arithmetic of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
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
from train import run_dir as run_dir_lib
from train.checkpoint import Checkpointer
from train.config import ConfigError, TrainConfig
from train.data import Data, EvalSet, build_data
from train.data.loader import process_rows, to_global
from train.logs import RunLog
from train.mesh import batch_axis_size, make_mesh, maybe_initialize_distributed
from train.models import ModelSpec, build_model
from train.optimizer import decay_mask, make_optimizer, unit_schedule
from train.state import Setup, abstract_model, abstract_state, create_state
from train.step import make_eval_step, make_forward, make_train_step
from train.step_profile import StepProfile
from train.throughput import Throughput


class TrainingError(RuntimeError):
  """The run started but cannot go on (e.g. every step is non-finite); the message says why and what to try."""


def _check_batch(config: TrainConfig, mesh) -> None:
  shards = batch_axis_size(mesh)
  if config.batch_size % (config.micro_batches * shards):
    raise ConfigError(f"batch_size: {config.batch_size} must be a multiple of micro_batches x data x fsdp = "
                      f"{config.micro_batches} x {shards}")
  if config.batch_size % jax.process_count():
    raise ConfigError(f"batch_size: {config.batch_size} must be a multiple of the {jax.process_count()} hosts")
  eval_bs = config.eval_batch_size or config.batch_size
  if eval_bs % shards:
    raise ConfigError(f"eval_batch_size: {eval_bs} must be a multiple of data x fsdp = {shards}")
  hosts, p = jax.process_count(), jax.process_index()
  if hosts > 1:  # each process reads the p-th share of every batch: its devices must hold exactly those rows
    for name, size in (("batch_size", config.batch_size), ("eval_batch_size", eval_bs)):
      share, held = size // hosts, process_rows(mesh, size)
      if held != (p * share, (p + 1) * share):
        raise ConfigError(f"mesh: {dict(mesh.shape)} over {hosts} processes gives process {p} rows "
                          f"{list(held) if held else 'in several blocks'} of a "
                          f"{name} of {size}, not its share [{p * share}, {(p + 1) * share}); keep `tensor` "
                          f"within a process's devices so data x fsdp splits over the processes")


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
  for rows, local in eval_set.batches(batch_size, limit, jax.process_index(), jax.process_count()):
    out = _gather(eval_fn(params, to_global(local, mesh)))  # each host read and feeds only its slice of rows
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


@dataclasses.dataclass
class _Run:
  """Everything one training run holds; `state` and `step` advance, the rest is fixed once built."""
  config: TrainConfig
  run_dir: str
  mesh: Any
  spec: ModelSpec
  data: Data
  total_steps: int
  optimizer: Any
  schedule: Any
  state: dict
  setup: Setup
  log: RunLog | None = None
  checkpointer: Checkpointer | None = None
  step: int = 0
  finished: bool = False  # restored from a run that already ended (its last step or an early stop)
  seconds: dict[str, float] = dataclasses.field(default_factory=lambda: dict(compile_s=0.0, eval_s=0.0,
                                                                              checkpoint_s=0.0))

  @property
  def tokens_per_step(self) -> int:
    return self.config.batch_size * self.data.seq_len

  def batch_at(self, step: int):
    host = self.data.train.host_batch(step, jax.process_index(), jax.process_count())
    return to_global(host, self.mesh, self.config.micro_batches)


def _build(config: TrainConfig, model: ModelSpec | None) -> _Run:
  """Step 1: everything the run needs, checked, before any file is written."""
  mesh = make_mesh(config.mesh)
  _check_batch(config, mesh)
  spec = model or build_model(config)
  data = build_data(config, spec.vocab_size)
  total_steps = config.steps or config.epochs * data.train.steps_per_epoch
  if total_steps <= 0:
    raise ConfigError("steps: set steps > 0, or epochs > 0 for a finite dataset")
  abs_params = nnx.split(abstract_model(spec.model_fn), nnx.Param, ...)[1]
  optimizer = make_optimizer(config.optim, total_steps, decay_mask(abs_params))
  schedule = unit_schedule(config.optim, total_steps)
  state, setup = create_state(spec.model_fn, optimizer, mesh, config.seed)
  return _Run(config, config.resolved_run_dir(), mesh, spec, data, total_steps, optimizer, schedule, state, setup)


def _resume(run: _Run) -> str | None:
  """Step 2: the state and data position of the run directory's checkpoint (the latest, or resume_step); returns
  the line to log."""
  config, checkpointer = run.config, run.checkpointer
  if not (checkpointer and config.checkpoint.resume):
    return None
  want = None if config.checkpoint.resume_step < 0 else config.checkpoint.resume_step
  restored = checkpointer.restore(abstract_state(run.setup, run.state), want)
  if not restored:
    return None
  run.step, run.state, data_state = restored
  run.finished = bool(data_state.get("finished"))
  if data_state.get("step") != run.step:
    raise ConfigError(f"checkpoint {run.step}: data position {data_state} does not match the state's step")
  planned = data_state.get("total_steps", run.total_steps)  # absent in checkpoints written before it was saved
  if run.finished and planned != run.total_steps:
    raise ConfigError(f"steps: the run in {run.run_dir} already finished (step {run.step} of {planned}; its "
                      f"learning-rate schedule ended); a finished run is not extended to {run.total_steps} steps. "
                      f"Start a new run (another name or run_dir)")
  return f"resumed from step {run.step} ({checkpointer.directory})"


def _compile(run: _Run):
  """Step 4: the compiled train step and the jitted eval step."""
  # MQAR labels a few positions per row: the LM head then runs at those alone (exact; see labelled_positions).
  forward = functools.partial(make_forward, run.setup.graphdef, run.setup.rest, compute_dtype=run.spec.cast_dtype,
                              loss_chunk=run.config.loss_chunk)
  step_fn = jax.jit(make_train_step(forward(labelled=run.data.train_labels_per_row), run.optimizer,
                                    run.setup.shardings["params"], run.schedule),
                    out_shardings=(run.setup.shardings, None), donate_argnums=0)
  eval_fn = jax.jit(make_eval_step(forward(labelled=run.data.eval_labels_per_row)))
  if run.step >= run.total_steps:
    return None, eval_fn
  t0 = time.perf_counter()
  compiled = step_fn.lower(run.state, run.batch_at(run.step)).compile()
  run.seconds["compile_s"] = time.perf_counter() - t0
  run.log.print(f"compiled the train step in {run.seconds['compile_s']:.1f}s")
  return compiled, eval_fn


def _run_eval(run: _Run, eval_fn) -> dict[str, float]:
  t0 = time.perf_counter()
  results = {}
  with jax.set_mesh(run.mesh):
    eval_bs = run.config.eval_batch_size or run.config.batch_size
    for eval_set in run.data.evals:
      results.update(evaluate(eval_fn, run.state["params"], eval_set, run.mesh, eval_bs, run.config.eval_batches))
  run.seconds["eval_s"] += time.perf_counter() - t0
  if results:
    run.log.write(run.step, results)
    run.log.print(f"eval @ {run.step}: " + ", ".join(f"{k.split('/', 2)[-1]} {v:.4f}" for k, v in results.items()))
  return results


def _save(run: _Run, *, wait: bool = False, finished: bool = False) -> None:
  if run.checkpointer:
    t0 = time.perf_counter()
    data_state = {"step": run.step, "seed": run.config.data.seed, "kind": run.config.data.kind,
                  "finished": finished, "total_steps": run.total_steps}
    run.checkpointer.save(run.step, run.state, data_state, wait=wait)
    run.seconds["checkpoint_s"] += time.perf_counter() - t0


class _NonFinite:
  """Counts consecutive skipped (non-finite) steps in fetched metrics."""

  def __init__(self, limit: int):
    self.limit, self.run_length, self.last_loss = limit, 0, None

  def update(self, step: int, record: dict[str, float]) -> str | None:
    """Why to stop after this step's record, or None."""
    self.run_length = 0 if record.get("finite", 1.0) else self.run_length + 1
    if not self.limit or self.run_length < self.limit:
      return None
    return (f"{self.run_length} consecutive non-finite steps up to step {step} (loss {record.get('loss')}, "
            f"grad_norm {record.get('grad_norm')}); each was skipped. Lower optim.lr, set optim.clip_norm, check "
            f"the data, or raise max_nonfinite_steps")


def _loop(run: _Run, compiled, eval_fn, on_step, summary: dict[str, Any]) -> dict[str, float]:
  """Step 5: train from run.step to the end (or an early stop, a signal, too many non-finite steps); returns the
  last evals (empty if none ran)."""
  config = run.config
  peak = flops_lib.device_peak_flops(override_tflops=config.log.peak_tflops)
  flops_per_token = run.spec.flops_per_token(run.data.seq_len, run.setup.num_params)
  throughput, nonfinite = Throughput(run.tokens_per_step), _NonFinite(config.max_nonfinite_steps)
  signals = _Signals()
  evals: dict[str, float] = {}
  pending: list[tuple[int, dict]] = []
  synced = False  # the device has nothing queued: a new throughput window may start
  profile = StepProfile(config.log.every, config.log.profile_steps)

  def sync_and_fetch() -> None:
    """Waits for the steps in flight, ends the throughput window and logs their metrics."""
    nonlocal pending, synced
    fetched = jax.device_get(pending)  # waits for the device: the window ends after this
    window = throughput.end(run.step)
    pending, synced = [], True
    for s, m in fetched:
      record = {k: float(v) for k, v in m.items()}
      run.log.write(s, record)
      reason = nonfinite.update(s, record)
      if reason:
        raise TrainingError(reason)
    if fetched:
      extra = {}
      if window:
        extra = dict(tokens_per_s=window.tokens_per_s, window_s=window.seconds, window_steps=window.steps,
                     mfu=flops_lib.mfu(window.tokens_per_s, flops_per_token, run.mesh.size, peak))
        run.log.write(run.step, extra)
      run.log.progress(run.step, {**record, **extra})
      summary.update(loss=record["loss"], skipped=int(record["skipped"]))

  batch = run.batch_at(run.step) if run.step < run.total_steps else None
  with jax.set_mesh(run.mesh), signals.installed():
    run.log.start(run.step)
    throughput.start(run.step)
    try:
      while run.step < run.total_steps:
        if profile.due(run.step):
          sync_and_fetch()  # the device idle and the window closed: the traced steps count in none
          profile.begin()
        run.state, metrics = compiled(run.state, batch)
        run.step += 1
        pending.append((run.step, metrics))
        if run.step < run.total_steps:
          batch = run.batch_at(run.step)  # the next batch is prepared while the device works
        if on_step:
          on_step(run.step)
        eval_due = config.eval_every and run.step % config.eval_every == 0 and run.step < run.total_steps
        save_due = config.checkpoint.every and run.step % config.checkpoint.every == 0 and run.step < run.total_steps
        if (run.step % config.log.every == 0 or run.step == run.total_steps or signals.received or eval_due
            or save_due):
          sync_and_fetch()
        if eval_due:
          evals = _run_eval(run, eval_fn)
          if config.early_stop_accuracy and evals and _accuracy(evals) >= config.early_stop_accuracy:
            run.log.print(f"early stop at step {run.step}: accuracy {_accuracy(evals):.4f}")
            summary["early_stopped"] = True
            break
        if signals.received:
          name = signal.Signals(signals.received).name
          _save(run, wait=True)
          run.log.print(f"{name} at step {run.step}: checkpoint saved, exiting")
          summary.update(interrupted=True, signal=name)
          break
        if save_due:
          _save(run)  # the last step is saved in _finish, marked finished
        if profile.finish(run.step, run.state, run.step == run.total_steps, run.log.print):
          synced = True
        if synced and not profile.active:  # after the fetch, and after any eval or save that followed it
          throughput.start(run.step)
          synced = False
    finally:
      profile.close()
      summary.update(train_s=throughput.train_s, tokens_per_s=throughput.median_tokens_per_s(),
                     windows=len(throughput.windows), **run.seconds)
  if summary["tokens_per_s"] is not None:
    summary["mfu"] = flops_lib.mfu(summary["tokens_per_s"], flops_per_token, run.mesh.size, peak)
  return evals


def _finish(run: _Run, eval_fn, evals: dict[str, float], summary: dict[str, Any], wall_start: float) -> None:
  """Step 6: the final eval and checkpoint (unless interrupted), the summary and its last lines."""
  if not summary["interrupted"]:
    if "early_stopped" not in summary:
      evals = _run_eval(run, eval_fn)
    _save(run, wait=True, finished=True)
  summary.update(step=run.step, skipped=int(jax.device_get(run.state["skipped"])),
                 wall_s=time.perf_counter() - wall_start, **run.seconds, **evals)
  rate = summary.get("tokens_per_s")
  run.log.print(f"done at step {run.step}: loss {summary.get('loss', float('nan')):.4f}, "
                f"{summary['skipped']} skipped step(s), "
                + (f"{rate:,.0f} tokens/s (median of {summary['windows']} windows), " if rate else "")
                + f"compile {summary['compile_s']:.1f}s, eval {summary['eval_s']:.1f}s, "
                f"wall {summary['wall_s']:.0f}s")
  acc = _accuracy(evals)
  if acc is not None and run.config.data.kind == "mqar":
    per = {k.rsplit("/", 1)[-1]: v for k, v in evals.items() if "/accuracy/" in k}
    run.log.print(f"final MQAR accuracy {acc:.4f} ({', '.join(f'{k} {v:.4f}' for k, v in per.items())}) "
                  f"after {run.step} steps, {summary['wall_s']:.0f}s")


def _write_summary(run_dir: str, summary: dict[str, Any]) -> None:
  if jax.process_index() == 0:
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2, default=str)


def train(config: TrainConfig, *, on_step: Callable[[int], None] | None = None,
          model: ModelSpec | None = None) -> dict[str, Any]:
  """Runs `config` to its last step (or to a signal); returns the summary also written to summary.json.

  `on_step(step)` is called after every step (tests use it to send signals); `model` replaces the model that
  `config.model` describes. Raises ConfigError (bad settings, found before anything is written or compiled) and
  TrainingError (the run cannot go on; its summary.json records why).
  """
  maybe_initialize_distributed(config.mesh)
  wall_start = time.perf_counter()
  run_dir_lib.check_resumable(config)
  run = _build(config, model)
  summary: dict[str, Any] = dict(name=config.name, run_dir=run.run_dir, num_params=run.setup.num_params,
                                 total_steps=run.total_steps, interrupted=False)
  with contextlib.ExitStack() as cleanup:
    os.makedirs(run.run_dir, exist_ok=True)
    if config.checkpoint.enabled:
      run.checkpointer = Checkpointer(config.checkpoint, run.run_dir)
      cleanup.callback(run.checkpointer.close)  # also when a restore fails: its background threads must stop
    resumed = _resume(run)  # before the log opens its files: a refused resume leaves the run directory as it was
    run.log = RunLog(config.log, run.run_dir, run.total_steps)
    cleanup.callback(run.log.close)
    if resumed:
      run.log.print(resumed)
    if jax.process_index() == 0:
      run_dir_lib.record_run(config, run.run_dir, model is None)
    run.log.print(f"{config.name}: {run.setup.num_params:,} parameters, mesh {dict(run.mesh.shape)}, "
                  f"{run.total_steps} steps of {config.batch_size} x {run.data.seq_len} tokens")
    if run.finished:
      run.log.print(f"the run in {run.run_dir} already ended at step {run.step}; evaluating its final state")
      run.total_steps = run.step
    summary["setup_s"] = time.perf_counter() - wall_start
    compiled, eval_fn = _compile(run)
    try:
      evals = _loop(run, compiled, eval_fn, on_step, summary)
    except TrainingError as e:
      run.log.print(f"stopped: {e}")
      _write_summary(run.run_dir, {**summary, "step": run.step, "error": str(e)})
      raise
    _finish(run, eval_fn, evals, summary, wall_start)
  _write_summary(run.run_dir, summary)
  return summary


def _accuracy(evals: dict[str, float]) -> float | None:
  accs = [v for k, v in evals.items() if k.endswith("/accuracy")]
  return accs[0] if accs else None
