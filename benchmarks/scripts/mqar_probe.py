"""A short MQAR run on one setting (L 64, 4 pairs) with a figure2_based sweep point's model: does a mixer learn
recall at all, and how fast? CPU-sized; the sweep's resolved config comes from its results lines in docs/zoology.

  PYTHONPATH=. python benchmarks/scripts/mqar_probe.py --run h3-d64 --head-dim 2 --steps 1500 --lr 1e-2

Prints the training log and the final accuracy; writes under /tmp/mqar-probe.
"""
import argparse
import json
import shutil

from train.config import TrainConfig, from_dict
from train.run import train

RESULTS = ("docs/zoology/figure2_based-session.jsonl", "docs/zoology/figure2_based-session-h3-head_dim1.jsonl")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--run", required=True, help="a run name prefix in the results, e.g. h3-d64, hyena-d64")
  parser.add_argument("--head-dim", type=int, default=None, help="H3's head dim (default: the run's)")
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--lr", type=float, default=3.2e-3)
  args = parser.parse_args()
  runs = [json.loads(line) for path in RESULTS for line in open(path)]
  config = next(r for r in runs if r["name"].startswith(args.run))["config"]
  if args.head_dim is not None:
    config["model"]["mixer_options"]["h3"]["head_dim"] = args.head_dim
  mqar = config["data"]["mqar"]
  mqar["train"] = [dict(seq_len=64, num_kv_pairs=4, num_examples=args.steps * args.batch)]
  mqar["test"] = [dict(seq_len=64, num_kv_pairs=4, num_examples=256)]
  config.update(name=f"probe-{args.run}", run_dir="/tmp/mqar-probe", batch_size=args.batch, epochs=1,
                eval_every=max(args.steps // 2, 1))
  config["optim"]["lr"] = args.lr
  config["checkpoint"]["enabled"] = False
  config["log"].update(tensorboard=False, every=50)
  shutil.rmtree(config["run_dir"], ignore_errors=True)
  train(from_dict(TrainConfig, config))


if __name__ == "__main__":
  main()
