"""Named model configs: the YAML files in configs/models/ (each cites the paper and layout it reproduces)."""

from __future__ import annotations

import os

from jaxlm.models.config import ModelConfig, load_model_config
from jaxlm.paths import PRESETS_DIR


def preset_names() -> list[str]:
  """Names of the presets (file names without .yaml), sorted."""
  return sorted(f[:-len(".yaml")] for f in os.listdir(PRESETS_DIR) if f.endswith(".yaml"))


def resolve_config_path(name_or_path: str) -> str:
  """A YAML path as given, or the preset of that name."""
  if os.path.exists(name_or_path):
    return name_or_path
  path = os.path.join(PRESETS_DIR, f"{name_or_path}.yaml")
  if not os.path.exists(path):
    raise ValueError(f"no model config file or preset {name_or_path!r}; presets: {preset_names()}")
  return path


def load_preset(name_or_path: str) -> ModelConfig:
  """The `ModelConfig` of a preset name (e.g. "based-360m") or a YAML path."""
  return load_model_config(resolve_config_path(name_or_path))
