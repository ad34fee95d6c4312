"""Converters between jaxlm run directories and other formats, one module per format, run as
`python -m train.convert <subcommand> ...` (__main__.py lists the subcommands).

  hf_config.py   Hugging Face config.json (Llama, Mistral, Qwen2) <-> our ModelConfig fields
  hf_weights.py  safetensors shards <-> our parameter tree (placed shard by shard under a mesh)
  hf_import.py   `hf-import`: a Hugging Face directory -> a run directory generate and training read
  hf_export.py   `hf-export`: a run directory -> a Hugging Face directory transformers loads
  gguf_import.py `gguf-import`: a llama.cpp GGUF file (dequantised) -> a Hugging Face directory -> hf-import
  monarch.py     `monarch`: a dense run -> a Monarch one (each weight's best Monarch factors, errors reported)
  train_run.py   `--train-config` of the importers: converted weights -> a step-0 run `python -m train` continues
"""


class ConvertError(ValueError):
  """An input cannot be converted; the message names the file, key or value and why."""
