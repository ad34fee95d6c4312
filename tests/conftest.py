"""Shared pytest set-up: a per-session random seed (fresh draws every run, reproducible via JAXLM_TEST_SEED)
and the `gpu` marker, skipped on machines without a GPU."""

import os
import zlib

import jax
import numpy as np
import pytest

# Float32 comparisons mean float32 products: on GPU, XLA would otherwise run float32 matmuls as TF32 (10-bit
# mantissa) and the model tests' tight float32 tolerances would measure TF32 rounding, not our code.
jax.config.update("jax_default_matmul_precision", "highest")

SESSION_SEED = int(os.environ.get("JAXLM_TEST_SEED", np.random.SeedSequence().entropy % 2**31))


def pytest_report_header(config):
  return f"jaxlm: JAXLM_TEST_SEED={SESSION_SEED} jax {jax.__version__} backend {jax.default_backend()}"


def pytest_collection_modifyitems(config, items):
  if jax.default_backend() == "gpu":
    return
  skip_gpu = pytest.mark.skip(reason="needs a GPU (jax.default_backend() != 'gpu')")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip_gpu)


@pytest.fixture
def rng(request) -> np.random.Generator:
  """A generator seeded from the session seed and the test's id: fresh per run, repeatable per seed."""
  return np.random.default_rng([SESSION_SEED, zlib.crc32(request.node.nodeid.encode())])
