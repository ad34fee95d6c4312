"""Kernels run per shard (shard_map) inside a sharded jit and equal the single-device reference."""

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import SESSION_SEED

ROOT = Path(__file__).resolve().parents[2]


def test_kernels_run_per_shard_on_a_mesh():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
             PYTHONPATH=str(ROOT))
  result = subprocess.run([sys.executable, "-m", "tests.pallas_kernels.sharded_kernels_worker", str(SESSION_SEED)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout + result.stderr[-3000:]
  assert result.stdout.count(": ok") == 2, result.stdout
