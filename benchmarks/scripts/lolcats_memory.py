"""Decode memory per row of SmolLM2-135M (the teacher) and its LoLCATs student, from shapes only (nothing trained,
nothing loaded): the generation cache's bytes per row at growing lengths (roofline.cache_bytes_per_row, which the
generation benchmark's --batch max uses) and the compiled decode loop's device bytes at batch 8 (XLA's memory
analysis on this machine's backend).

The teacher's KV cache grows with the length; the student's state (linear attention over feature_dim features
and its normaliser, plus a ring of the last `window` keys and values) does not.

  PYTHONPATH=. python benchmarks/scripts/lolcats_memory.py
"""
import jax
from flax import nnx

from jaxlm.generate import benchmark, roofline
from jaxlm.models import LM, ModelConfig
from train.linearize.config import load_linearize_config
from train.linearize.models import student_config

# SmolLM2-135M's architecture (its HF config.json: 30 layers, d 576, 9 heads over 3 kv heads, head dim 64, SwiGLU
# 1536, rope_theta 100000, tied embeddings, vocabulary 49152); the weights do not matter here.
TEACHER = ModelConfig(vocab_size=49152, d_model=576, num_layers=30, mixers="attention",
                      mixer_options={"attention": {"num_heads": 9, "num_kv_heads": 3, "rope_base": 100000.0}},
                      mlp="swiglu", mlp_hidden=1536, norm="rmsnorm", tie_embeddings=True, max_length=16384,
                      dtype="bfloat16")
LENGTHS = (1024, 2048, 4096, 8192, 16384)


def main():
  lolcats = load_linearize_config("configs/lolcats/smollm2_135m.yaml").lolcats
  models = {"teacher (attention)": TEACHER, "LoLCATs student": student_config(TEACHER, dict(lolcats))}
  print("| model | " + " | ".join(f"cache/row L={n}" for n in LENGTHS) + " | decode loop, batch 8, 128+1024 "
        "vs 128+8192 |")
  print("|---|" + "---:|" * (len(LENGTHS) + 1))
  for name, config in models.items():
    model = LM(config, rngs=nnx.Rngs(0))
    per_row = [roofline.cache_bytes_per_row(model, n) / 2**20 for n in LENGTHS]
    peaks = [benchmark.peak_bytes(model, batch=8, prompt_len=128, new_tokens=n) / 2**20 for n in (1024, 8192)]
    print(f"| {name} | " + " | ".join(f"{b:.2f} MiB" for b in per_row) +
          f" | {peaks[0]:.0f} MiB vs {peaks[1]:.0f} MiB |")
  print(f"(backend {jax.default_backend()}, jax {jax.__version__}; weights included in the decode loop's bytes)")


if __name__ == "__main__":
  main()
