"""The Hugging Face bridge (train/convert/): tiny random Llama-family models built with transformers (every
parameter redrawn, biases and norm scales included, so a mis-mapped tensor shows) are imported; our float32 logits
and greedy generations equal transformers'; the run directory samples through the generate CLI; exported back,
transformers loads it and gives the same logits, and importing that export gives the same model again. Bad inputs
fail naming the path or value. A 4-device mesh import places each parameter sharded as the training state does."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import yaml

torch = pytest.importorskip("torch", reason="the HF bridge tests need torch (pip install -e '.[test]')")
transformers = pytest.importorskip("transformers", reason="the HF bridge tests need transformers")

from jaxlm.generate import generate  # noqa: E402
from jaxlm.generate.cli import main as generate_main  # noqa: E402
from jaxlm.sampling import SamplingConfig  # noqa: E402
from train.convert import ConvertError  # noqa: E402
from train.convert.__main__ import main as convert_main  # noqa: E402
from train.convert.hf_export import export_hf  # noqa: E402
from train.convert.hf_import import import_hf  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOCAB, T = 96, 12
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=72, num_hidden_layers=2, max_position_embeddings=64,
              dtype=torch.float32)
CASES = {
    # Llama 2: multi-head attention, untied head, θ = 10⁴
    "llama2": ("LlamaForCausalLM", dict(num_attention_heads=4, rms_norm_eps=1e-5, tie_word_embeddings=False)),
    # GQA (4 query heads over 2 kv heads), a head_dim wider than hidden/heads, tied embeddings
    "gqa_tied": ("LlamaForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                          tie_word_embeddings=True, rope_theta=500000.0)),
    # Llama 3.1: the llama3 RoPE rescaling; an original context of 16 puts one frequency in each regime
    "llama31": ("LlamaForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                         rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                           high_freq_factor=4.0, original_max_position_embeddings=16),
                                         rope_theta=500000.0)),
    # Mistral: a 4-token sliding window, shorter than the sequence and than prompt + generation
    "mistral": ("MistralForCausalLM", dict(num_attention_heads=4, num_key_value_heads=1, sliding_window=4,
                                           tie_word_embeddings=False)),
    # Qwen2: biases on q, k and v only
    "qwen2": ("Qwen2ForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
}
GREEDY_CASES = ("llama2", "llama31", "mistral")  # generation compiles its own programs: the cases it differs in


def _hf_model(case: str, seed: int):
  arch, options = CASES[case]
  cls = getattr(transformers, arch)
  config_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
  torch.manual_seed(seed)
  model = cls(config_cls(**COMMON, **options)).eval()
  with torch.no_grad():  # redraw everything: HF starts biases at 0 and norms at 1, which would hide a swap
    for name, p in model.named_parameters():
      p.copy_(torch.randn_like(p) * (0.1 if "norm" in name else 0.3) + (1.0 if "norm" in name else 0.0))
  return model


def _hf_logits(model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy()


def _assert_logits_close(ours, theirs, what: str):
  # float32 throughout: only the order of float32 sums differs
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * float(np.abs(theirs).max()), err_msg=what)


@pytest.fixture(scope="module", params=list(CASES))
def imported(request, tmp_path_factory):
  case = request.param
  root = tmp_path_factory.mktemp(case)
  hf = _hf_model(case, seed=len(case))
  hf.save_pretrained(root / "hf")
  model = import_hf(str(root / "hf"), str(root / "run"))
  return case, root, hf, model


def test_logits_match_transformers(imported, rng):
  case, _, hf, model = imported
  tokens = rng.integers(0, VOCAB, (2, T))
  _assert_logits_close(np.asarray(model(jnp.asarray(tokens))), _hf_logits(hf, tokens), case)


@pytest.mark.parametrize("imported", GREEDY_CASES, indirect=True)
def test_greedy_generation_matches_transformers(imported, rng):
  case, _, hf, model = imported
  prompt = rng.integers(0, VOCAB, (2, 5))
  ours = np.asarray(generate(model, prompt, max_new_tokens=6, sampling=SamplingConfig(temperature=0.0)).tokens_BN)
  # transformers' greedy continuation by its own forward pass (hf.generate would also stop at its config's EOS)
  seq = prompt
  for _ in range(6):
    seq = np.concatenate([seq, _hf_logits(hf, seq)[:, -1].argmax(-1)[:, None]], axis=1)
  theirs = seq[:, 5:]
  np.testing.assert_array_equal(ours, theirs, err_msg=case)


def test_export_loads_in_transformers_and_reimports(imported, rng):
  case, root, hf, model = imported
  export_hf(str(root / "run"), str(root / "export"))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(root / "export", dtype=torch.float32).eval()
  assert type(reloaded) is type(hf)
  tokens = rng.integers(0, VOCAB, (2, T))
  np.testing.assert_array_equal(_hf_logits(reloaded, tokens), _hf_logits(hf, tokens))  # the same float32 weights
  again = import_hf(str(root / "export"), str(root / "run_again"))
  assert yaml.safe_load((root / "run_again" / "model.yaml").read_text()) == yaml.safe_load(
      (root / "run" / "model.yaml").read_text())
  np.testing.assert_array_equal(np.asarray(again(jnp.asarray(tokens))), np.asarray(model(jnp.asarray(tokens))))


def test_generate_cli_reads_the_run_and_its_tokenizer(tmp_path, capsys):
  """A tokenizer.json beside the weights is copied into the run, and `python -m jaxlm.generate --run` uses it."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  words = ["<unk>", "</s>"] + [f"w{i}" for i in range(VOCAB - 2)]
  tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
  tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
  _hf_model("llama2", seed=1).save_pretrained(tmp_path / "hf")
  tokenizer.save(str(tmp_path / "hf" / "tokenizer.json"))
  assert convert_main(["hf-import", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
  assert (tmp_path / "run" / "tokenizer.json").read_bytes() == (tmp_path / "hf" / "tokenizer.json").read_bytes()
  capsys.readouterr()
  assert generate_main(["--run", str(tmp_path / "run"), "--prompt", "w3 w7 w1", "--max-new-tokens", "3",
                        "--temperature", "0"]) == 0
  out = capsys.readouterr().out.splitlines()
  assert out[0].startswith("[sample 1/1:") and out[1].startswith("w3 w7 w1")


def test_bad_inputs_name_the_path_or_value(tmp_path, capsys):
  with pytest.raises(ConvertError, match=f"{tmp_path}/config.json: missing"):
    import_hf(str(tmp_path), str(tmp_path / "run"))
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
  with pytest.raises(ConvertError, match="model_type='gpt2' is not supported"):
    import_hf(str(tmp_path), str(tmp_path / "run"))
  (tmp_path / "config.json").write_text(json.dumps(dict(model_type="llama", vocab_size=10, hidden_size=8,
                                                        num_hidden_layers=1, num_attention_heads=2,
                                                        intermediate_size=16, rope_scaling={"rope_type": "yarn"})))
  with pytest.raises(ConvertError, match="rope type 'yarn' is not supported"):
    import_hf(str(tmp_path), str(tmp_path / "run"))
  assert convert_main(["hf-import", "--hf", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run")]) == 2
  assert "nowhere: no such directory" in capsys.readouterr().err
  assert convert_main(["nonsense"]) == 2
  assert "unknown subcommand 'nonsense'" in capsys.readouterr().err


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
  hf = _hf_model("llama2", seed=2)
  hf.save_pretrained(tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 64}))
  with pytest.raises(ConvertError, match=r"mlp.down_proj.weight has shape \[32, 72\] but the model in config.json "
                                         r"needs \[32, 64\]"):
    import_hf(str(tmp_path), str(tmp_path / "run"))


def test_export_refuses_a_model_the_format_cannot_express(tmp_path):
  (tmp_path / "model.yaml").write_text(yaml.safe_dump(dict(vocab_size=64, d_model=16, num_layers=1, mlp="gelu")))
  with pytest.raises(ConvertError, match="mlp='gelu'"):
    export_hf(str(tmp_path), str(tmp_path / "out"))


def test_mesh_import_places_parameters_sharded(tmp_path):
  """In a process with 4 host devices: imported on a (data 1, fsdp 2, tensor 2) mesh, every matrix is split as
  train/mesh.py places it, and the logits equal the single-device import's."""
  hf = _hf_model("gqa_tied", seed=3)
  hf.save_pretrained(tmp_path / "hf")
  tokens = np.random.default_rng(0).integers(0, VOCAB, (2, T))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "train", "hf_mesh_worker.py"),
                         str(tmp_path / "hf"), str(tmp_path / "run"), json.dumps(tokens.tolist())],
                        capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-4000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  placement = result["placement"]
  assert placement["embed/embedding"] == {"spec": "P('tensor', 'fsdp')", "shard": [VOCAB // 2, 16]}
  assert placement["stacks/0/blocks/mixer/q_proj/kernel"] == {"spec": "P(None, 'fsdp', 'tensor')",
                                                              "shard": [2, 16, 32]}
  assert placement["stacks/0/blocks/mlp/down/kernel"]["shard"] == [2, 36, 16]
  _assert_logits_close(np.array(result["logits"]), _hf_logits(hf, tokens), "mesh import")


def test_train_config_import_is_a_run_training_resumes(tmp_path, capsys):
  """--train-config writes a step-0 training run; `python -m train` on its config.yaml resumes it, so with a zero
  learning rate its next checkpoint still holds exactly the imported model (a fresh init would not)."""
  from jaxlm.checkpoint import load_params
  from train.__main__ import main as train_main
  hf = _hf_model("gqa_tied", seed=4)
  hf.save_pretrained(tmp_path / "hf")
  mqar = "[{seq_len: 16, num_kv_pairs: 2, num_examples: 16}]"
  overrides = [f"data.mqar.vocab_size={VOCAB}", f"data.mqar.train={mqar}", f"data.mqar.test={mqar}", "batch_size=4",
               "steps=1", "compute_dtype=float32", "optim.lr=0.0", "log.progress=none", "log.tensorboard=false",
               "eval_batches=1"]
  config_path = tmp_path / "train.yaml"
  config_path.write_text("name: hf_finetune\n")
  run = tmp_path / "run"
  assert convert_main(["hf-import", "--hf", str(tmp_path / "hf"), "--out", str(run), "--train-config",
                       str(config_path), *overrides]) == 0
  assert yaml.safe_load((run / "config.yaml").read_text())["run_dir"] == str(run)
  assert train_main(["--config", str(run / "config.yaml")]) == 0
  assert sorted(os.listdir(run / "checkpoints")) == ["0", "1"]
  assert "resumed from step 0" in capsys.readouterr().out
  model = import_hf(str(tmp_path / "hf"), str(tmp_path / "plain"))
  assert load_params(model, str(run)) == 1
  tokens = np.random.default_rng(1).integers(0, VOCAB, (2, T))
  _assert_logits_close(np.asarray(model(jnp.asarray(tokens))), _hf_logits(hf, tokens), "trained run")
