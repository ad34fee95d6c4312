"""Generation and sampling: greedy decoding equals the argmax of the parallel logits rolled forward (ragged
prompts), stop tokens end their row only, top-k = 1 is greedy, seeded sampling repeats, the nucleus is cut where
it should be, checkpoints load back, and the CLI runs on a tiny config."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from jaxlm.checkpoint import load_params, save_params
from jaxlm.generate import generate, pad_prompts
from jaxlm.generate.cli import main
from jaxlm.models import LM, load_preset
from jaxlm.sampling import SamplingConfig, sample, top_p_mask

N = 6  # new tokens
GREEDY = SamplingConfig(temperature=0.0)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def model():
  # rbg keys compile far faster than threefry on CPU; the init distribution is the same.
  return LM(load_preset("transformer-tiny"), rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))


@pytest.fixture(scope="module")
def prompts():
  """Two ragged prompts, the padding filled with junk tokens (it must not matter)."""
  rng = np.random.default_rng(1234)
  tokens, lengths = pad_prompts([rng.integers(0, 256, 5).tolist(), rng.integers(0, 256, 2).tolist()])
  tokens[1, 2:] = rng.integers(0, 256, 3)
  return tokens, lengths


@pytest.fixture(scope="module")
def greedy(model, prompts):
  return generate(model, *prompts, max_new_tokens=N, sampling=GREEDY)


def test_greedy_equals_argmax_of_parallel_logits(model, prompts, greedy):
  """Each greedy token is the argmax of the parallel forward over the prompt and the tokens before it."""
  tokens, lengths = prompts
  out = np.asarray(greedy.tokens_BN)
  np.testing.assert_array_equal(np.asarray(greedy.num_tokens_B), [N, N])
  width = int(lengths.max()) + N
  seqs = np.zeros((len(lengths), width), np.int32)  # causal: what follows a row's sequence is irrelevant
  for b, n in enumerate(lengths):
    seqs[b, :n + N] = np.concatenate([tokens[b, :n], out[b]])
  logits = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(seqs)))
  for b, n in enumerate(lengths):
    np.testing.assert_array_equal(out[b], logits[b, n - 1:n - 1 + N].argmax(-1))


def test_stop_tokens_end_their_row_only(model, prompts, greedy):
  out = np.asarray(greedy.tokens_BN)
  stop = int(out[0, 1])  # row 0 stops after its second token
  got = generate(model, *prompts, max_new_tokens=N, sampling=GREEDY, stop_tokens=[stop], pad_id=-1)
  for b in range(out.shape[0]):
    hits = np.flatnonzero(out[b] == stop)
    n = hits[0] + 1 if hits.size else N
    assert int(got.num_tokens_B[b]) == n
    np.testing.assert_array_equal(np.asarray(got.tokens_BN[b, :n]), out[b, :n])
    assert (np.asarray(got.tokens_BN[b, n:]) == -1).all()


def test_top_k_one_is_greedy_and_sampling_is_seeded(model, prompts, greedy):
  top1 = generate(model, *prompts, max_new_tokens=N, sampling=SamplingConfig(temperature=0.7, top_k=1), seed=5)
  np.testing.assert_array_equal(np.asarray(top1.tokens_BN), np.asarray(greedy.tokens_BN))
  nucleus = SamplingConfig(temperature=1.0, top_p=0.95)
  runs = [np.asarray(generate(model, *prompts, max_new_tokens=N, sampling=nucleus, seed=s).tokens_BN)
          for s in (0, 0, 1)]
  np.testing.assert_array_equal(runs[0], runs[1])
  assert not np.array_equal(runs[0], runs[2])  # 12 draws from ~256 near-uniform tokens


def test_sampling_filters(rng):
  """top-p keeps the most likely tokens until their mass reaches p; top-k keeps k; draws follow the renormalised
  distribution."""
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  kept = lambda p: np.isfinite(np.asarray(top_p_mask(logits, p)))[0].tolist()  # noqa: E731
  assert kept(0.7) == [True, True, False, False]
  assert kept(0.85) == [True, True, True, False]
  assert kept(0.1) == [True, False, False, False]
  draws = jax.vmap(lambda k: sample(k, logits, SamplingConfig(top_p=0.7)))(
      jax.random.split(jax.random.key(int(rng.integers(1 << 30))), 4000))[:, 0]
  counts = np.bincount(np.asarray(draws), minlength=4)
  assert counts[2:].sum() == 0 and abs(counts[0] / 4000 - 0.5 / 0.8) < 0.04
  top2 = jax.vmap(lambda k: sample(k, logits, SamplingConfig(top_k=2)))(jax.random.split(jax.random.key(0), 500))
  assert set(np.asarray(top2).ravel().tolist()) == {0, 1}
  for bad in (dict(temperature=-1.0), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5)):
    with pytest.raises(ValueError):
      SamplingConfig(**bad)


def test_load_params_from_both_checkpoint_layouts(model, tmp_path):
  """save_params' "params" item, and train/'s layout (item "state" = {params, opt_state, ...}) under a run dir."""
  expected = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  target = nnx.clone(model)
  scramble = lambda: nnx.update(target, jax.tree.map(lambda x: x + 1.0, nnx.state(target, nnx.Param)))  # noqa
  same = lambda: all(np.array_equal(a, b) for a, b in zip(  # noqa: E731
      jax.tree.leaves(expected), jax.tree.leaves(nnx.to_pure_dict(nnx.state(target, nnx.Param)))))
  save_params(model, str(tmp_path / "plain"), step=3)
  scramble()
  assert not same() and load_params(target, str(tmp_path / "plain")) == 3 and same()
  state = dict(params=expected, opt_state=jax.tree.map(jnp.zeros_like, expected), step=jnp.int32(9))
  with ocp.CheckpointManager(str(tmp_path / "run" / "checkpoints"), item_names=("state", "data")) as manager:
    manager.save(9, args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave({})))
    manager.wait_until_finished()
  scramble()
  assert not same() and load_params(target, str(tmp_path / "run")) == 9 and same()


def test_cli_generates_from_a_tiny_config():
  cmd = [sys.executable, "-m", "jaxlm.generate", "--config", "transformer-tiny", "--tokenizer", "byte",
         "--prompt", "Hello", "ab", "--max-new-tokens", "5", "--temperature", "0"]
  env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.splitlines()
  assert len(lines) == 4 and lines[0] == "[sample 1/2: 5 new tokens]", proc.stdout
  assert lines[1].startswith("Hello") and lines[2] == "[sample 2/2: 5 new tokens]" and lines[3].startswith("ab")
  assert "random init" in proc.stderr


def test_cli_benchmark_reports_prefill_and_decode(capsys):
  main(["--config", "transformer-tiny", "--benchmark", "--batch", "2", "3", "--prompt-len", "8", "--new-tokens",
        "4", "--repeats", "1", "--prefill-chunk", "3"])
  out = capsys.readouterr().out
  assert "batch 2," in out and "batch 3," in out and "prefill 8 tokens in pieces of 3" in out and "tokens/s" in out
  assert "copy rate" in out and out.count("MB per decode step") == 2 and "of the measured copy rate" in out
