"""Two CPU processes joined by `jax.distributed.initialize` on localhost train like one process holding every
device: a (data=2, fsdp=2, tensor=2) mesh over 2 processes x 4 host devices against 1 process x 8 devices.

Checked: the same losses and eval loss as the one-process run; each process read only its own rows of every batch
(the two halves of the one-process run's batch, nothing else); a checkpoint written by both processes restores
into the same layout and the resumed steps repeat the uninterrupted ones exactly; and once a peer is killed the
other process fails within the heartbeat timeout instead of hanging. Workers: tests/train/multiprocess_worker.py.
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from train import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = os.path.join(ROOT, "tests", "train", "multiprocess_worker.py")
PROCESSES = 2
# A dead peer fails the others after this many seconds without its heartbeat; not lower, so that a live process
# starved of CPU on a busy 2-core machine is not declared dead.
HEARTBEAT_S = 10
DEADLINE_S = 300  # the whole test; no wait below is unbounded


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(tmp_path, name: str, role: str, **env) -> tuple[subprocess.Popen, str]:
  base = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "JAXLM_", "XLA_FLAGS"))}
  # One persistent compilation cache: the resume and the kill phases run the full phase's programs again.
  base.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
              PYTHONUNBUFFERED="1", JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  log = str(tmp_path / f"{name}.log")
  with open(log, "w") as f:
    proc = subprocess.Popen([sys.executable, WORKER, str(tmp_path), role], cwd=ROOT, stdout=f,
                            stderr=subprocess.STDOUT, env={**base, **{k: str(v) for k, v in env.items()}})
  return proc, log


def _tail(log: str, n: int = 3000) -> str:
  with open(log, errors="replace") as f:
    return f.read()[-n:]


def _wait_for(condition, deadline: float, what: str, procs) -> None:
  while not condition():
    for proc, log in procs:
      assert proc.poll() is None, f"{what}: a process exited ({proc.returncode}) first:\n{_tail(log)}"
    assert time.monotonic() < deadline, f"timed out waiting for {what}"
    time.sleep(0.2)


def _run_processes(tmp_path) -> dict:
  """Runs the reference and the peers to the kill; returns how the surviving peer ended."""
  deadline = time.monotonic() + DEADLINE_S
  address = f"127.0.0.1:{_free_port()}"
  reference = _start(tmp_path, "reference", "reference", JAX_NUM_CPU_DEVICES=8)
  peers = [_start(tmp_path, f"peer{p}", "peer", JAX_NUM_CPU_DEVICES=4, JAX_COORDINATOR_ADDRESS=address,
                  JAX_NUM_PROCESSES=PROCESSES, JAX_PROCESS_ID=p, JAXLM_HEARTBEAT_TIMEOUT_S=HEARTBEAT_S,
                  JAXLM_INIT_TIMEOUT_S=120) for p in range(PROCESSES)]
  everyone = [reference, *peers]
  try:
    _wait_for(lambda: reference[0].poll() is not None, deadline, "the reference run", [])
    assert reference[0].returncode == 0, _tail(reference[1])
    stalled = [tmp_path / f"stalled_p{p}" for p in range(PROCESSES)]
    _wait_for(lambda: all(m.exists() for m in stalled), deadline, "both peers in the kill phase", peers)
    time.sleep(1.0)  # process 0 is now waiting on process 1 inside step 3's collectives
    assert peers[0][0].poll() is None, "process 0 finished step 3 without its stalled peer"
    peers[1][0].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    try:
      peers[0][0].wait(timeout=HEARTBEAT_S + 30)
    except subprocess.TimeoutExpired:
      raise AssertionError(f"process 0 still running {HEARTBEAT_S + 30}s after its peer was killed: it hangs")
    return dict(returncode=peers[0][0].returncode, seconds=time.monotonic() - killed_at, log=_tail(peers[0][1]))
  finally:
    for proc, _ in everyone:
      if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)


def _load(tmp_path, name: str) -> dict:
  with open(tmp_path / f"{name}.json") as f:
    return json.load(f)


def _distinct(reads: list[list[int]]) -> list[tuple[int, ...]]:
  """The batches a process read, in order, each once (the compile reads the first step's batch too)."""
  out = []
  for rows in reads:
    if tuple(rows) not in out:
      out.append(tuple(rows))
  return out


def test_two_processes_train_like_one(tmp_path):
  end = _run_processes(tmp_path)
  reference = _load(tmp_path, "reference_p0")
  peers = [_load(tmp_path, f"peer_p{p}") for p in range(PROCESSES)]
  assert reference["devices"] == 8 and reference["process_count"] == 1
  for p, peer in enumerate(peers):
    assert (peer["process_index"], peer["process_count"], peer["devices"], peer["local_devices"]) == (p, 2, 8, 4)
    assert f"gives process {p} rows [0, 16] of a batch_size of 16" in peer.get("tensor_across_processes", ""), peer

  # Data: process p read exactly the p-th half of each batch the one-process run read, nothing else.
  for phase, steps in (("full", range(4)), ("resume", range(2, 4))):
    batches = _distinct(reference["full"]["reads"]["train"])
    assert len(batches) == 4 and all(len(b) == 16 for b in batches)
    reads = [_distinct(peer[phase]["reads"]["train"]) for peer in peers]
    for i, step in enumerate(steps):
      halves = [set(r[i]) for r in reads]
      assert all(len(h) == 8 for h in halves), (phase, step, halves)
      assert not halves[0] & halves[1], f"{phase} step {step}: both processes read rows {halves[0] & halves[1]}"
      assert halves[0] | halves[1] == set(batches[step]), (phase, step)
    assert [len(r) for r in reads] == [len(steps)] * PROCESSES, (phase, reads)
  # Eval rows too: each process reads its half of every (padded) eval batch, in order.
  expected_eval = reference["full"]["reads"]["eval"]
  assert [len(b) for b in expected_eval] == [8, 8]  # 12 rows: the second batch is padded
  assert [a + b for a, b in zip(*(peer["full"]["reads"]["eval"] for peer in peers))] == expected_eval

  # Losses: the same arithmetic up to the order of cross-device sums.
  expected = reference["full"]["losses"]
  assert len(expected) == 4 and expected["4"] < expected["1"]
  np.testing.assert_allclose([peers[0]["full"]["losses"][s] for s in expected], list(expected.values()),
                             rtol=2e-5, atol=0)
  np.testing.assert_allclose(peers[0]["full"]["eval_loss"], reference["full"]["eval_loss"], rtol=2e-5)
  assert peers[1]["full"]["eval_loss"] == peers[0]["full"]["eval_loss"]  # every process sees the gathered result

  # Checkpoint: written by both processes at step 2, restored into the same (2, 2, 2) layout, steps 3 and 4 again.
  files = peers[0]["full"]["shard_files"]
  assert sorted(files) == ["ocdbt.process_0", "ocdbt.process_1"] and min(files.values()) > 0, files
  resumed = peers[0]["resume"]
  assert resumed["checkpoints"] == ["2", "4"]
  assert resumed["losses"] == {s: peers[0]["full"]["losses"][s] for s in ("3", "4")}
  assert resumed["eval_loss"] == peers[0]["full"]["eval_loss"]

  # A killed peer: the survivor exits with an error from the coordination service, well within the deadline.
  assert end["returncode"] not in (0, 3), end
  assert "another task died" in end["log"] or "unhealthy" in end["log"], end["log"]
  assert end["seconds"] < HEARTBEAT_S + 30


def test_cluster_from_flags_and_environment():
  env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:8476", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3",
         "JAX_LOCAL_DEVICE_IDS": "0,1", "JAXLM_HEARTBEAT_TIMEOUT_S": "7"}
  cluster = distributed.cluster_from(None, env)
  assert cluster == distributed.Cluster("10.0.0.1:8476", 4, 3, (0, 1), 0, distributed.DEFAULT_INIT_TIMEOUT_S, 7)
  assert cluster.requested and not distributed.cluster_from(None, {}).requested
  parser = argparse.ArgumentParser()
  distributed.add_arguments(parser)
  args = parser.parse_args(["--process-id", "1", "--cpu-devices", "2", "--init-timeout", "9"])
  flagged = distributed.cluster_from(args, env)  # a flag wins over its variable; the rest still come from env
  assert (flagged.process_id, flagged.num_processes, flagged.cpu_devices, flagged.init_timeout_s) == (1, 4, 2, 9)
  for bad, match in (({"JAX_PROCESS_ID": "one"}, "JAX_PROCESS_ID='one'"),
                     ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, "process_id must be in"),
                     ({"JAX_COORDINATOR_ADDRESS": "localhost"}, "host:port")):
    with pytest.raises(ValueError, match=match):
      distributed.cluster_from(None, bad)
