"""Run by test_multiprocess.py: one process of a multi-process CPU run (or, as `reference`, the same global batch
in one process). Writes `<out>/<role>_p<id>.json`: the losses it saw and the rows it read.

Roles:
  reference  one process with all the devices: `steps` steps (the losses to match)
  peer       one of JAX_NUM_PROCESSES processes: the same run with checkpoints (phase `full`); then process 0
             removes the last checkpoint and every process resumes from the one before (phase `resume`); then
             the run again, where process 1 stops after step 2 and the test kills it (phase `kill`: the others
             must fail, not hang)
"""

import json
import os
import shutil
import sys
import time


from train import distributed

CLUSTER = distributed.cluster_from()
distributed.initialize(CLUSTER)  # before any backend exists

import jax  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from train.config import ConfigError, load_config  # noqa: E402
from train.data import EvalSet  # noqa: E402
from train.data.loader import RowLoader  # noqa: E402
from train.logs import read_metrics  # noqa: E402
from train.run import train  # noqa: E402

STEPS = 4
MODEL = ("{vocab_size: 64, d_model: 32, num_layers: 2, mixers: [base_conv, attention], max_length: 32, "
         "mixer_options: {attention: {num_heads: 2}}, mlp_hidden: 64}")

READS: dict[str, list[list[int]]] = {"train": [], "eval": []}


def _recording(kind: str, read_rows):
  def read(rows):
    READS[kind].append([int(r) for r in rows])
    return read_rows(rows)
  return read


# Every row a process reads goes through its loader's read_rows: record them at that seam.
_row_loader_init = RowLoader.__init__


def _recording_row_loader_init(self, num_rows, read_rows, *args, **kwargs):
  _row_loader_init(self, num_rows, _recording("train", read_rows), *args, **kwargs)


RowLoader.__init__ = _recording_row_loader_init
_eval_set_init = EvalSet.__init__


def _recording_eval_set_init(self, name, num_rows, read_rows, *args, **kwargs):
  _eval_set_init(self, name, num_rows, _recording("eval", read_rows), *args, **kwargs)


EvalSet.__init__ = _recording_eval_set_init


def config(run_dir: str, steps: int = STEPS, *extra: str):
  return load_config(None, [
      f"model={MODEL}", "data.mqar.vocab_size=64", f"run_dir={run_dir}",
      "data.mqar.train=[{seq_len: 32, num_kv_pairs: 4, num_examples: 48}]",  # 3 steps/epoch: crosses an epoch
      "data.mqar.test=[{seq_len: 32, num_kv_pairs: 4, num_examples: 12}]",  # a padded last eval batch
      "batch_size=16", "eval_batch_size=8", "micro_batches=2", f"steps={steps}", "compute_dtype=float32",
      "log.every=1", "log.progress=none", "log.tensorboard=false", "optim.lr=3e-3", "optim.warmup_steps=0",
      "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "checkpoint.every=2", "checkpoint.keep=3", *extra])


def losses(run_dir: str) -> dict[int, float]:
  return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def take_reads() -> dict[str, list[list[int]]]:
  out = {k: list(v) for k, v in READS.items()}
  for v in READS.values():
    v.clear()
  return out


def main() -> None:
  out, role = sys.argv[1], sys.argv[2]
  pid = jax.process_index()
  result: dict = dict(process_index=pid, process_count=jax.process_count(), devices=jax.device_count(),
                      local_devices=jax.local_device_count())
  run_dir = os.path.join(out, role)
  if role == "peer":  # tensor across the processes: each would have to hold whole batches; refused by name
    try:
      train(config(os.path.join(out, "tensor8"), STEPS, "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=8"))
    except ConfigError as e:
      result["tensor_across_processes"] = str(e)
  summary = train(config(run_dir, STEPS, *(["checkpoint.enabled=false"] if role == "reference" else [])))
  state_dir = os.path.join(run_dir, "checkpoints", "2", "state")
  result["full"] = dict(reads=take_reads(), losses=losses(run_dir) if pid == 0 else None,
                        eval_loss=summary["eval/test/loss"],
                        # orbax: each process writes the shards it holds into a folder of its own
                        shard_files={d: len(os.listdir(os.path.join(state_dir, d, "d"))) for d in
                                     os.listdir(state_dir) if d.startswith("ocdbt.process_")}
                        if role == "peer" else None)
  if role == "peer":
    # Resume from step 2 of a checkpoint every process wrote: process 0 drops step 4 and the log, all wait.
    if pid == 0:
      shutil.rmtree(os.path.join(run_dir, "checkpoints", str(STEPS)))
      os.rename(os.path.join(run_dir, "metrics.jsonl"), os.path.join(run_dir, "metrics_full.jsonl"))
    multihost_utils.sync_global_devices("checkpoint 4 removed")
    summary = train(config(run_dir))
    result["resume"] = dict(reads=take_reads(), losses=losses(run_dir) if pid == 0 else None,
                            checkpoints=sorted(os.listdir(os.path.join(run_dir, "checkpoints"))),
                            eval_loss=summary["eval/test/loss"])
  with open(os.path.join(out, f"{role}_p{pid}.json"), "w") as f:
    json.dump(result, f)
  if role == "peer":
    # The same program again (a compilation-cache hit), in a fresh directory: after step 2 process 1 stops
    # answering (as if it hung) and the test kills it; the others are then stuck in step 3's collectives and must
    # fail within the heartbeat timeout instead of waiting forever.
    def mark(step):
      if step == 2:
        open(os.path.join(out, f"stalled_p{pid}"), "w").close()
        if pid == 1:
          time.sleep(3600)
    train(config(os.path.join(out, "kill"), STEPS, "checkpoint.enabled=false"), on_step=mark)
    print("the run after the kill finished: its peer was never killed", file=sys.stderr)
    sys.exit(3)


if __name__ == "__main__":
  main()
