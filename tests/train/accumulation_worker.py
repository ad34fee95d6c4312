"""Run by test_step.py in its own process with 8 host devices: the train step with micro_batches=2 compiled on a
(data=2, fsdp=2, tensor=2) mesh. Prints one JSON line: the gradient reductions (all-reduce / reduce-scatter)
whose device groups span the `data` axis, counted inside and outside the micro-batch loop of the compiled HLO,
and the step's loss, gradient norm and parameters against micro_batches=1 on the same rows."""

import json
import os
import re

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from jaxlm.models import LM, ModelConfig  # noqa: E402
from train.config import MeshConfig  # noqa: E402
from train.mesh import make_mesh  # noqa: E402
from train.state import create_state  # noqa: E402
from train.step import IGNORE, make_forward, make_train_step  # noqa: E402

REDUCTIONS = ("all-reduce", "reduce-scatter")
CALLEE = re.compile(r"(?:calls|to_apply|body|condition|branch_computations|called_computations)=\{?(%[^,}\s]+"
                    r"(?:, ?%[^,}\s]+)*)")


def computations(hlo: str) -> dict[str, list[str]]:
  """HLO text -> {computation name: its instruction lines}."""
  comps, name = {}, None
  for line in hlo.splitlines():
    header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
    if name is None and header:
      name, comps[header.group(1)] = header.group(1), []
    elif name is not None and line.startswith("}"):
      name = None
    elif name is not None:
      comps[name].append(line)
  return comps


def reachable(comps: dict[str, list[str]], roots: list[str]) -> set[str]:
  """The computations `roots` run, directly or through fusions, calls, conditionals and nested loops."""
  seen, todo = set(), list(roots)
  while todo:
    name = todo.pop()
    if name not in seen:
      seen.add(name)
      for line in comps[name]:
        for callees in CALLEE.findall(line):
          todo += [c.strip().lstrip("%") for c in callees.split(",")]
  return seen


def device_groups(line: str) -> list[list[int]]:
  """The replica_groups of a collective, in any of XLA's three spellings, as lists of device (partition) ids."""
  explicit = re.search(r"replica_groups=\{(\{[\d,{} ]*\})\}", line)
  if explicit:
    return [[int(i) for i in g.split(",") if i] for g in re.findall(r"\{([\d,]*)\}", explicit.group(1))]
  mesh = re.search(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\(\[([\d,]+)\](?:T\(([\d,]+)\))?\))? "
                   r"\{([^}]*)\}", line)
  if mesh:  # mesh['axis_0'=2,...] {'axis_1'}: devices that differ only along the named axes form a group
    spec, order_dims, order_perm, grouped = mesh.groups()
    names, dims = re.findall(r"'(\w+)'=", spec), [int(d) for d in re.findall(r"=(\d+)", spec)]
    ids = np.arange(int(np.prod(dims)))
    if order_dims:
      ids = ids.reshape([int(d) for d in order_dims.split(",")])
      ids = ids.transpose([int(p) for p in order_perm.split(",")]) if order_perm else ids
    axes = [names.index(a) for a in re.findall(r"'(\w+)'", grouped)]
    rest = [a for a in range(len(dims)) if a not in axes]
    return ids.reshape(dims).transpose(rest + axes).reshape(-1, int(np.prod([dims[a] for a in axes]))).tolist()
  iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line)
  count, size, dims, perm = iota.groups()
  ids = np.arange(int(count) * int(size)).reshape([int(d) for d in dims.split(",")])
  ids = ids.transpose([int(p) for p in perm.split(",")]) if perm else ids
  return ids.reshape(int(count), int(size)).tolist()


def data_reductions(hlo: str, mesh) -> dict[str, int]:
  """Reductions whose groups hold devices of different `data` coordinates, inside any while loop's body (the
  micro-batch scan; the model has no loop of its own here) and outside."""
  comps = computations(hlo)
  bodies = [b for lines in comps.values() for line in lines for b in re.findall(r"body=%?([\w.\-]+)", line)]
  inside = reachable(comps, bodies)
  data_of = lambda i: np.unravel_index(i, mesh.devices.shape)[mesh.axis_names.index("data")]
  counts = {"inside": 0, "outside": 0}
  for name, lines in comps.items():
    for line in lines:
      op = re.match(r"^\s*\S+ = .+? ([\w-]+?)(?:-start)?\(", line)
      if op and op.group(1) in REDUCTIONS:
        if any(len({data_of(i) for i in group}) > 1 for group in device_groups(line)):
          counts["inside" if name in inside else "outside"] += 1
  return counts


def main() -> None:
  assert jax.device_count() == 8, jax.devices()
  mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  config = ModelConfig.from_dict(dict(vocab_size=64, d_model=32, num_layers=2, mixers="attention", max_length=16,
                                     mixer_options={"attention": {"num_heads": 2}}, mlp_hidden=64, dtype="float32"))
  optimizer = optax.sgd(1.0)  # the update is the gradient itself
  state, setup = create_state(lambda: LM(config, rngs=nnx.Rngs(0)), optimizer, mesh, 0)
  step = jax.jit(make_train_step(make_forward(setup.graphdef, setup.rest), optimizer, setup.shardings["params"]),
                 out_shardings=(setup.shardings, None))
  rng = np.random.default_rng(0)
  rows, T = 16, 16
  inputs, labels = rng.integers(0, 64, (rows, T)), rng.integers(0, 64, (rows, T))
  labels[rng.random((rows, T)) < 0.5] = IGNORE
  rows_layout = NamedSharding(mesh, P(None, ("data", "fsdp")))

  def batch(micro_batches):  # row r to micro-batch r % M, as train/data/loader.py's to_global
    split = lambda x: jnp.asarray(x.reshape(rows // micro_batches, micro_batches, T).swapaxes(0, 1), jnp.int32)
    return {name: jax.device_put(split(x), rows_layout) for name, x in (("inputs", inputs), ("labels", labels))}

  out = {}
  with jax.set_mesh(mesh):
    for micro_batches in (2, 1):
      compiled = step.lower(state, batch(micro_batches)).compile()
      new_state, metrics = compiled(state, batch(micro_batches))
      out[micro_batches] = dict(reductions=data_reductions(compiled.as_text(), mesh), loss=float(metrics["loss"]),
                                grad_norm=float(metrics["grad_norm"]),
                                params=[np.asarray(p).ravel().tolist() for p in jax.tree.leaves(new_state["params"])])
  print(json.dumps(out))


if __name__ == "__main__":
  main()
