"""Config loading: YAML + dotted overrides into frozen dataclasses; bad keys and types fail naming the key."""

import dataclasses
import glob
import subprocess
import sys

import pytest

from train.config import ConfigError, MQARSetting, TrainConfig, load_config, save_config


def _write(tmp_path, text):
  path = tmp_path / "c.yaml"
  path.write_text(text)
  return str(path)


def test_yaml_and_overrides(tmp_path):
  path = _write(tmp_path, "name: a\noptim:\n  lr: 0.01\ndata:\n  mqar:\n    train:\n      - {seq_len: 32, num_kv_pairs: 2}\n")
  config = load_config(path, ["optim.lr=3e-4", "batch_size=12", "mesh.fsdp=2", "model.d_model=64"])
  assert config.optim.lr == pytest.approx(3e-4) and isinstance(config.optim.lr, float)
  assert config.batch_size == 12 and config.mesh.fsdp == 2 and config.model == {"d_model": 64}
  assert config.data.mqar.train == (MQARSetting(seq_len=32, num_kv_pairs=2, num_examples=1000),)
  with pytest.raises(dataclasses.FrozenInstanceError):
    config.batch_size = 3  # type: ignore[misc]


@pytest.mark.parametrize("override, key", [
    ("optim.lrr=1", "optim.lrr"),
    ("optim.lr=fast", "optim.lr"),
    ("batch_size=1.5", "batch_size"),
    ("checkpoint.async_save=3", "checkpoint.async_save"),
    ("data.mqar.train=[{seq_len: 8, kv: 2}]", "data.mqar.train[0].kv"),
    ("nonsense=1", "nonsense"),
    ("optim=3", "optim"),
    ("data.kind=images", "data.kind"),
    ("log.progress=loud", "log.progress"),
])
def test_bad_key_or_type_names_the_key(override, key):
  with pytest.raises(ConfigError) as info:
    load_config(None, [override])
  assert str(info.value).startswith(key + ":"), str(info.value)


def test_resolved_config_round_trips(tmp_path):
  config = load_config(None, ["name=x", "model={d_model: 32, mixers: [based]}", "optim.warmup_steps=5"])
  save_config(config, str(tmp_path / "config.yaml"))
  assert load_config(str(tmp_path / "config.yaml")) == config


def test_model_may_be_a_path(tmp_path):
  (tmp_path / "model.yaml").write_text("d_model: 48\nvocab_size: 128\n")
  path = _write(tmp_path, "model: model.yaml\n")
  assert load_config(path, ["model.vocab_size=256"]).model == {"d_model": 48, "vocab_size": 256}


@pytest.mark.parametrize("path", sorted(glob.glob("configs/mqar/*.yaml") + glob.glob("configs/train/*.yaml")))
def test_shipped_configs_load(path):
  assert isinstance(load_config(path), TrainConfig)


def test_cli_reports_the_key():
  result = subprocess.run([sys.executable, "-m", "train", "optim.nope=1"], capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 2 and "optim.nope" in result.stderr


def test_bad_model_key_names_it():
  from train.models import build_model
  with pytest.raises(ConfigError, match=r"^model\.d_modl: "):
    build_model(load_config(None, ["model=transformer-tiny", "model.d_modl=3"]))
