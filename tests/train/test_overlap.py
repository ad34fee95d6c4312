"""The opt-in overlap flags (train/overlap.py): every one is a flag this jaxlib's XLA knows (an unknown one aborts
the process at start-up), and a flag the user already set keeps the user's value."""

import os
import subprocess
import sys

from train import overlap


def test_overlap_flags_are_known_to_xla():
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=overlap.with_overlap_flags(""))
  proc = subprocess.run([sys.executable, "-c", "import jax, jax.numpy as jnp; print(float(jnp.arange(4.).sum()))"],
                        env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0 and proc.stdout.strip() == "6.0", proc.stderr[-2000:]
  # the check can fail: a misspelt flag does abort the same command
  env["XLA_FLAGS"] += " --xla_gpu_enable_latency_hiding_schedulr=true"
  bad = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env, capture_output=True,
                       text=True, timeout=120)
  assert bad.returncode != 0 and "xla_gpu_enable_latency_hiding_schedulr" in bad.stderr


def test_user_flags_win_and_nothing_is_repeated():
  mine = "--xla_gpu_all_gather_combine_threshold_bytes=1024 --xla_dump_to=/tmp/x"
  flags = overlap.with_overlap_flags(mine).split()
  assert flags[:2] == mine.split()
  assert "--xla_gpu_all_gather_combine_threshold_bytes=1024" in flags
  names = [f.split("=")[0] for f in flags]
  assert len(names) == len(set(names)) and len(flags) == len(overlap.GPU_FLAGS) + 1
  assert overlap.with_overlap_flags(" ".join(flags)) == " ".join(flags)  # applying twice changes nothing
