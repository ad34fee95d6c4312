"""Shared pytest set-up: a per-session random seed (fresh draws every run, reproducible via JAXLM_TEST_SEED),
the `gpu` marker, skipped on machines without a GPU, and a guard that ends a hung test's worker."""

import faulthandler
import os
import zlib

# Before jax makes its CPU client: XLA's CPU thread pool has one thread per core unless PJRT_NPROC says otherwise.
# Mosaic GPU's interpreter runs each simulated warpgroup as its own XLA computation whose callbacks block at
# barriers; with two cores (CI) two blocked callbacks could hold both pool threads while the warpgroup they wait
# for had none, and the run hung for good (2026-12-07: the Hopper attention interpreter test hung in about one run
# of three on this 2-core machine, and CI ran out of time; with 8 threads, 8 runs of 8 passed).
os.environ.setdefault("PJRT_NPROC", "8")

import jax  # noqa: E402
import numpy as np
import pytest

# Float32 comparisons mean float32 products: on GPU, XLA would otherwise run float32 matmuls as TF32 (10-bit
# mantissa) and the model tests' tight float32 tolerances would measure TF32 rounding, not our code.
jax.config.update("jax_default_matmul_precision", "highest")

# A test still running after this long dumps every thread's stack and ends its worker (pytest-xdist reports it as
# failed and goes on), so a hang costs one test, not the whole CI budget. The slowest test took 76 s (2026-12-07).
HANG_S = 900

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


@pytest.fixture(autouse=True)
def _hang_guard():
  faulthandler.dump_traceback_later(HANG_S, exit=True)
  yield
  faulthandler.cancel_dump_traceback_later()
