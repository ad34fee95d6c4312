"""Run by test_hf_convert.py in its own process with 4 host devices: imports a Hugging Face directory onto a
(data 1, fsdp 2, tensor 2) mesh and prints one JSON line: each parameter's spec and per-device shard shape, and
the logits of the given tokens computed from the sharded parameters."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from train.config import MeshConfig  # noqa: E402
from train.convert.hf_import import import_hf  # noqa: E402
from train.mesh import make_mesh  # noqa: E402


def main(hf_dir: str, run_dir: str, tokens: list) -> None:
  mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=2))
  model = import_hf(hf_dir, run_dir, mesh=mesh)
  placement = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))[0]:
    name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    assert leaf.sharding.mesh.devices.size == 4, name
    placement[name] = {"spec": str(leaf.sharding.spec), "shard": list(leaf.addressable_shards[0].data.shape)}
  with jax.set_mesh(mesh):
    logits = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(tokens, jnp.int32))
  print(json.dumps({"placement": placement, "logits": np.asarray(logits).tolist()}))


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))
