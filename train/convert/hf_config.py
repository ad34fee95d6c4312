"""Hugging Face config.json (Llama 2/3/3.1, Mistral, Qwen2) <-> the fields of our `ModelConfig`.

These families are one architecture in our terms: token embedding, pre-norm blocks of GQA attention with RoPE in
the rotate_half layout (ours, so weights need no permutation) and a SwiGLU MLP, RMSNorm, a tied or untied head.
They differ only in options:

  config.json                          ModelConfig
  hidden_size, num_hidden_layers       d_model, num_layers
  num_attention_heads, num_key_value_heads, head_dim
                                       mixer_options.attention.{num_heads, num_kv_heads, head_dim}
  rope_theta, rope_scaling (or transformers 5's rope_parameters), partial_rotary_factor
                                       mixer_options.attention.{rope_base, rope_scaling, rotary_dim}
  attention_bias (Llama)               mixer_options.attention.use_bias (q, k, v and o)
  Qwen2's q/k/v biases                 mixer_options.attention.qkv_bias
  sliding_window (Mistral)             mixer_options.attention.window (keys seen, the query's own included)
  intermediate_size, mlp_bias          mlp_hidden, mlp_bias
  rms_norm_eps, tie_word_embeddings    norm_eps, tie_embeddings
  max_position_embeddings              max_length
  torch_dtype (transformers 5: dtype)  dtype and param_dtype, unless the caller names one

Anything else these families can say (another activation, RoPE type or per-layer windows) is refused by name.
"""

from __future__ import annotations

import json
import os
from typing import Any

from jaxlm.models.config import ModelConfig
from train.convert import ConvertError

MODEL_TYPES = ("llama", "mistral", "qwen2")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def read_hf_config(hf_dir: str) -> dict[str, Any]:
  """config.json of a Hugging Face model directory; ConvertError naming the path when absent or unreadable."""
  path = os.path.join(hf_dir, "config.json")
  if not os.path.isdir(hf_dir):
    raise ConvertError(f"{hf_dir}: no such directory (expected a Hugging Face model directory)")
  if not os.path.isfile(path):
    raise ConvertError(f"{path}: missing (a Hugging Face model directory holds config.json and safetensors files)")
  try:
    with open(path) as f:
      data = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ConvertError(f"{path}: not readable JSON ({e})") from None
  if not isinstance(data, dict):
    raise ConvertError(f"{path}: expected a JSON object, got {type(data).__name__}")
  return data


def _rope(hf: dict[str, Any], where: str) -> tuple[float, dict[str, Any] | None]:
  """(θ, our rope_scaling mapping or None) from either the legacy keys or transformers 5's rope_parameters."""
  params = dict(hf.get("rope_parameters") or {})
  scaling = dict(hf.get("rope_scaling") or params)
  theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  if kind in ("default", None):
    return theta, None
  if kind == "linear":
    return theta, {"type": "linear", "factor": float(scaling["factor"])}
  if kind == "llama3":
    return theta, {"type": "llama3", "factor": float(scaling["factor"]),
                   "low_freq_factor": float(scaling["low_freq_factor"]),
                   "high_freq_factor": float(scaling["high_freq_factor"]),
                   "original_max_length": int(scaling.get("original_max_position_embeddings",
                                                          hf.get("max_position_embeddings")))}
  raise ConvertError(f"{where}: rope type {kind!r} is not supported (supported: default, linear, llama3)")


def _require(hf: dict[str, Any], key: str, where: str) -> Any:
  if hf.get(key) is None:
    raise ConvertError(f"{where}: required key {key!r} is missing")
  return hf[key]


def model_fields_from_hf(hf: dict[str, Any], *, dtype: str | None = None, where: str = "config.json"
                         ) -> dict[str, Any]:
  """Our ModelConfig fields for a Hugging Face config (module docstring's table), validated by building the
  config; `dtype` (else the checkpoint's) sets both the compute and the parameter dtype."""
  model_type = hf.get("model_type")
  if model_type not in MODEL_TYPES:
    raise ConvertError(f"{where}: model_type={model_type!r} is not supported (supported: {', '.join(MODEL_TYPES)})")
  act = hf.get("hidden_act", "silu")
  if act not in ("silu", "swish"):
    raise ConvertError(f"{where}: hidden_act={act!r} is not supported (the SwiGLU MLP uses silu)")
  heads = int(_require(hf, "num_attention_heads", where))
  d_model = int(_require(hf, "hidden_size", where))
  head_dim = int(hf.get("head_dim") or d_model // heads)
  theta, scaling = _rope(hf, where)
  attention: dict[str, Any] = {"num_heads": heads, "num_kv_heads": int(hf.get("num_key_value_heads") or heads),
                               "rope_base": theta}
  if head_dim * heads != d_model:
    attention["head_dim"] = head_dim
  if scaling:
    attention["rope_scaling"] = scaling
  partial = float(hf.get("partial_rotary_factor", 1.0))
  if partial != 1.0:
    attention["rotary_dim"] = int(head_dim * partial)
  if hf.get("attention_bias"):
    attention["use_bias"] = True
  if model_type == "qwen2":
    attention["qkv_bias"] = True  # hard-wired in Qwen2Attention: q, k, v with biases, o without
    if hf.get("use_sliding_window"):
      raise ConvertError(f"{where}: use_sliding_window=true (Qwen2's per-layer windows) is not supported")
  # transformers' MistralConfig defaults to a 4096 window when config.json does not say (null: none)
  window = hf.get("sliding_window", 4096) if model_type == "mistral" else None
  if window is not None:
    attention["window"] = int(window)
  layer_types = set(hf.get("layer_types") or ())
  if layer_types - {"full_attention"} and not (window is not None and layer_types == {"sliding_attention"}):
    raise ConvertError(f"{where}: layer_types={sorted(layer_types)} (per-layer attention kinds) is not supported")
  if dtype is None:
    dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
  if dtype not in DTYPES:
    raise ConvertError(f"{where}: dtype {dtype!r} is not supported (choose from {sorted(DTYPES)})")
  fields = {
      "vocab_size": int(_require(hf, "vocab_size", where)),
      "d_model": d_model,
      "num_layers": int(_require(hf, "num_hidden_layers", where)),
      "mixers": "attention",
      "mixer_options": {"attention": attention},
      "mlp": "swiglu",
      "mlp_hidden": int(_require(hf, "intermediate_size", where)),
      "mlp_bias": bool(hf.get("mlp_bias", False)),
      "norm": "rmsnorm",
      "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
      "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
      "position_embedding": "none",
      "max_length": int(hf.get("max_position_embeddings", 2048)),
      "dtype": dtype,
      "param_dtype": dtype,
  }
  try:
    ModelConfig.from_dict(fields)
  except ValueError as e:
    raise ConvertError(f"{where}: the model it describes is not a valid jaxlm model: {e}") from None
  return fields


def _refusal(field: str, value: Any, why: str) -> ConvertError:
  return ConvertError(f"{field}={value!r}: {why}; a Hugging Face Llama/Mistral/Qwen2 config cannot express it")


def hf_config_from_model(config: ModelConfig, *, dtype: str) -> dict[str, Any]:
  """A config.json for our model (Llama; Mistral with a window; Qwen2 with q/k/v-only biases); ConvertError
  naming the first field a Hugging Face model of these families cannot express."""
  mixers = sorted(set(config.mixers))
  if mixers not in (["attention"], ["sliding_window"]):
    raise _refusal("mixers", mixers, "only models whose layers are all one kind of attention convert")
  for field, want in (("mlp", "swiglu"), ("norm", "rmsnorm"), ("position_embedding", "none")):
    if getattr(config, field) != want:
      raise _refusal(field, getattr(config, field), f"these families use {want}")
  where = f"mixer_options.{mixers[0]}"
  attention = config.mixer_configs()[mixers[0]]
  if attention.projection != "dense":
    raise _refusal(f"{where}.projection", attention.projection, "only dense projections convert")
  if attention.softcap is not None:
    raise _refusal(f"{where}.softcap", attention.softcap, "no logit softcap in these families")
  qkv_bias = attention.use_bias if attention.qkv_bias is None else attention.qkv_bias
  if attention.window is not None:
    model_type = "mistral"
  elif qkv_bias and not attention.use_bias:
    model_type = "qwen2"
  else:
    model_type = "llama"
  if model_type != "llama" and config.mlp_bias:
    raise _refusal("mlp_bias", True, f"{model_type} has no MLP biases")
  if model_type == "mistral" and (qkv_bias or attention.use_bias):
    raise _refusal(f"{where}.use_bias", True, "Mistral has no biases")
  if model_type == "llama" and qkv_bias != attention.use_bias:
    raise _refusal(f"{where}.qkv_bias", qkv_bias, "Llama's attention_bias covers q, k, v and o together")
  head_dim = attention.resolved_head_dim()
  hf: dict[str, Any] = {
      "architectures": [ARCHITECTURES[model_type]],
      "model_type": model_type,
      "vocab_size": config.vocab_size,
      "hidden_size": config.d_model,
      "intermediate_size": config.hidden,
      "num_hidden_layers": config.num_layers,
      "num_attention_heads": attention.num_heads,
      "num_key_value_heads": attention.kv_heads(),
      "head_dim": head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": config.max_length,
      "rms_norm_eps": config.norm_eps,
      "tie_word_embeddings": config.tie_embeddings,
      "rope_theta": attention.rope_base,
      "torch_dtype": dtype,
  }
  if attention.resolved_rotary_dim() != head_dim:
    hf["partial_rotary_factor"] = attention.resolved_rotary_dim() / head_dim
  scaling = attention.rope_scaling
  if scaling is not None:
    hf["rope_scaling"] = {"rope_type": scaling.type, "factor": scaling.factor}
    if scaling.type == "llama3":
      hf["rope_scaling"].update(low_freq_factor=scaling.low_freq_factor, high_freq_factor=scaling.high_freq_factor,
                                original_max_position_embeddings=scaling.original_max_length)
  if model_type == "llama":
    hf.update(attention_bias=attention.use_bias, mlp_bias=config.mlp_bias)
  elif model_type == "mistral":
    hf["sliding_window"] = attention.window
  else:
    hf["use_sliding_window"] = False
  return hf
