"""The LoLCATs recipe (Zhang et al. 2024): linearize a Transformer by attention transfer, then LoRA.

  config.py    LinearizeConfig (YAML + overrides, ConfigError naming the key)
  models.py    teacher run dir -> student with LoLCATs mixers; run directories in and out
  transfer.py  stage 1: layer-wise MSE to softmax attention in one pass of the frozen teacher
  finetune.py  stage 2: LoRA next-token step (jaxlm/layers/lora.py)
  recipe.py    both stages, evals, outputs
  evaluate.py  held-out perplexity of any run directory (python -m train.linearize eval)
"""
