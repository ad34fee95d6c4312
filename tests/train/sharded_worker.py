"""Run by test_sharded.py in its own process with 8 host devices: the same small model trained a few steps on
several meshes, printing one JSON line {mesh: losses} plus where the parameters live."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from train.config import load_config  # noqa: E402
from train.logs import read_metrics  # noqa: E402
from train.mesh import make_mesh  # noqa: E402
from train.models import build_model  # noqa: E402
from train.optimizer import decay_mask, make_optimizer  # noqa: E402
from train.run import train  # noqa: E402
from train.state import abstract_model, create_state  # noqa: E402

MESHES = {"1": (1, 1, 1, 1), "8,1,1": (8, 1, 1, 8), "2,4,1": (2, 4, 1, 8), "2,2,2": (2, 2, 2, 8),
          "1,4,2": (1, 4, 2, 8)}

# Every kind of layer the presets use, with head counts and widths divisible by the tensor axis.
MODEL = ("{vocab_size: 64, d_model: 32, num_layers: 3, mixers: [base_conv, attention, based], max_length: 32, "
         "mixer_options: {attention: {num_heads: 2}, based: {num_heads: 2, feature_dim: 8}}, mlp_hidden: 64}")


def overrides(run_dir: str, mesh: tuple[int, ...]) -> list[str]:
  data, fsdp, tensor, devices = mesh
  return [f"model={MODEL}", "data.mqar.vocab_size=64", f"run_dir={run_dir}",
          "data.mqar.train=[{seq_len: 32, num_kv_pairs: 4, num_examples: 256}]",
          "data.mqar.test=[{seq_len: 32, num_kv_pairs: 4, num_examples: 16}]",
          "batch_size=16", "micro_batches=2", "steps=4", "compute_dtype=float32", "log.every=1",
          "log.progress=none", "log.tensorboard=false", "checkpoint.enabled=false", "optim.lr=3e-3",
          "optim.warmup_steps=0", f"mesh.data={data}", f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}",
          f"mesh.devices={devices}"]


def placement(root: str) -> dict:
  """Sharding specs and per-device shard shapes of a few parameters on a (2, 2, 2) mesh."""
  config = load_config(None, overrides(os.path.join(root, "placement"), MESHES["2,2,2"]))
  mesh = make_mesh(config.mesh)
  spec = build_model(config)
  abs_params = nnx.split(abstract_model(spec.model_fn), nnx.Param, ...)[1]
  optimizer = make_optimizer(config.optim, 10, decay_mask(abs_params))
  state, _ = create_state(spec.model_fn, optimizer, mesh, 0)
  out = {}
  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  for path, leaf in flat:
    name = jax.tree_util.keystr(path)
    if hasattr(leaf, "sharding") and leaf.ndim >= 2:
      out[name] = dict(spec=str(leaf.sharding.spec), shape=list(leaf.shape),
                       shard=list(leaf.addressable_shards[0].data.shape))
  return out


def main() -> None:
  root = sys.argv[1]
  assert jax.device_count() == 8, jax.devices()
  losses = {}
  for name, mesh in MESHES.items():
    run_dir = os.path.join(root, name.replace(",", "_"))
    train(load_config(None, overrides(run_dir, mesh)))
    losses[name] = [r["loss"] for r in read_metrics(run_dir) if "loss" in r]
  print(json.dumps(dict(losses=losses, placement=placement(root))))


if __name__ == "__main__":
  main()
