"""The LoLCATs recipe (train/linearize/) on a tiny random Llama built with transformers and imported with
train.convert: stage 1 then stage 2 from the CLI's entry point, the held-out transfer MSE goes down, each stage
changes exactly the parameters it trains (the rest bit-identical), the output run directory samples through the
generate CLI and scores through the eval CLI. The one-pass transfer loss pairs each LoLCATs mixer with its own
layer (a window covering the whole row makes LoLCATs softmax attention exactly: the MSE is then zero), and a merged
LoRA model equals the unmerged one."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch", reason="the recipe test builds its teacher with torch (pip install -e '.[test]')")
transformers = pytest.importorskip("transformers", reason="the recipe test builds its teacher with transformers")

from jaxlm.generate.cli import main as generate_main  # noqa: E402
from jaxlm.layers.lora import add_lora, is_lora_param, merge_lora  # noqa: E402
from jaxlm.models.config import ModelConfig  # noqa: E402
from jaxlm.models.lm import LM  # noqa: E402
from train.config import ConfigError  # noqa: E402
from train.convert.hf_import import import_hf  # noqa: E402
from train.linearize.__main__ import main as linearize_main  # noqa: E402
from train.linearize.config import load_linearize_config  # noqa: E402
from train.linearize.models import (TRANSFER_PARAMS, load_run, load_teacher, student_config,  # noqa: E402
                                    student_from_teacher)
from train.linearize.transfer import layer_mses  # noqa: E402
from train.prepare_data import main as prepare_main  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "lolcats", "tiny.yaml")


def _flat(model) -> dict[str, np.ndarray]:
  pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(pure)[0]}


@pytest.fixture(scope="module")
def teacher_and_data(tmp_path_factory):
  root = tmp_path_factory.mktemp("linearize")
  torch.manual_seed(0)
  config = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                    tie_word_embeddings=True, dtype=torch.float32)
  hf = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():  # HF's 0.02-std init makes attention nearly uniform: too easy a teacher
    for name, p in hf.named_parameters():
      if "norm" not in name:
        p.copy_(torch.randn_like(p) * 0.3)
  hf.save_pretrained(root / "hf")
  import_hf(str(root / "hf"), str(root / "teacher"))
  assert prepare_main(["--input", os.path.join(ROOT, "docs"), "--extensions", ".md", "--tokenizer", "byte",
                       "--eval-fraction", "0.1", "--output", str(root / "data")]) == 0
  return root


@pytest.fixture(scope="module")
def linearized(teacher_and_data):
  root = teacher_and_data
  paths = [f"teacher={root / 'teacher'}", f"out={root / 'out'}", f"data.path={root / 'data'}"]
  assert linearize_main(["--config", CONFIG, "--stage", "transfer", *paths]) == 0
  assert not os.path.isdir(root / "out" / "checkpoints")  # stage 1 only so far
  assert linearize_main(["--config", CONFIG, "--stage", "lora", *paths]) == 0
  with open(root / "out" / "summary.json") as f:
    return root, json.load(f)


def test_transfer_mse_goes_down_and_every_stage_reports(linearized):
  _, summary = linearized
  assert summary["transfer_mse_after"] < 0.95 * summary["transfer_mse_before"], summary
  for key in ("perplexity_teacher", "perplexity_stage1", "perplexity_linearized"):
    assert np.isfinite(summary[key]), key
  # 2 layers x (2 feature maps [4, 8, 8] + a factor [4]); LoRA r 4 on q, k, v, o of width 32 (k, v: 16)
  assert summary["transfer_params"] == 2 * (2 * 4 * 8 * 8 + 4)
  assert summary["lora_params"] == 2 * 4 * (32 + 32 + 32 + 16 + 32 + 16 + 32 + 32)


def test_each_stage_changes_only_what_it_trains(linearized):
  root, _ = linearized
  teacher = _flat(load_teacher(str(root / "teacher"), "float32"))
  stage1 = _flat(load_run(str(root / "out" / "stage1"), "float32"))
  final = _flat(load_run(str(root / "out"), "float32"))
  own = {k for k in stage1 if k.rsplit("/", 1)[-1] in TRANSFER_PARAMS}
  assert len(own) == 3 and set(stage1) - own == set(teacher) and set(final) == set(stage1)
  for key in teacher:  # stage 1: every teacher parameter as it was, bit for bit
    np.testing.assert_array_equal(stage1[key], teacher[key], err_msg=key)
  fresh = _flat(student_from_teacher(load_teacher(str(root / "teacher"), "float32"),
                                     load_linearize_config(CONFIG).lolcats, seed=0))
  for key in own:  # ... and its own parameters trained away from their init
    assert np.abs(stage1[key] - fresh[key]).max() > 1e-3, key
  targets = {k for k in final if k.split("/")[-2] in ("q_proj", "k_proj", "v_proj", "out_proj")}
  assert len(targets) == 4
  for key in final:  # stage 2: only the LoRA targets moved (the adapters merged into them)
    if key in targets:
      assert np.abs(final[key] - stage1[key]).max() > 1e-6, key
    else:
      np.testing.assert_array_equal(final[key], stage1[key], err_msg=key)


def test_output_generates_and_scores(linearized, capsys):
  root, summary = linearized
  out = str(root / "out")
  assert generate_main(["--run", out, "--prompt", "The model", "--max-new-tokens", "6", "--temperature", "0"]) == 0
  assert capsys.readouterr().out.startswith("[sample 1/1: 6 new tokens]\nThe model")
  assert linearize_main(["eval", "--run", out, "--data", str(root / "data"), "--seq-len", "32",
                         "--batch-size", "4", "--batches", "2"]) == 0
  scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  np.testing.assert_allclose(scored["perplexity"], summary["perplexity_linearized"], rtol=1e-5)


def test_transfer_loss_pairs_each_mixer_with_its_own_layer(teacher_and_data):
  """With a window covering the row, LoLCATs is softmax attention: the loss is zero only if each student mixer is
  compared with its own layer's attention on that layer's input."""
  teacher = load_teacher(str(teacher_and_data / "teacher"), "float32")
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 256)
  exact = student_from_teacher(teacher, dict(window=16), seed=0)
  windowed = student_from_teacher(teacher, dict(window=4), seed=0)
  assert float(layer_mses(teacher, exact, tokens).max()) < 1e-9
  assert float(layer_mses(teacher, windowed, tokens).min()) > 1e-4


def test_lora_merge_equals_unmerged_forward():
  # Attention's projections are LoLCATs' (same names and shapes) and it compiles in a fraction of the time
  config = ModelConfig(vocab_size=64, d_model=32, num_layers=2, mixers="attention", dtype="float32",
                       mixer_options={"attention": dict(num_heads=4, num_kv_heads=2)})
  model = LM(config, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(2), (2, 10), 0, 64)
  forward = nnx.jit(lambda m, t: m(t))
  base = forward(model, tokens)
  assert add_lora(model, ("q_proj", "k_proj", "v_proj", "out_proj"), rank=4, alpha=8.0, rngs=nnx.Rngs(1)) == 4
  np.testing.assert_array_equal(forward(model, tokens), base)  # B starts at zero: the adapted model is the base model
  graph, adapters, rest = nnx.split(model, is_lora_param, ...)
  keys = iter(jax.random.split(jax.random.key(3), 8))
  adapters = jax.tree.map(lambda a: 0.3 * jax.random.normal(next(keys), a.shape), adapters)
  model = nnx.merge(graph, adapters, rest)
  unmerged = forward(model, tokens)
  assert float(jnp.abs(unmerged - base).max()) > 1e-2
  assert merge_lora(model) == 4
  np.testing.assert_allclose(forward(model, tokens), unmerged, rtol=1e-5, atol=1e-5)
  assert not any(is_lora_param(path, None) for path, _ in nnx.to_flat_state(nnx.state(model)))


def test_bad_settings_name_the_key(teacher_and_data, tmp_path):
  base = ["teacher=t", "out=o", "data.path=d"]
  config = load_linearize_config(CONFIG, base)  # a stage's optim is read over that stage's defaults
  assert (config.lora.optim.lr, config.lora.optim.b2, config.transfer.optim.weight_decay) == (1e-3, 0.999, 0.0)
  with pytest.raises(ConfigError, match=r"^lolcats\.num_heads"):
    load_linearize_config(CONFIG, [*base, "lolcats.num_heads=2"])
  with pytest.raises(ConfigError, match=r"^lora\.targets"):
    load_linearize_config(CONFIG, [*base, "lora.targets=[gate_proj]"])
  with pytest.raises(ConfigError, match=r"^transfer\.steps"):
    load_linearize_config(CONFIG, [*base, "transfer.steps=-1"])
  with pytest.raises(ConfigError, match=r"^teacher: required"):
    load_linearize_config(None, ["out=o", "data.path=d"])
  teacher = load_teacher(str(teacher_and_data / "teacher"), "float32").config
  scaled = ModelConfig.from_dict({**teacher.to_dict(), "mixer_options": {"attention": {
      **teacher.to_dict()["mixer_options"]["attention"], "rope_scaling": {"type": "linear", "factor": 2.0}}}})
  with pytest.raises(ConfigError, match=r"rope_scaling"):
    student_config(scaled, {})
  assert linearize_main(["--config", CONFIG, f"teacher={tmp_path}", f"out={tmp_path / 'o'}", "data.path=d"]) == 2
