"""Presets in configs/models/: parameter counts within 2% of the papers' numbers (counted with eval_shape, never
allocated), the published layer layouts, a cited source in each file, and a tiny variant of each family."""

import pathlib

import pytest

from jaxlm.models import count_params, load_preset, preset_names
from jaxlm.models.presets import resolve_config_path

# Parameter counts the papers give for these models (sources in each YAML's header).
PAPER_PARAMS = {
    "transformer-125m": 125e6,  # GPT-3 Small's size (Brown et al. 2020, Table 2.1)
    "transformer-360m": 360e6,  # BASED paper's Transformer++ 360M
    "transformer-1.3b": 1.3e9,  # BASED paper's Transformer++ 1.3B
    "transformer-1.3b-fla": 1.44e9,  # flame's transformer_1B.json layout (1.365B) with our 50288 vocabulary
    "based-360m": 360e6,  # BASED 360M
    "based-1.3b": 1.35e9,  # BASED "1.3b": the released layout (based-1b.yaml) holds 1.35B
    "h3-125m": 125e6,  # H3 paper, hybrid H3 125M
    "h3-355m": 355e6,  # H3 paper, hybrid H3 355M
    "hyena-125m": 125e6,  # Hyena paper, 125M scale
    "hyena-355m": 355e6,  # Hyena paper, Hyena-2 355M
    "gpt2-small-monarch": 72e6,  # Monarch paper, Monarch-GPT-2-Small
    "gpt2-medium-monarch": 165e6,  # Monarch paper, Monarch-GPT-2-Medium
}
FAMILIES = {"transformer", "based", "h3", "hyena", "gpt2"}


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_param_count_matches_paper(name):
  count = count_params(load_preset(name))
  assert abs(count / PAPER_PARAMS[name] - 1) <= 0.02, f"{name}: {count / 1e6:.1f}M vs {PAPER_PARAMS[name] / 1e6}M"


def test_every_preset_is_listed_and_cites_its_source():
  names = set(preset_names())
  assert set(PAPER_PARAMS) <= names
  tiny = {n for n in names if n.endswith("tiny")}
  assert {n.split("-")[0] for n in tiny} == FAMILIES, "each family needs a tiny variant for tests and CPU runs"
  assert names == set(PAPER_PARAMS) | tiny, f"untested presets: {names - set(PAPER_PARAMS) - tiny}"
  for name in PAPER_PARAMS:
    header = pathlib.Path(resolve_config_path(name)).read_text().split("\nvocab_size")[0]
    assert "arXiv" in header or "et al." in header, f"{name}.yaml: cite the paper in its header comment"


def test_based_released_layouts():
  """Linear attention at 1, 6, 11, 16, 21 (+ 27, 33 at 1.3B), sliding window one layer later, BaseConv elsewhere."""
  for name, based in (("based-360m", [1, 6, 11, 16, 21]), ("based-1.3b", [1, 6, 11, 16, 21, 27, 33])):
    config = load_preset(name)
    assert [i for i, m in enumerate(config.mixers) if m == "based"] == based
    assert [i for i, m in enumerate(config.mixers) if m == "sliding_window"] == [i + 1 for i in based]
    assert config.mixers.count("base_conv") == config.num_layers - 2 * len(based)
    assert config.mixer_configs()["sliding_window"].window == 128


@pytest.mark.parametrize("name", ["h3-125m", "h3-355m"])
def test_h3_hybrids_have_two_attention_layers(name):
  config = load_preset(name)
  assert config.mixers.count("attention") == 2 and config.mixers.count("h3") == config.num_layers - 2


@pytest.mark.parametrize("name", ["gpt2-small-monarch", "gpt2-medium-monarch"])
def test_gpt2_monarch_uses_four_blocks(name):
  config = load_preset(name)
  assert config.mlp == "monarch" and config.mlp_nblocks == 4
  assert config.mixer_configs()["attention"].projection == "monarch"
  assert config.position_embedding == "learned"


@pytest.mark.parametrize("name", sorted(n for n in preset_names() if n.endswith("tiny")))
def test_tiny_presets_are_tiny_and_byte_level(name):
  config = load_preset(name)
  assert count_params(config) < 500_000 and config.vocab_size == 256 and config.dtype == "float32"
