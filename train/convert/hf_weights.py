"""Hugging Face safetensors shards <-> our parameter tree (a pure dict of an `LM`'s nnx.Params).

Names, per layer i (our stacked parameters carry the layers of one run of identical layers on a leading axis):

  model.embed_tokens.weight [V, E]                  embed/embedding [V, E]
  model.layers.i.input_layernorm.weight             stacks/g/blocks/mixer_norm/scale [layer]
  model.layers.i.self_attn.{q,k,v,o}_proj.weight    stacks/g/blocks/mixer/{q,k,v,out}_proj/kernel [layer]ᵀ
  model.layers.i.post_attention_layernorm.weight    stacks/g/blocks/mlp_norm/scale [layer]
  model.layers.i.mlp.{gate,up,down}_proj.weight     stacks/g/blocks/mlp/{gate,up,down}/kernel [layer]ᵀ
  model.norm.weight                                 final_norm/scale
  lm_head.weight [V, E]                             head/kernel [E, V] (untied only)

torch's Linear stores [out, in] and ours [in, out], hence the transposes (biases map as they are). Reading
places every parameter straight into its sharding: `jax.make_array_from_callback` asks for each device's block
and the block is read from the memory-mapped file, so no device (and no host buffer) ever holds a whole tree.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from flax import nnx
from safetensors import safe_open

from jaxlm.models.config import ModelConfig
from jaxlm.models.lm import abstract_model
from train.convert import ConvertError

INDEX = "model.safetensors.index.json"
# Buffers some exporters write beside the weights; recomputed from the config, so they are skipped.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

_LAYER_NAMES = {
    ("mixer_norm", "scale"): "input_layernorm.weight",
    ("mlp_norm", "scale"): "post_attention_layernorm.weight",
    **{("mixer", f"{ours}_proj", kind): f"self_attn.{theirs}_proj.{hf_kind}"
       for ours, theirs in (("q", "q"), ("k", "k"), ("v", "v"), ("out", "o"))
       for kind, hf_kind in (("kernel", "weight"), ("bias", "bias"))},
    **{("mlp", ours, kind): f"mlp.{ours}_proj.{hf_kind}"
       for ours in ("gate", "up", "down") for kind, hf_kind in (("kernel", "weight"), ("bias", "bias"))},
}
_TOP_NAMES = {("embed", "embedding"): "model.embed_tokens.weight", ("final_norm", "scale"): "model.norm.weight",
              ("head", "kernel"): "lm_head.weight"}


@dataclasses.dataclass(frozen=True)
class Source:
  """Where one of our parameters lives in a Hugging Face checkpoint."""
  names: tuple[str, ...]  # one tensor, or one per layer of a stacked parameter (stacked along axis 0)
  transpose: bool  # a torch Linear weight [out, in] for our kernel [in, out]
  stacked: bool


def _key(entry: Any) -> Any:
  return getattr(entry, "key", getattr(entry, "idx", entry))


def abstract_params(config: ModelConfig) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """(graphdef, abstract Params, abstract rest) of the LM `config` describes: shapes and axis names only."""
  return nnx.split(abstract_model(config), nnx.Param, ...)


def param_sources(config: ModelConfig) -> dict[tuple[Any, ...], Source]:
  """Our parameter path (keys of the pure dict) -> its tensors in a Hugging Face checkpoint."""
  _, params, _ = abstract_params(config)
  offsets, start = [], 0
  for _, count in config.layer_groups():
    offsets.append(start)
    start += count
  sources = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(params))[0]:
    path = tuple(_key(k) for k in path)
    if path[0] == "stacks":
      group, rest = path[1], path[3:]
      if rest not in _LAYER_NAMES:
        raise ConvertError(f"parameter {'/'.join(map(str, path))} has no Hugging Face counterpart")
      layers = range(offsets[group], offsets[group] + leaf.shape[0])
      sources[path] = Source(tuple(f"model.layers.{i}.{_LAYER_NAMES[rest]}" for i in layers),
                             transpose=rest[-1] == "kernel", stacked=True)
    elif path in _TOP_NAMES:
      sources[path] = Source((_TOP_NAMES[path],), transpose=path == ("head", "kernel"), stacked=False)
    else:
      raise ConvertError(f"parameter {'/'.join(map(str, path))} has no Hugging Face counterpart")
  return sources


class SafetensorsReader:
  """The tensors of a directory's safetensors files (sharded with model.safetensors.index.json, or not), read
  lazily: `read(name, index)` takes only the block `index` selects from the memory-mapped file."""

  def __init__(self, hf_dir: str, stack: contextlib.ExitStack):
    index = os.path.join(hf_dir, INDEX)
    if os.path.isfile(index):
      with open(index) as f:
        weight_map = json.load(f).get("weight_map", {})
      files = sorted(set(weight_map.values()))
    else:
      files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(hf_dir, "*.safetensors")))
    if not files:
      raise ConvertError(f"{hf_dir}: no *.safetensors files (only safetensors checkpoints are read; re-save a "
                         f"PyTorch .bin checkpoint with save_pretrained(..., safe_serialization=True))")
    self.files: dict[str, str] = {}
    self._handles: dict[str, Any] = {}
    for name in files:
      path = os.path.join(hf_dir, name)
      if not os.path.isfile(path):
        raise ConvertError(f"{index} lists {name}, which is missing")
      handle = stack.enter_context(safe_open(path, framework="numpy"))
      self._handles[path] = handle
      for key in handle.keys():
        self.files[key] = path

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._handles[self.files[name]].get_slice(name).get_shape())

  def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
    return np.asarray(self._handles[self.files[name]].get_slice(name)[index])


def _check_names(reader: SafetensorsReader, sources: dict[tuple[Any, ...], Source], shapes: dict, config: ModelConfig,
                 hf_dir: str) -> None:
  """ConvertError naming the first missing, misshapen or unused tensor."""
  used = set()
  for path, source in sources.items():
    want = shapes[path][1:] if source.stacked else shapes[path]
    want = tuple(reversed(want)) if source.transpose else tuple(want)
    for name in source.names:
      if name not in reader.files:
        raise ConvertError(f"{hf_dir}: tensor {name} is missing (needed for {'/'.join(map(str, path))})")
      if reader.shape(name) != want:
        raise ConvertError(f"{reader.files[name]}: tensor {name} has shape {list(reader.shape(name))} but the "
                           f"model in config.json needs {list(want)}")
      used.add(name)
  unused = sorted(n for n in set(reader.files) - used if not n.endswith(IGNORED_SUFFIXES)
                  and not (config.tie_embeddings and n == "lm_head.weight"))  # a tied head saved anyway
  if unused:
    raise ConvertError(f"{hf_dir}: {len(unused)} tensor(s) the model does not use, e.g. {unused[0]} in "
                       f"{reader.files[unused[0]]} (another architecture, or a config.json that does not match?)")


def _block_reader(reader: SafetensorsReader, source: Source, dtype: Any):
  """index (a tuple of slices into our array) -> that block as a numpy array of `dtype`."""
  def one(name: str, inner: tuple[slice, ...]) -> np.ndarray:
    if source.transpose:
      return reader.read(name, tuple(reversed(inner))).T.astype(dtype)
    return reader.read(name, inner).astype(dtype)

  def block(index: tuple[slice, ...]) -> np.ndarray:
    if not source.stacked:
      return one(source.names[0], index)
    names = source.names[index[0]]
    return np.stack([one(name, index[1:]) for name in names])

  return block


def read_hf_params(hf_dir: str, config: ModelConfig, mesh: jax.sharding.Mesh | None = None) -> nnx.State:
  """Our LM's Params (an nnx.State over jax arrays of config.param_dtype) from the safetensors files in `hf_dir`;
  with a mesh each is placed as the training state places it (train/mesh.py), one device block at a time."""
  _, params, _ = abstract_params(config)
  sources = param_sources(config)
  dtype = np.dtype(jax.numpy.dtype(config.param_dtype))
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, nnx.to_pure_dict(params))
  else:
    from train.mesh import state_shardings
    shardings = state_shardings(params, mesh)
  flat_shardings = {tuple(_key(k) for k in path): sh
                    for path, sh in jax.tree_util.tree_flatten_with_path(shardings)[0]}
  flat_params = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(params))[0]
  shapes = {tuple(_key(k) for k in path): tuple(leaf.shape) for path, leaf in flat_params}
  with contextlib.ExitStack() as stack:
    reader = SafetensorsReader(hf_dir, stack)
    _check_names(reader, sources, shapes, config, hf_dir)
    arrays = {path: jax.make_array_from_callback(shapes[path], flat_shardings[path],
                                                 _block_reader(reader, sources[path], dtype))
              for path in sources}
  pure = nnx.to_pure_dict(params)
  for path, array in arrays.items():
    node = pure
    for k in path[:-1]:
      node = node[k]
    node[path[-1]] = array
  nnx.replace_by_pure_dict(params, pure)
  return params


def hf_tensors(config: ModelConfig, params: dict, dtype: Any) -> Iterator[tuple[str, tuple[int, ...], Any]]:
  """(name, shape, fetch) for every Hugging Face tensor of our pure-dict `params`, in layer order; `fetch()`
  returns it as a numpy array of `dtype` (one tensor on the host at a time)."""
  flat = {tuple(_key(k) for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
  entries = []
  for path, source in param_sources(config).items():
    leaf = flat[path]
    for i, name in enumerate(source.names):
      shape = tuple(leaf.shape[1:] if source.stacked else leaf.shape)
      shape = tuple(reversed(shape)) if source.transpose else shape

      def fetch(leaf=leaf, i=i, source=source):
        array = np.asarray(jax.device_get(leaf[i] if source.stacked else leaf))
        return np.ascontiguousarray(array.T if source.transpose else array).astype(dtype)

      entries.append((name, shape, fetch))
  order = lambda e: (e[0].startswith("lm_head"), _layer_of(e[0]), e[0])  # noqa: E731
  yield from sorted(entries, key=order)


def _layer_of(name: str) -> int:
  parts = name.split(".")
  return int(parts[2]) if parts[:2] == ["model", "layers"] else -1


def write_safetensors(tensors: list[tuple[str, tuple[int, ...], Any]], out_dir: str, dtype: Any,
                      max_shard_bytes: int = 2 << 30) -> list[str]:
  """The tensors as safetensors shards of at most `max_shard_bytes` (one file, or model-0000i-of-0000n files with
  model.safetensors.index.json, as save_pretrained writes them); returns the file names."""
  from safetensors.numpy import save_file
  itemsize = np.dtype(dtype).itemsize
  shards: list[list] = [[]]
  size = 0
  for entry in tensors:
    nbytes = int(np.prod(entry[1])) * itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(entry)
    size += nbytes
  names = (["model.safetensors"] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  weight_map, total = {}, 0
  for file_name, shard in zip(names, shards):
    arrays = {name: fetch() for name, _, fetch in shard}
    save_file(arrays, os.path.join(out_dir, file_name), metadata={"format": "pt"})
    for name, array in arrays.items():
      weight_map[name] = file_name
      total += array.nbytes
  if len(shards) > 1:
    with open(os.path.join(out_dir, INDEX), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  return names
