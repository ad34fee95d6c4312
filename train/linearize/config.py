"""`LinearizeConfig`: the LoLCATs recipe's settings (python -m train.linearize --config configs/lolcats/<name>.yaml),
loaded as train/config.py loads training configs: strict keys, types and ranges, dotted `key=value` overrides,
ConfigError naming the dotted key.

Defaults follow the LoLCATs code (HazyResearch/lolcats): attention transfer with AdamW at lr 1e-2, no weight decay
(configs/experiment/llama3_1_8b/distill_alpaca_clean_xent0_mse1000_lr1e-2.yaml: MSE only, no cross-entropy);
LoRA r 8, alpha 16 on q, k, v, o at lr 1e-4, no weight decay (finetune_qkvo_alpaca_clean.yaml); window 64, the
Hedgehog map, a window factor starting at sigmoid(-2.197) = 0.1 (configs/model/llama3_1_8b/
distill_llama3_1_8b_lk_smd_wtk64_fd64_w01.yaml). Their plateau schedule is replaced by cosine to 0.1 x lr.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import yaml

from train.config import ConfigError, OptimConfig, TextDataConfig, apply_override, from_dict, to_dict

# The LolcatsConfig fields a recipe may set; the rest (heads, head dim, RoPE, biases) come from the teacher.
LOLCATS_OPTIONS = ("window", "feature_map", "feature_dim", "affine_factors", "init_window_factor")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
STAGES = ("all", "transfer", "lora")
# LoLCATs' mixer settings; a recipe's `lolcats:` mapping is read over these.
LOLCATS_DEFAULTS = dict(window=64, feature_map="hedgehog", init_window_factor=-2.1972245773362196)


@dataclasses.dataclass(frozen=True)
class TransferConfig:
  """Stage 1: only the feature maps and window factors train, on the layer-wise MSE to softmax attention."""
  steps: int = 100
  optim: OptimConfig = OptimConfig(lr=1e-2, b2=0.999, weight_decay=0.0, min_lr_ratio=0.1)


@dataclasses.dataclass(frozen=True)
class LoraStageConfig:
  """Stage 2: LoRA on the mixers' projections with the next-token loss; everything else frozen (LoLCATs freezes
  the feature maps here too: its load_and_convert_finetune makes only the adapters trainable)."""
  steps: int = 100
  rank: int = 8
  alpha: float = 16.0
  targets: tuple[str, ...] = LORA_TARGETS
  optim: OptimConfig = OptimConfig(lr=1e-4, b2=0.999, weight_decay=0.0, min_lr_ratio=0.1)


@dataclasses.dataclass(frozen=True)
class LinearizeConfig:
  teacher: str = ""  # run directory of the Transformer to linearize (python -m train.convert hf-import --out)
  out: str = ""  # run directory to write: the linearized model; out/stage1 holds the model after stage 1
  seed: int = 0  # new parameters' init and the data order
  compute_dtype: str = "bfloat16"  # activations and matmuls; parameters stay float32
  data: TextDataConfig = TextDataConfig()  # python -m train.prepare_data output, with the teacher's tokenizer
  batch_size: int = 8  # rows per step, in both stages
  lolcats: dict[str, Any] = dataclasses.field(default_factory=lambda: dict(LOLCATS_DEFAULTS))  # over the defaults
  transfer: TransferConfig = TransferConfig()
  lora: LoraStageConfig = LoraStageConfig()
  loss_chunk: int = 0  # stage 2: positions per chunk of the loss (0 = whole logits), as TrainConfig.loss_chunk
  eval_batches: int = 8  # held-out batches for the perplexity of teacher and each stage; 0 = no eval
  log_every: int = 10  # steps between metric lines

  def stage1_dir(self) -> str:
    return f"{self.out.rstrip('/')}/stage1"


RANGES = {"seed": 0, "batch_size": 1, "transfer.steps": 0, "lora.steps": 0, "lora.rank": 1, "loss_chunk": 0,
          "eval_batches": 0, "log_every": 1, "data.seq_len": 2}


def _get(config: Any, key: str) -> Any:
  for part in key.split("."):
    config = getattr(config, part)
  return config


def check(config: LinearizeConfig) -> LinearizeConfig:
  """ConfigError naming the first bad key and its value."""
  for key in ("teacher", "out", "data.path"):
    if not _get(config, key):
      raise ConfigError(f"{key}: required")
  for key, low in RANGES.items():
    if _get(config, key) < low:
      raise ConfigError(f"{key}: must be >= {low}, got {_get(config, key)}")
  if config.compute_dtype not in ("float32", "bfloat16"):
    raise ConfigError(f"compute_dtype: {config.compute_dtype!r} is not one of ('float32', 'bfloat16')")
  for stage in ("transfer", "lora"):
    optim = _get(config, f"{stage}.optim")
    if not optim.lr > 0:
      raise ConfigError(f"{stage}.optim.lr: must be > 0, got {optim.lr}")
  if not config.lora.alpha > 0:
    raise ConfigError(f"lora.alpha: must be > 0, got {config.lora.alpha}")
  if not config.lora.targets or any(t not in LORA_TARGETS for t in config.lora.targets):
    raise ConfigError(f"lora.targets: {list(config.lora.targets)} must be a non-empty subset of {LORA_TARGETS}")
  for key in config.lolcats:
    if key not in LOLCATS_OPTIONS:
      raise ConfigError(f"lolcats.{key}: not a recipe option (choose from {LOLCATS_OPTIONS}; heads, head dim and "
                        f"RoPE come from the teacher)")
  return config


def load_linearize_config(path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> LinearizeConfig:
  """The recipe in the YAML at `path` (None = defaults) with dotted overrides applied in order."""
  data: dict[str, Any] = {}
  if path:
    with open(path) as f:
      data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
      raise ConfigError(f"{path}: the top level must be a mapping")
  for override in overrides:
    apply_override(data, override)
  if isinstance(data.get("lolcats"), dict):
    data["lolcats"] = {**LOLCATS_DEFAULTS, **data["lolcats"]}
  # A stage's `optim:` is read over that stage's defaults (LoLCATs' betas, lr, no decay), not OptimConfig's.
  for stage, default in (("transfer", TransferConfig().optim), ("lora", LoraStageConfig().optim)):
    section = data.get(stage)
    if isinstance(section, dict) and isinstance(section.get("optim"), dict):
      section["optim"] = {**to_dict(default), **section["optim"]}
  return check(from_dict(LinearizeConfig, data))


def save_linearize_config(config: LinearizeConfig, path: str) -> None:
  with open(path, "w") as f:
    yaml.safe_dump(to_dict(config), f, sort_keys=False)
