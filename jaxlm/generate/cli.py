"""`python -m jaxlm.generate`: sample from a trained run, a model YAML or a preset, or time prefill and decode.

Where the model comes from, in order:
  --run DIR          a training run directory (train/run_dir.py): its model.yaml, latest checkpoint, tokenizer
  --checkpoint PATH  alone: the run that the checkpoint belongs to (PATH is the run, its checkpoints/ or a step)
  --config NAME      a preset name, a model YAML, or a run's config.yaml (its model section); with --checkpoint
                     the parameters are read from there, else they are a random init (said so on stderr)
The tokenizer is the run's (its tokenizer.json, else bytes) unless --tokenizer names one; a tokenizer that is not
the one the run was trained with, or that has more tokens than the model, is refused. Problems (missing files,
a checkpoint of another shape) are reported in one line with exit code 2.

Samples print one after another, each under a header line `[sample i/n: k new tokens]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import filecmp
import os
import sys
from collections.abc import Sequence

import numpy as np
import yaml

from jaxlm.generate import generate, init_model, pad_prompts
from jaxlm.generate.benchmark import SETTINGS
from jaxlm.models import ModelConfig, load_preset
from jaxlm.models.config import load_model_config
from jaxlm.sampling import SamplingConfig
from jaxlm.tokenizer import Tokenizer, load_tokenizer


class UsageError(Exception):
  """Something the user gave cannot work; the message says what and where."""


@dataclasses.dataclass(frozen=True)
class Source:
  config: ModelConfig
  checkpoint: str | None  # where the parameters are read from; None = random init
  run_dir: str | None  # the training run the model belongs to, if known


def find_run_dir(path: str) -> str | None:
  """The run directory holding `path` (the run itself, its checkpoints/ or one step's folder), if any."""
  path = os.path.abspath(path)
  for candidate in (path, os.path.dirname(path), os.path.dirname(os.path.dirname(path))):
    if os.path.isfile(os.path.join(candidate, "model.yaml")) or os.path.isfile(os.path.join(candidate,
                                                                                            "config.yaml")):
      return candidate
  return None


def run_model_config(run_dir: str) -> ModelConfig:
  """A run's model: its model.yaml, or the model section of its config.yaml (runs written before model.yaml)."""
  path = os.path.join(run_dir, "model.yaml")
  if os.path.isfile(path):
    return load_model_config(path)
  path = os.path.join(run_dir, "config.yaml")
  config = _train_config_model(path)
  if config is None:
    raise UsageError(f"{path}: no model section")
  return config


def _train_config_model(path: str) -> ModelConfig | None:
  """The model of a training config (a YAML with a `model:` mapping), None for any other file. compute_dtype and
  remat fill the model's dtype and remat as train/models.py's model_fields does (jaxlm cannot import train/)."""
  if not path.endswith((".yaml", ".yml")) or not os.path.isfile(path):
    return None
  with open(path) as f:
    data = yaml.safe_load(f) or {}
  model = data.get("model") if isinstance(data, dict) else None
  if not isinstance(model, dict):
    return None
  return ModelConfig.from_dict({"dtype": data.get("compute_dtype", "bfloat16"), "remat": data.get("remat", "none"),
                                **model})


def resolve_source(args: argparse.Namespace) -> Source:
  if args.run:
    if not os.path.isdir(args.run):
      raise UsageError(f"--run {args.run}: no such directory")
    if not (os.path.isfile(os.path.join(args.run, "model.yaml")) or os.path.isfile(
        os.path.join(args.run, "config.yaml"))):
      raise UsageError(f"--run {args.run}: not a run directory (no model.yaml or config.yaml)")
    return Source(run_model_config(args.run), args.checkpoint or args.run, os.path.abspath(args.run))
  if args.checkpoint and not os.path.exists(args.checkpoint):
    raise UsageError(f"--checkpoint {args.checkpoint}: no such file or directory")
  run_dir = find_run_dir(args.checkpoint) if args.checkpoint else None
  if args.config:
    config = _train_config_model(args.config) or load_preset(args.config)
  elif run_dir:
    config = run_model_config(run_dir)
  else:
    raise UsageError("give --run DIR, --checkpoint of a run, or --config (a preset name or model YAML)")
  return Source(config, args.checkpoint, run_dir)


def _same_tokenizer(a: str, b: str) -> bool:
  if "byte" in (a, b):
    return a == b
  return filecmp.cmp(a, b, shallow=False)


def resolve_tokenizer(requested: str | None, source: Source) -> Tokenizer:
  """The run's tokenizer unless `requested` names one; refused when it differs from the run's or has more tokens
  than the model."""
  run_spec = None
  if source.run_dir:
    path = os.path.join(source.run_dir, "tokenizer.json")
    run_spec = path if os.path.isfile(path) else "byte"
  spec = requested or run_spec or "byte"
  try:
    tokenizer = load_tokenizer(spec)
  except (FileNotFoundError, ValueError) as e:
    raise UsageError(f"--tokenizer: {e}") from None
  if requested and run_spec and not _same_tokenizer(requested, run_spec):
    raise UsageError(f"--tokenizer {requested}: the run in {source.run_dir} was trained with {run_spec}; "
                     f"sampling with another tokenizer decodes garbage (leave --tokenizer out to use the run's)")
  if tokenizer.vocab_size > source.config.vocab_size:
    raise UsageError(f"tokenizer {spec} has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                     f"{source.config.vocab_size}")
  return tokenizer


def _batch_arg(text: str) -> int | str:
  if text == "max":
    return text
  if not text.isdigit() or int(text) < 1:
    raise argparse.ArgumentTypeError(f"a batch size is a positive integer or 'max', got {text!r}")
  return int(text)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m jaxlm.generate", description=__doc__.split("\n\n")[0])
  p.add_argument("--run", help="a training run directory (runs/<name>): model, checkpoint and tokenizer")
  p.add_argument("--config", help="model YAML path, preset name, or a run's config.yaml")
  p.add_argument("--checkpoint", help="orbax checkpoint (run dir, checkpoints dir or one step); default: random")
  p.add_argument("--tokenizer", help="'byte' or a tokenizer.json path; default: the run's, else byte")
  p.add_argument("--prompt", nargs="+", action="extend", help="one or more prompts, generated side by side")
  p.add_argument("--max-new-tokens", type=int, default=64)
  p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
  p.add_argument("--top-k", type=int, default=0)
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--stop", type=int, action="append", default=None,
                 help="stop token id (repeatable); default: the tokenizer's end-of-text token if it has one")
  p.add_argument("--seed", type=int, default=0, help="sampling seed (and the random init's)")
  p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="override the config's compute dtype")
  p.add_argument("--benchmark", action="store_true", help="time prefill and decode on random prompts")
  p.add_argument("--prefill-chunk", type=int, default=None,
                 help="prefill the prompt this many tokens per row at a time (memory bounded by the piece)")
  p.add_argument("--batch", nargs="+", default=["1"], type=_batch_arg,
                 help="benchmark batch sizes; 'max': the largest that fits the device (jaxlm/generate/roofline.py)")
  p.add_argument("--prompt-len", type=int, default=1024)
  p.add_argument("--new-tokens", type=int, default=1024)
  p.add_argument("--setting", nargs="+", choices=tuple(SETTINGS),
                 help="benchmark settings (prompt length + new tokens), run in turn; replace --prompt-len/--new-tokens")
  p.add_argument("--repeats", type=int, default=3, help="timed rounds per batch and setting (median)")
  args = p.parse_args(argv)
  if not args.benchmark and not args.prompt:
    p.error("give --prompt TEXT (or --benchmark)")
  if args.max_new_tokens < 1:
    p.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
  if args.prefill_chunk is not None and args.prefill_chunk < 1:
    p.error(f"--prefill-chunk must be >= 1, got {args.prefill_chunk}")
  return args


def _generate(args: argparse.Namespace) -> None:
  source = resolve_source(args)
  config = dataclasses.replace(source.config, dtype=args.dtype) if args.dtype else source.config
  model = init_model(config, args.seed)
  if source.checkpoint:
    from jaxlm.checkpoint import load_params
    try:
      step = load_params(model, source.checkpoint)
    except (FileNotFoundError, ValueError) as e:
      raise UsageError(str(e)) from None
    print(f"loaded parameters from {source.checkpoint} (step {step})", file=sys.stderr)
  else:
    print(f"no --checkpoint: parameters are a random init (seed {args.seed}), so the text is noise",
          file=sys.stderr)
  if args.benchmark:
    from jaxlm.generate import benchmark
    benchmark.run_benchmarks(model, args)
    return
  tokenizer = resolve_tokenizer(args.tokenizer, dataclasses.replace(source, config=config))
  stop = args.stop if args.stop is not None else ([tokenizer.eos_id] if tokenizer.eos_id is not None else [])
  prompts = [tokenizer.encode(text) for text in args.prompt]
  if any(not p for p in prompts):
    raise UsageError("--prompt: every prompt needs at least one token (an empty prompt was given)")
  prompt_BT, lengths_B = pad_prompts(prompts)
  out = generate(model, prompt_BT, lengths_B, max_new_tokens=args.max_new_tokens,
                 sampling=SamplingConfig(args.temperature, args.top_k, args.top_p), stop_tokens=stop,
                 seed=args.seed, prefill_chunk=args.prefill_chunk)
  tokens_BN, num_B = np.asarray(out.tokens_BN), np.asarray(out.num_tokens_B)
  for i, (text, row, n) in enumerate(zip(args.prompt, tokens_BN, num_B), 1):
    print(f"[sample {i}/{len(args.prompt)}: {n} new tokens]")
    print(text + tokenizer.decode(row[:n]))


def main(argv: Sequence[str] | None = None) -> int:
  args = _parse_args(argv)
  try:
    _generate(args)
  except UsageError as e:
    print(f"generate: {e}", file=sys.stderr)
    return 2
  return 0
