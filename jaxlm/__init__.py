"""jaxlm: Flax NNX layers, language models and generation on top of pallas_kernels."""
