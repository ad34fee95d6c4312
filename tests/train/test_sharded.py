"""Sharded training equals one device: meshes (8,1,1), (2,4,1), (2,2,2), (1,4,2) over 8 host devices, in a process
of their own (XLA_FLAGS must be set before jax starts); parameters and optimizer state really are split."""

import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run_worker(out) -> dict:
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "train", "sharded_worker.py"), str(out)],
                        capture_output=True, text=True, env=env, timeout=1200, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_sharded_training_matches_one_device(tmp_path):
  """One test, one worker process: each mesh compiles its own program, the slow part on 2 CPU cores."""
  result = _run_worker(tmp_path)
  single = np.array(result["losses"]["1"])
  assert len(single) == 4 and single[-1] < single[0]  # the steps do train
  for mesh in ("8,1,1", "2,4,1", "2,2,2", "1,4,2"):
    # float32 compute: only the reduction order differs between meshes
    np.testing.assert_allclose(result["losses"][mesh], single, rtol=2e-5, atol=0, err_msg=f"mesh {mesh}")

  placement = result["placement"]  # on the (data=2, fsdp=2, tensor=2) mesh
  embed = placement["['params']['embed']['embedding']"]
  assert embed["spec"] == "P('tensor', 'fsdp')" and embed["shard"] == [32, 16]  # [vocab, embed] / (2, 2)
  q = placement["['params']['stacks'][1]['blocks']['mixer']['q_proj']['kernel']"]
  assert q["spec"] == "P(None, 'fsdp', 'tensor')" and q["shard"] == [1, 16, 16]
  moments = [v for k, v in placement.items() if k.startswith("['opt_state']") and "embed" in k]
  assert moments and all(m["shard"] == [32, 16] for m in moments)  # Adam's mu and nu follow their parameter
  for name, p in placement.items():
    if "'mixer'" in name and name.startswith("['params']"):
      assert np.prod(p["shard"]) < np.prod(p["shape"]), name  # every mixer matrix is split somewhere
