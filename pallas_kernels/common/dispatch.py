"""`implementation=` dispatch shared by every op.

Each op lists its implementations in priority order. An explicit name runs that implementation or raises
ValueError saying why it cannot; `"auto"` is fail-closed: it takes the first implementation whose backend matches
and whose `supports` check accepts the call's shapes and options (the cases its tests cover), and the reference,
which supports everything, comes last. A kernel's tuning knobs (its module's `BlockSizes`) reach it through the
op's `block_sizes=`, checked against the implementation that runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from pallas_kernels.common import sharding

AUTO = "auto"

# Returns None when the implementation covers the call, otherwise a short reason it does not. It is called with
# the call's options and `backend` (jax.default_backend()), for limits that differ by backend.
SupportCheck = Callable[..., "str | None"]


def supports_everything(**_: Any) -> str | None:
  return None


@dataclasses.dataclass(frozen=True)
class Implementation:
  name: str
  fn: Callable[..., Any]
  supports: SupportCheck = supports_everything
  backends: tuple[str, ...] | None = None  # jax backends it runs on ("cpu", "gpu", "tpu"); None: all
  in_auto: bool = True  # False for implementations only taken by name (alternative reference forms)
  auto_backends: tuple[str, ...] | None = None  # where auto may pick it (e.g. not interpret mode on CPU); None: all
  per_shard: bool = False  # a kernel XLA cannot partition: run it on each shard under a mesh
  # Where auto prefers it (a measured speed rule, e.g. a length range), on top of `supports`; by name it runs
  # wherever `supports` holds.
  auto_prefers: SupportCheck = supports_everything
  block_sizes: type | None = None  # the knob class fn takes as block_sizes= (its module's BlockSizes); None: none


@dataclasses.dataclass(frozen=True)
class Dispatcher:
  """The implementations of one op in auto's priority order (fastest first, reference last)."""

  op: str
  implementations: tuple[Implementation, ...]

  def __post_init__(self):
    names = [impl.name for impl in self.implementations]
    if len(set(names)) != len(names):
      raise ValueError(f"{self.op}: duplicate implementation names {names}")
    if AUTO in names:
      raise ValueError(f"{self.op}: '{AUTO}' is reserved")

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(impl.name for impl in self.implementations)

  def with_implementation(self, impl: Implementation, *, before: str | None = None) -> "Dispatcher":
    """A dispatcher with `impl` added (ahead of `before` in auto's order, else ahead of the last)."""
    impls = list(self.implementations)
    index = self.names.index(before) if before is not None else max(len(impls) - 1, 0)
    impls.insert(index, impl)
    return Dispatcher(self.op, tuple(impls))

  def _unsupported_reason(self, impl: Implementation, backend: str, options: dict[str, Any]) -> str | None:
    if impl.backends is not None and backend not in impl.backends:
      return f"runs on {impl.backends}, not on backend {backend!r}"
    return impl.supports(backend=backend, **options)

  def select(self, implementation: str, **options: Any) -> Implementation:
    """The implementation to run for `options` (the op's static shapes, dtypes and flags)."""
    backend = jax.default_backend()
    if implementation == AUTO:
      for impl in self.implementations:
        if (impl.in_auto and (impl.auto_backends is None or backend in impl.auto_backends)
            and self._unsupported_reason(impl, backend, options) is None
            and impl.auto_prefers(backend=backend, **options) is None):
          return impl
      raise ValueError(f"{self.op}: no implementation supports {options}")
    by_name = {impl.name: impl for impl in self.implementations}
    if implementation not in by_name:
      raise ValueError(
          f"{self.op}: unknown {implementation=}; choose one of {(AUTO, *self.names)}")
    impl = by_name[implementation]
    reason = self._unsupported_reason(impl, backend, options)
    if reason is not None:
      raise ValueError(f"{self.op}: {implementation=} does not support this call: {reason}")
    return impl

  def __call__(self, implementation: str, options: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
    return self.select(implementation, **options).fn(*args, **kwargs)

  def run(self, implementation: str, options: dict[str, Any], *, arrays: dict[str, Any], static: dict[str, Any],
          positional: tuple[str, ...], layouts: dict[str, Any], out_layouts: Any, block_sizes: Any = None) -> Any:
    """Like calling it, with the array arguments named and laid out (see sharding.run_per_shard), so that a
    kernel runs per shard inside a sharded model; block_sizes (None: the kernel's defaults) must be the running
    implementation's."""
    impl = self.select(implementation, **options)
    if block_sizes is not None:
      static = dict(static, block_sizes=self._checked_block_sizes(impl, block_sizes))
    if impl.per_shard:
      return sharding.run_per_shard(impl.fn, arrays, layouts, out_layouts, static, positional)
    args = [arrays[name] for name in positional]
    return impl.fn(*args, **{k: v for k, v in arrays.items() if k not in positional}, **static)

  def _checked_block_sizes(self, impl: Implementation, block_sizes: Any) -> Any:
    if impl.block_sizes is not None and isinstance(block_sizes, impl.block_sizes):
      return block_sizes
    given = f"{type(block_sizes).__module__}.{type(block_sizes).__qualname__}"
    takes = ("no block_sizes" if impl.block_sizes is None
             else f"{impl.block_sizes.__module__}.{impl.block_sizes.__qualname__}")
    raise ValueError(f"{self.op}: implementation {impl.name!r} takes {takes}, got {given}; name the implementation "
                     f"whose BlockSizes you pass")


def require(condition: bool, reason: str) -> str | None:
  """Reads well inside `supports` checks: `return require(d in (64, 128), f"{d=} not in (64, 128)")`."""
  return None if condition else reason


def first_reason(*reasons: str | None) -> str | None:
  return next((r for r in reasons if r is not None), None)

