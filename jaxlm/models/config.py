"""`ModelConfig`: the whole description of a decoder LM, validated when it is made (before any compilation),
readable from YAML.

Layer layout (`mixers`): a list with one mixer name per layer, or a pattern string of ';'-separated clauses: the
first clause is the default mixer, each later clause `name@spec` puts `name` at the layers `spec` lists, as
comma-separated indices (`1,8`) and residues (`1%5`: every layer i with i mod 5 = 1); later clauses win.

  "attention"                                    every layer attention
  "h3; attention@1,8"                            H3 hybrid: attention at layers 1 and 8
  "base_conv; based@1%5; sliding_window@2%5"     BASED: linear attention at i ≡ 1, sliding window at i ≡ 2 (mod 5)
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import yaml
from flax.core import FrozenDict

from jaxlm.layers.mlp import MLPS, default_hidden
from jaxlm.layers.norms import NORMS
from jaxlm.models.registry import MIXERS, OPS, mixer_config

DTYPES = ("float32", "bfloat16", "float16")
POSITION_EMBEDDINGS = ("none", "learned")
REMAT = ("none", "full", "dots")  # or "names:<a>,<b>" (checkpoint names "mixer_out", "mlp_out")


def _freeze(value: Any) -> Any:
  """Hashable copy: mappings -> FrozenDict, lists -> tuples (configs are static parts of jitted modules)."""
  if isinstance(value, Mapping):
    return FrozenDict({k: _freeze(v) for k, v in value.items()})
  if isinstance(value, (list, tuple)):
    return tuple(_freeze(v) for v in value)
  return value


def _thaw(value: Any) -> Any:
  if isinstance(value, Mapping):
    return {k: _thaw(v) for k, v in value.items()}
  if isinstance(value, tuple):
    return [_thaw(v) for v in value]
  return value


def parse_layer_pattern(pattern: str, num_layers: int) -> tuple[str, ...]:
  """One mixer name per layer from a pattern string (module docstring); ValueError naming `mixers`."""
  clauses = [c.strip() for c in pattern.split(";") if c.strip()]
  if not clauses or "@" in clauses[0]:
    raise ValueError(f"mixers={pattern!r}: the first clause must be a default mixer name")
  names = [clauses[0]] * num_layers
  for clause in clauses[1:]:
    name, _, spec = (s.strip() for s in clause.partition("@"))
    if not spec:
      raise ValueError(f"mixers={pattern!r}: clause {clause!r} must read name@layers (e.g. attention@1,8)")
    for item in (s.strip() for s in spec.split(",")):
      if m := re.fullmatch(r"(\d+)%(\d+)", item):
        residue, modulus = int(m[1]), int(m[2])
        if modulus < 1 or residue >= modulus:
          raise ValueError(f"mixers={pattern!r}: {item!r} needs 0 <= residue < modulus")
        for i in range(residue, num_layers, modulus):
          names[i] = name
      elif re.fullmatch(r"\d+", item):
        if int(item) >= num_layers:
          raise ValueError(f"mixers={pattern!r}: layer {item} does not exist ({num_layers=})")
        names[int(item)] = name
      else:
        raise ValueError(f"mixers={pattern!r}: cannot read layers {item!r} (use 3 or 1%5)")
  return tuple(names)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int
  d_model: int
  num_layers: int
  mixers: Any = "attention"  # list of names per layer, or a pattern string (module docstring)
  mixer_options: Any = dataclasses.field(default_factory=dict)  # mixer name -> its config's fields
  mlp: str = "swiglu"  # swiglu | gelu | monarch | none
  mlp_hidden: int | None = None  # None: 8/3·d_model rounded to 128 (swiglu), 4·d_model (gelu, monarch)
  mlp_bias: bool = False  # biases in the MLP maps (GPT-2 style)
  mlp_nblocks: int = 4  # Monarch blocks per factor (mlp = monarch)
  norm: str = "rmsnorm"  # rmsnorm | layernorm
  norm_eps: float = 1e-5
  tie_embeddings: bool = True  # LM head = token embeddingᵀ
  position_embedding: str = "none"  # none (RoPE in attention, or convolutions) | learned (GPT-2)
  max_length: int = 2048  # longest sequence: learned positions and Hyena's filters are this long
  init_std: float = 0.02  # normal init of the embeddings (and untied head)
  dtype: str = "bfloat16"  # compute dtype; parameters stay in param_dtype
  param_dtype: str = "float32"
  implementation: Any = dataclasses.field(default_factory=dict)  # op -> implementation name (default "auto")
  scan_layers: bool = True  # run each run of identical consecutive layers as one lax.scan
  remat: str = "none"  # per-layer jax.checkpoint: none | full | dots | names:mixer_out,mlp_out

  def __post_init__(self):
    set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
    for name in ("vocab_size", "d_model", "num_layers", "max_length"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(self.mixers, str):
      set_("mixers", parse_layer_pattern(self.mixers, self.num_layers))
    elif isinstance(self.mixers, (list, tuple)) and all(isinstance(m, str) for m in self.mixers):
      if len(self.mixers) != self.num_layers:
        raise ValueError(f"mixers lists {len(self.mixers)} layers but num_layers={self.num_layers}")
      set_("mixers", tuple(self.mixers))
    else:
      raise ValueError(f"mixers must be a pattern string or a list of mixer names, got {self.mixers!r}")
    unknown = sorted(set(self.mixers) - set(MIXERS))
    if unknown:
      raise ValueError(f"mixers: unknown mixer(s) {unknown}; choose from {sorted(MIXERS)}")
    if not isinstance(self.mixer_options, Mapping):
      raise ValueError(f"mixer_options must map mixer names to options, got {self.mixer_options!r}")
    for name, options in self.mixer_options.items():
      if name not in MIXERS:
        raise ValueError(f"mixer_options.{name}: unknown mixer; choose from {sorted(MIXERS)}")
      if not isinstance(options, Mapping):
        raise ValueError(f"mixer_options.{name} must be a mapping of options, got {options!r}")
    set_("mixer_options", _freeze(self.mixer_options))
    if not isinstance(self.implementation, Mapping):
      raise ValueError(f"implementation must map op names to implementation names, got {self.implementation!r}")
    for op, name in self.implementation.items():
      if op not in OPS:
        raise ValueError(f"implementation.{op}: unknown op; choose from {OPS}")
      if not isinstance(name, str):
        raise ValueError(f"implementation.{op} must be a name (e.g. 'auto'), got {name!r}")
    set_("implementation", _freeze(self.implementation))
    self._check_choices()
    # Build every mixer config now: this is where per-mixer options are checked (heads, window, feature_dim).
    set_("_mixer_configs", FrozenDict({name: self._make_mixer_config(name) for name in set(self.mixers)}))

  def _check_choices(self) -> None:
    for name, allowed in (("mlp", MLPS), ("norm", NORMS), ("dtype", DTYPES), ("param_dtype", DTYPES),
                          ("position_embedding", POSITION_EMBEDDINGS)):
      if getattr(self, name) not in allowed:
        raise ValueError(f"{name}={getattr(self, name)!r} not in {allowed}")
    if self.mlp_hidden is not None and (not isinstance(self.mlp_hidden, int) or self.mlp_hidden < 1):
      raise ValueError(f"mlp_hidden must be a positive integer or None, got {self.mlp_hidden!r}")
    if self.mlp == "monarch":
      if not isinstance(self.mlp_nblocks, int) or self.mlp_nblocks < 1:
        raise ValueError(f"mlp_nblocks must be a positive integer, got {self.mlp_nblocks!r}")
      for name, width in (("d_model", self.d_model), ("mlp_hidden", self.hidden)):
        if width % self.mlp_nblocks:
          raise ValueError(f"mlp_nblocks={self.mlp_nblocks} must divide {name}={width} (Monarch blocks)")
    if not self.norm_eps > 0:
      raise ValueError(f"norm_eps must be positive, got {self.norm_eps!r}")
    if not self.init_std > 0:
      raise ValueError(f"init_std must be positive, got {self.init_std!r}")
    if self.remat not in REMAT and not (self.remat.startswith("names:") and len(self.remat) > len("names:")):
      raise ValueError(f"remat={self.remat!r}: expected one of {REMAT} or names:<a>,<b>")

  def _make_mixer_config(self, name: str) -> Any:
    return mixer_config(name, dict(self.mixer_options.get(name, {})), d_model=self.d_model,
                        max_length=self.max_length, implementation=dict(self.implementation))

  @property
  def hidden(self) -> int:
    """The MLP hidden width."""
    return self.mlp_hidden or default_hidden(self.mlp, self.d_model)

  def mixer_configs(self) -> Mapping[str, Any]:
    """Mixer name -> its config dataclass, for the mixers this model uses."""
    return self._mixer_configs

  def layer_groups(self) -> list[tuple[str, int]]:
    """Runs of identical consecutive mixers as (name, count): each run is one scanned stack."""
    groups: list[tuple[str, int]] = []
    for name in self.mixers:
      if groups and groups[-1][0] == name:
        groups[-1] = (name, groups[-1][1] + 1)
      else:
        groups.append((name, 1))
    return groups

  @classmethod
  def from_dict(cls, data: Mapping[str, Any]) -> "ModelConfig":
    """A config from a plain mapping (parsed YAML); unknown keys raise ValueError naming the key."""
    if not isinstance(data, Mapping):
      raise ValueError(f"a model config must be a mapping, got {type(data).__name__}")
    fields = {f.name for f in dataclasses.fields(cls)}
    for key in data:
      if key not in fields:
        raise ValueError(f"{key}: unknown model config key; known keys: {sorted(fields)}")
    missing = [f.name for f in dataclasses.fields(cls)
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
               and f.name not in data]
    if missing:
      raise ValueError(f"{missing[0]}: required model config key is missing")
    return cls(**dict(data))

  def to_dict(self) -> dict[str, Any]:
    """Plain types, for YAML/JSON (from_dict(to_dict()) gives an equal config)."""
    return {f.name: _thaw(getattr(self, f.name)) for f in dataclasses.fields(self)}


def load_model_config(path: str) -> ModelConfig:
  """A `ModelConfig` from a YAML file of its fields."""
  with open(path) as f:
    data = yaml.safe_load(f)
  try:
    return ModelConfig.from_dict(data or {})
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None

