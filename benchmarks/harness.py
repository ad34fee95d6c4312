"""Timing one implementation of an op on one shape: warm-up, then the median of repeated device-synchronised
passes, recorded as a `Row`.

Every implementation, ours or a peer, is a `Candidate`: a name and a `make(shape)` that returns a function of the
op's float inputs. The harness makes the inputs itself (jax arrays or torch CUDA tensors, by the candidate's
framework), so both sides of a ratio are timed by the same clock:

  warm-up   compile + one call per input set, synchronised (its wall time is recorded as warmup_s);
  sample    CALLS_PER_SAMPLE calls dispatched back to back, cycling through the input sets, then one device
            synchronisation; sample_ms = elapsed / CALLS_PER_SAMPLE. Back-to-back dispatch hides the host's
            launch overhead behind the device work, as a training step would;
  result    the median of `repeats` samples.

Small inputs rotate among a few sets so a call does not find the previous call's inputs in L2; sets larger than
L2 by far need no rotation. Modes: "fwd" times the output; "fwd_bwd" times the gradient of
sum(output · cotangent) with respect to every float input (a fresh random cotangent per input set).
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

MODES = ("fwd", "fwd_bwd")
BACKWARD_FACTOR = 2.5  # backward work as a multiple of forward work (FlashAttention's count)
CALLS_PER_SAMPLE = 3
MAX_INPUT_SETS = 3
ROTATE_BELOW_BYTES = 256 << 20  # H100/H200 L2 is 50-60 MB: a set 4x larger cannot stay cached


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One implementation to time: ours (selected by `implementation=`) or a peer library's."""

  name: str  # as the table shows it: "reference", "jax.nn:cudnn", "fla:parallel_based"
  framework: str  # "jax" or "torch": how its inputs are made and the device is synchronised
  make: Callable[[Any], Callable[..., Any]]  # shape -> fn(*float_inputs) -> output
  is_ours: bool = False


@dataclasses.dataclass(frozen=True)
class Skipped:
  """A candidate that cannot run in this process (library missing, wrong backend), listed once."""

  name: str
  reason: str


@dataclasses.dataclass(frozen=True)
class Suite:
  """What the harness needs to know about one op."""

  op: str
  shapes: Mapping[str, Any]  # name -> frozen shape dataclass
  shape_sets: Mapping[str, tuple[str, ...]]  # "default" (GPU), "tiny" (CPU smoke), ...
  unit: str  # "TFLOP/s" (work counts FLOPs) or "GB/s" (work counts bytes)
  work: Callable[[Any, str, int], float]  # (shape, mode, input itemsize) -> FLOPs or bytes of one call
  array_shapes: Callable[[Any], tuple[tuple[tuple[int, ...], ...], tuple[int, ...]]]  # (inputs, output)
  ours: Callable[[Sequence[str]], list[Candidate | Skipped]]
  peers: Callable[[], list[Candidate | Skipped]]
  ratio_peers: tuple[str, ...]  # the peer a ratio is taken against when none is named: first available
  default_impls: tuple[str, ...] = ("reference",)
  modes: tuple[str, ...] = MODES  # decode steps have no backward
  float32_inputs: tuple[int, ...] = ()  # positions of inputs that are float32 whatever --dtype (recurrent states)
  # Inputs a step returns updated (a decode state). Our candidates return (output, the updated inputs); the harness
  # donates them and feeds the updated values to the next call, as generation does, so a kernel that updates
  # the state in place is timed in place (without donation XLA would copy the state before every call).
  carried_inputs: tuple[int, ...] = ()

  def resolve_shapes(self, names: Sequence[str]) -> list[Any]:
    """Shapes by name or by set name, in the order given, without repeats."""
    picked: dict[str, Any] = {}
    for name in names:
      members = self.shape_sets.get(name, (name,))
      for member in members:
        if member not in self.shapes:
          raise SystemExit(f"{self.op}: unknown shape {member!r}; shapes: {sorted(self.shapes)}, "
                           f"sets: {sorted(self.shape_sets)}")
        picked[member] = self.shapes[member]
    return list(picked.values())


@dataclasses.dataclass(frozen=True)
class Row:
  impl: str
  shape: str
  mode: str
  status: str  # "ok", "unsupported", "OOM" or "error"
  ms: float | None = None
  rate: float | None = None  # in the suite's unit
  ratio: float | None = None  # ratio peer's ms / this row's ms: > 1 means faster than the peer
  warmup_s: float | None = None  # compile + one call per input set
  detail: str = ""  # why a row has no time
  kernels: tuple = ()  # with --profile: kernel_profile.KernelTime per kernel one call launches, longest first


def our_candidates(names: Sequence[str], module: str, make: Callable[[Any, str, Any], Callable[..., Any]]
                   ) -> list[Candidate | Skipped]:
  """Our implementations by name: `make(api, name, shape)` is the function to time, `api` the imported `module`
  (an import failure becomes skipped rows, so the peers still run)."""
  import importlib

  try:
    api = importlib.import_module(module)
  except Exception as error:  # noqa: BLE001 - reported as skipped rows
    return [Skipped(name, f"{module} not importable ({error})") for name in names]
  return [Candidate(name, "jax", functools.partial(make, api, name), is_ours=True) for name in names]


def copy_peer(pick: Callable[[tuple], tuple]) -> Candidate:
  """The device's copy rate, measured in the same run: a jax candidate that copies the inputs `pick` chooses
  (read once, written once), so a memory-bound op's ratio against it is its fraction of the copy bandwidth
  when `pick` selects as many bytes as the op's work counts moved, reads and writes together, halved."""
  import jax.numpy as jnp

  def make(shape):
    return lambda *inputs: tuple(jnp.copy(x) for x in pick(inputs))
  return Candidate("xla:copy", "jax", make)


def with_ratios(rows: Sequence[Row], peer: str | None) -> list[Row]:
  """Rows with `ratio` filled in against `peer`'s row of the same shape and mode, where both have a time."""
  peer_ms = {(r.shape, r.mode): r.ms for r in rows if r.impl == peer and r.status == "ok"}
  out = []
  for row in rows:
    base = peer_ms.get((row.shape, row.mode))
    ratio = base / row.ms if base is not None and row.ms else None
    out.append(dataclasses.replace(row, ratio=ratio))
  return out


def classify_failure(error: BaseException) -> tuple[str, str]:
  """(status, detail) for an exception raised while compiling or running a candidate."""
  message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
  lowered = str(error).lower()
  # XLA says RESOURCE_EXHAUSTED; torch raises OutOfMemoryError whose text says "out of memory".
  if "resource_exhausted" in lowered or "out of memory" in lowered or type(error).__name__ == "OutOfMemoryError":
    return "OOM", message[:160]
  # Our ops raise ValueError for shapes they do not cover; tokamax raises NotImplementedError.
  if isinstance(error, (ValueError, NotImplementedError)):
    return "unsupported", message[:160]
  return "error", f"{type(error).__name__}: {message}"[:160]


def median_ms(call: Callable[[tuple], Any], sync: Callable[[Any], None], input_sets: Sequence[tuple],
              repeats: int) -> tuple[float, float]:
  """(median sample in ms, warm-up seconds) for `call` over the rotating `input_sets`."""
  start = time.perf_counter()
  for args in input_sets:
    sync(call(args))
  warmup_s = time.perf_counter() - start
  samples = []
  for _ in range(repeats):
    start = time.perf_counter()
    outputs = [call(input_sets[i % len(input_sets)]) for i in range(CALLS_PER_SAMPLE)]
    sync(outputs)
    samples.append((time.perf_counter() - start) * 1e3 / CALLS_PER_SAMPLE)
    del outputs
  return statistics.median(samples), warmup_s


def input_set_count(shapes: Sequence[tuple[int, ...]], itemsize: int) -> int:
  set_bytes = sum(int(np.prod(s)) for s in shapes) * itemsize
  return MAX_INPUT_SETS if set_bytes < ROTATE_BELOW_BYTES else 1


def jax_timing(fn: Callable[..., Any], input_shapes, output_shape, dtype: str, mode: str, seed: int,
               float32_inputs: Sequence[int] = (), carried_inputs: Sequence[int] = ()):
  """(call, sync, input_sets) for a jax candidate; `carried_inputs`: see Suite (forward only)."""
  import jax
  import jax.numpy as jnp

  jdtype = {"bf16": jnp.bfloat16, "f16": jnp.float16, "f32": jnp.float32}[dtype]
  shapes = list(input_shapes) + ([output_shape] if mode == "fwd_bwd" else [])
  dtypes = [jnp.float32 if i in float32_inputs else jdtype for i in range(len(shapes))]
  sets = []
  for i in range(input_set_count(shapes, jnp.dtype(jdtype).itemsize)):
    keys = jax.random.split(jax.random.fold_in(jax.random.key(seed), i), len(shapes))
    sets.append(tuple(jax.random.normal(key, shape, dt) for key, shape, dt in zip(keys, shapes, dtypes)))
  if carried_inputs:
    if mode != "fwd":
      raise NotImplementedError("carried (donated) inputs are timed in fwd mode only")
    step = jax.jit(fn, donate_argnums=tuple(carried_inputs))
    sets = [list(args) for args in sets]  # each call replaces its set's carried inputs with the updated ones

    def call(args):
      output, updated = step(*args)
      for position, value in zip(carried_inputs, updated, strict=True):
        args[position] = value
      return output
  elif mode == "fwd":
    forward = jax.jit(fn)
    call = lambda args: forward(*args)
  else:
    def loss(inputs, cotangent):
      return jnp.sum(fn(*inputs).astype(jnp.float32) * cotangent.astype(jnp.float32))
    gradients = jax.jit(jax.grad(loss))
    call = lambda args: gradients(args[:-1], args[-1])
  return call, jax.block_until_ready, sets


def torch_timing(fn: Callable[..., Any], input_shapes, output_shape, dtype: str, mode: str, seed: int):
  """(call, sync, input_sets) for a torch candidate (CUDA tensors)."""
  import torch

  tdtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[dtype]
  shapes = list(input_shapes) + ([output_shape] if mode == "fwd_bwd" else [])
  generator = torch.Generator(device="cuda").manual_seed(seed)
  sets = []
  for _ in range(input_set_count(shapes, torch.empty((), dtype=tdtype).element_size())):
    tensors = [torch.randn(s, device="cuda", dtype=tdtype, generator=generator) for s in shapes]
    if mode == "fwd_bwd":
      tensors = [t.requires_grad_(True) for t in tensors[:-1]] + tensors[-1:]
    sets.append(tuple(tensors))

  if mode == "fwd":
    def call(args):
      with torch.no_grad():
        return fn(*args)
  else:
    def call(args):
      return torch.autograd.grad(fn(*args[:-1]), args[:-1], args[-1])
  return call, lambda _: torch.cuda.synchronize(), sets


def measure(candidate: Candidate, suite: Suite, shape: Any, mode: str, dtype: str, repeats: int,
            seed: int, profile: bool = False) -> Row:
  """One row: the candidate's median time on `shape`, or why it has none (unsupported, OOM, error); `profile`:
  with the device time of each kernel a call launches (benchmarks/kernel_profile.py), traced after the timing."""
  row = _timed_row(candidate, suite, shape, mode, dtype, repeats, seed, profile)
  # Peers share the GPU: once the inputs are gone, hand torch's cached blocks back for the jax candidates.
  if candidate.framework == "torch":
    import torch
    torch.cuda.empty_cache()
  return row


def _profiled(call: Callable[[tuple], Any], sync: Callable[[Any], None], input_sets: Sequence[tuple]) -> tuple:
  """The kernels of CALLS_PER_SAMPLE calls dispatched as a sample dispatches them; () if the trace fails (a
  profile is extra information: it never costs a row its time)."""
  from benchmarks import kernel_profile

  def run():
    sync([call(input_sets[i % len(input_sets)]) for i in range(CALLS_PER_SAMPLE)])
  try:
    return tuple(kernel_profile.trace(run, CALLS_PER_SAMPLE))
  except Exception as error:  # noqa: BLE001 - reported, and the row keeps its time
    print(f"profile failed: {type(error).__name__}: {error}", file=sys.stderr)
    return ()


def _timed_row(candidate: Candidate, suite: Suite, shape: Any, mode: str, dtype: str, repeats: int,
               seed: int, profile: bool = False) -> Row:
  input_shapes, output_shape = suite.array_shapes(shape)
  try:
    if candidate.framework == "jax":
      timing = functools.partial(jax_timing, float32_inputs=suite.float32_inputs,
                                 carried_inputs=suite.carried_inputs if candidate.is_ours else ())
    elif suite.float32_inputs:
      raise NotImplementedError(f"{suite.op}: float32 state inputs are made for jax candidates only")
    else:
      timing = torch_timing
    call, sync, input_sets = timing(candidate.make(shape), input_shapes, output_shape, dtype, mode, seed)
    ms, warmup_s = median_ms(call, sync, input_sets, repeats)
    kernels = _profiled(call, sync, input_sets) if profile else ()
  except Exception as error:  # noqa: BLE001 - one failing candidate must not end a long run
    status, detail = classify_failure(error)
    if status == "error":
      import traceback
      traceback.print_exception(error, file=sys.stderr)
    return Row(candidate.name, shape.name, mode, status, detail=detail)
  itemsize = {"bf16": 2, "f16": 2, "f32": 4}[dtype]
  rate = suite.work(shape, mode, itemsize) / (ms * 1e-3) / (1e12 if suite.unit == "TFLOP/s" else 1e9)
  return Row(candidate.name, shape.name, mode, "ok", ms=ms, rate=rate, warmup_s=warmup_s, kernels=kernels)
