"""`python -m train.convert monarch`: a dense GELU-MLP run directory -> a Monarch one. A model whose dense maps are
already Monarch matrices converts exactly (same logits); a random one reports its projection error, which is the
Eckart–Young optimum; the output directory loads into the Monarch model."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx

from jaxlm.checkpoint import load_params, save_params
from pallas_kernels.monarch import reference
from tests.tolerances import assert_close
from train.convert import ConvertError
from train.convert import monarch as convert_monarch

DENSE_FIELDS = dict(vocab_size=256, d_model=64, num_layers=2, mixers="attention",
                    mixer_options={"attention": {"num_heads": 4, "use_bias": True, "rotary_dim": 0}},
                    mlp="gelu", mlp_hidden=256, mlp_bias=True, norm="layernorm", tie_embeddings=True,
                    position_embedding="learned", max_length=64, dtype="float32")


def _params(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _set_params(model, pure):
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(model, state)


def _dense_of_monarch(monarch_params, path):
  """Stacked dense kernels [layers, in, out] of the Monarch maps at `path` (x @ kernel = Monarch map)."""
  node = monarch_params
  for key in path:
    node = node[key]
  return jnp.swapaxes(jax.vmap(reference.monarch_to_dense)(node["w1"], node["w2"]), -1, -2)


def _write_run(tmp_path, fields, model):
  run = tmp_path / "dense_run"
  save_params(model, str(run / "checkpoints"), step=7)
  (run / "model.yaml").write_text(yaml.safe_dump(fields))
  return run


@pytest.mark.parametrize("attention", [False, True], ids=["mlp", "mlp_and_attention"])
def test_a_monarch_model_round_trips_exactly(tmp_path, attention):
  """Dense maps set to the dense matrices of a Monarch model's factors: the converted model has the same logits."""
  monarch_fields = convert_monarch.monarch_fields(DENSE_FIELDS, 4, attention)
  source = convert_monarch._model(monarch_fields)
  dense = convert_monarch._model(DENSE_FIELDS)
  params, source_params = _params(dense), _params(source)
  block = params["stacks"][0]["blocks"]
  maps = [("mlp", "fc1"), ("mlp", "fc2")] + ([("mixer", m) for m in ("q_proj", "k_proj", "v_proj", "out_proj")]
                                             if attention else [])
  for module, name in maps:
    block[module][name]["kernel"] = _dense_of_monarch(source_params, ("stacks", 0, "blocks", module, name))
  _set_params(dense, params)
  run = _write_run(tmp_path, DENSE_FIELDS, dense)
  out = tmp_path / "monarch_run"
  argv = ["--run", str(run), "--out", str(out), "--nblocks", "4"] + (["--attention"] if attention else [])
  assert convert_monarch.main(argv) == 0
  report = json.loads((out / "monarch_errors.json").read_text())
  assert report["step"] == 7 and len(report["relative_error"]) == len(maps)
  assert all(len(v) == 2 and max(v) < 1e-5 for v in report["relative_error"].values()), report
  written = yaml.safe_load((out / "model.yaml").read_text())
  assert written == monarch_fields
  converted = convert_monarch._model(written)
  load_params(converted, str(out))
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 256)
  assert_close(converted(tokens), dense(tokens), dtype=jnp.float32, reduction_len=256 * 64)


def test_a_dense_model_reports_its_best_fit_error(tmp_path):
  dense = convert_monarch._model(DENSE_FIELDS)
  run = _write_run(tmp_path, DENSE_FIELDS, dense)
  out = tmp_path / "monarch_run"
  assert convert_monarch.main(["--run", str(run), "--out", str(out)]) == 0
  errors = json.loads((out / "monarch_errors.json").read_text())["relative_error"]
  assert set(errors) == {"stacks/0/blocks/mlp/fc1", "stacks/0/blocks/mlp/fc2"}
  kernel = np.asarray(_params(dense)["stacks"][0]["blocks"]["mlp"]["fc1"]["kernel"][1], np.float64)  # layer 1
  # Eckart–Young: the squared error is the tail energy of each [out/4, in/4] sub-block beyond rank Q/4 = 4.
  blocks = kernel.T.reshape(4, 64, 4, 16).transpose(0, 2, 1, 3)
  tail = sum(np.sum(np.linalg.svd(b, compute_uv=False)[4:] ** 2) for b in blocks.reshape(16, 64, 16))
  np.testing.assert_allclose(errors["stacks/0/blocks/mlp/fc1"][1], np.sqrt(tail) / np.linalg.norm(kernel),
                             rtol=1e-4)
  assert all(0.1 < e < 1 for v in errors.values() for e in v)
  # The other parameters are copied unchanged.
  converted = convert_monarch._model(yaml.safe_load((out / "model.yaml").read_text()))
  load_params(converted, str(out))
  np.testing.assert_array_equal(_params(converted)["embed"]["embedding"], _params(dense)["embed"]["embedding"])
  assert convert_monarch.main(["--run", str(run), "--out", str(out)]) == 2  # refuses to overwrite


def test_refuses_what_it_cannot_convert():
  with pytest.raises(ConvertError, match="mlp='swiglu'"):
    convert_monarch.monarch_fields(dict(DENSE_FIELDS, mlp="swiglu"), 4, False)
  with pytest.raises(ConvertError, match="not a multiple"):
    convert_monarch.project_map(jnp.ones((12, 24)), (4, 6, 3), (4, 6, 6))
  with pytest.raises(SystemExit):  # key=value overrides without --train-config: argparse's usage error
    convert_monarch.main(["--run", "dense", "--out", "monarch", "steps=2"])


def test_cli_entry_point_lists_the_subcommand():
  from train.convert import __main__ as convert_main
  assert convert_main.SUBCOMMANDS["monarch"] == "train.convert.monarch"
  assert os.path.isfile(convert_monarch.__file__)


def _mlp_w1(model):
  return np.asarray(_params(model)["stacks"][0]["blocks"]["mlp"]["fc1"]["w1"])


@pytest.mark.filterwarnings("ignore:Sharding info not provided")  # the raw restore of the step-0 state
def test_train_config_writes_a_run_that_training_continues(tmp_path, capsys):
  """--train-config: the Monarch model as a step-0 training run (train/convert/train_run.py, as hf-import's).
  Before any step it holds exactly the params-only conversion (same logits) and the optimizer's fresh state;
  `python -m train` on its config.yaml resumes at step 0 and trains 2 steps of finite loss that move the weights."""
  import orbax.checkpoint as ocp

  from train.__main__ import main as train_main
  from train.logs import read_metrics
  dense = convert_monarch._model(DENSE_FIELDS)
  run = _write_run(tmp_path, DENSE_FIELDS, dense)
  plain, out = tmp_path / "plain", tmp_path / "monarch_run"
  assert convert_monarch.main(["--run", str(run), "--out", str(plain)]) == 0
  # One batch of 4 examples (batch_size 4): both steps see the same batch, so the second loss is lower.
  mqar = "[{seq_len: 16, num_kv_pairs: 2, num_examples: 4}]"
  overrides = ["data.mqar.vocab_size=256", f"data.mqar.train={mqar}", f"data.mqar.test={mqar}", "batch_size=4",
               "steps=2", "compute_dtype=float32", "optim.lr=1e-2", "log.every=1", "log.progress=none",
               "log.tensorboard=false", "eval_batches=1"]
  config_path = tmp_path / "train.yaml"
  config_path.write_text("name: monarch_finetune\n")
  assert convert_monarch.main(["--run", str(run), "--out", str(out), "--train-config", str(config_path),
                               *overrides]) == 0
  assert yaml.safe_load((out / "config.yaml").read_text())["run_dir"] == str(out)
  assert (out / "monarch_errors.json").is_file()

  fields = yaml.safe_load((out / "model.yaml").read_text())
  assert fields["mlp"] == "monarch"
  model = convert_monarch._model(fields)
  tokens = jax.random.randint(jax.random.key(2), (2, 16), 0, 256)
  load_params(model, str(plain))
  converted_logits, converted_w1 = model(tokens), _mlp_w1(model)
  assert load_params(model, str(out)) == 0
  np.testing.assert_array_equal(model(tokens), converted_logits)
  state = ocp.PyTreeCheckpointer().restore(str(out / "checkpoints" / "0" / "state"))
  assert int(state["step"]) == 0
  # Adam's count, mu and nu: all zero before the first step; last, the peak learning rate (train/optimizer.py).
  *moments, peak = jax.tree.leaves(state["opt_state"])
  assert moments and all(not np.any(np.asarray(m)) for m in moments), "the optimizer state is not fresh"
  assert float(peak) == np.float32(yaml.safe_load((out / "config.yaml").read_text())["optim"]["lr"])

  assert train_main(["--config", str(out / "config.yaml")]) == 0
  assert "resumed from step 0" in capsys.readouterr().out
  assert sorted(os.listdir(out / "checkpoints")) == ["0", "2"]
  losses = [float(r["loss"]) for r in read_metrics(str(out)) if "loss" in r]
  assert len(losses) == 2 and np.all(np.isfinite(losses)) and losses[1] < losses[0], losses
  assert load_params(model, str(out)) == 2
  assert not np.array_equal(_mlp_w1(model), converted_w1)  # the Monarch factors themselves train
