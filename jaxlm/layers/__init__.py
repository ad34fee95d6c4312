"""Flax NNX layers: one mixer per file, each with a parallel forward, a decode step and its cache."""
