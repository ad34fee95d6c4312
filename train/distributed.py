"""Multi-process start-up: one process per host (or per GPU group), joined by `jax.distributed.initialize`.

Each process is told the coordinator's address (process 0 hosts the coordination service there), how many
processes there are and which one it is, by CLI flags (`python -m train --coordinator ... --num-processes ...
--process-id ...`) or environment variables; a flag wins over its variable:

  JAX_COORDINATOR_ADDRESS   host:port of process 0                         (read by jax itself too)
  JAX_NUM_PROCESSES         how many processes take part
  JAX_PROCESS_ID            this process, 0 .. JAX_NUM_PROCESSES - 1
  JAX_LOCAL_DEVICE_IDS      this process's GPUs, e.g. 0,1,2,3 (default: all visible)   (read by jax itself too)
  JAX_NUM_CPU_DEVICES       host-platform devices per process on CPU (tests)   (a jax config option)
  JAXLM_INIT_TIMEOUT_S      seconds to wait for every process to join (default 300)
  JAXLM_HEARTBEAT_TIMEOUT_S seconds without a peer's heartbeat before the others fail (default 100)

Left unset, the address, count and id fall to jax's cluster detection (SLURM, Open MPI, Kubernetes, Cloud TPU).

A dead peer: the coordination service misses its heartbeats and, after the heartbeat timeout, every other
process is terminated (SIGABRT) with an error saying a task died, instead of waiting forever in a collective.
Nothing else ends that wait: on CPU a gloo collective whose peer was killed still blocks until the heartbeat
timeout (run with jax's 100 s default, tests/train/test_multiprocess.py sees the survivor still waiting 35 s
after the kill). The init timeout bounds the wait at start-up for a process that never comes (or a coordinator that never answers).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping

DEFAULT_INIT_TIMEOUT_S = 300
DEFAULT_HEARTBEAT_TIMEOUT_S = 100


@dataclasses.dataclass(frozen=True)
class Cluster:
  """Where this process stands among the others; None leaves a field to jax's cluster detection."""
  coordinator: str | None = None  # host:port of process 0's coordination service
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None  # this process's accelerators (GPUs); None: all visible
  cpu_devices: int = 0  # host-platform devices per process (CPU runs and tests); 0: jax's default
  init_timeout_s: int = DEFAULT_INIT_TIMEOUT_S  # wait for every process to join
  heartbeat_timeout_s: int = DEFAULT_HEARTBEAT_TIMEOUT_S  # a peer silent this long is declared dead

  def __post_init__(self):
    if self.num_processes is not None and self.num_processes < 1:
      raise ValueError(f"num_processes must be >= 1, got {self.num_processes}")
    if self.process_id is not None and not 0 <= self.process_id < (self.num_processes or self.process_id + 1):
      raise ValueError(f"process_id must be in [0, {self.num_processes}), got {self.process_id}")
    if self.coordinator is not None and ":" not in self.coordinator:
      raise ValueError(f"coordinator must be host:port, got {self.coordinator!r}")
    for name in ("init_timeout_s", "heartbeat_timeout_s"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1 second, got {getattr(self, name)}")

  @property
  def requested(self) -> bool:
    """Whether anything asks for a multi-process start (an address or a process count)."""
    return self.coordinator is not None or self.num_processes is not None


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """The start-up flags of `python -m train` (each defaults to its environment variable)."""
  group = parser.add_argument_group("multi-process start-up (docs/training.md, 'Multi-host training')")
  group.add_argument("--coordinator", help="host:port of process 0 [JAX_COORDINATOR_ADDRESS]")
  group.add_argument("--num-processes", type=int, help="processes taking part [JAX_NUM_PROCESSES]")
  group.add_argument("--process-id", type=int, help="this process, 0..num_processes-1 [JAX_PROCESS_ID]")
  group.add_argument("--local-device-ids", help="this process's GPUs, e.g. 0,1 [JAX_LOCAL_DEVICE_IDS]")
  group.add_argument("--cpu-devices", type=int, help="host-platform devices per process [JAX_NUM_CPU_DEVICES]")
  group.add_argument("--init-timeout", type=int, help="seconds to wait for all processes [JAXLM_INIT_TIMEOUT_S]")
  group.add_argument("--heartbeat-timeout", type=int,
                     help="seconds before a silent peer fails the others [JAXLM_HEARTBEAT_TIMEOUT_S]")


def cluster_from(args: argparse.Namespace | None = None, env: Mapping[str, str] | None = None) -> Cluster:
  """The Cluster that flags (`add_arguments`) and environment variables describe; flags win."""
  env = os.environ if env is None else env
  flags = vars(args) if args is not None else {}

  def pick(flag: str, variable: str, cast=str):
    value = flags.get(flag)
    if value is not None:
      return value
    raw = env.get(variable, "").strip()
    if not raw:
      return None
    try:
      return cast(raw)
    except ValueError:
      raise ValueError(f"{variable}={raw!r} is not a valid {cast.__name__}") from None

  ids = pick("local_device_ids", "JAX_LOCAL_DEVICE_IDS")
  return Cluster(
      coordinator=pick("coordinator", "JAX_COORDINATOR_ADDRESS"),
      num_processes=pick("num_processes", "JAX_NUM_PROCESSES", int),
      process_id=pick("process_id", "JAX_PROCESS_ID", int),
      local_device_ids=tuple(int(i) for i in ids.split(",")) if ids else None,
      cpu_devices=pick("cpu_devices", "JAX_NUM_CPU_DEVICES", int) or 0,
      init_timeout_s=pick("init_timeout", "JAXLM_INIT_TIMEOUT_S", int) or DEFAULT_INIT_TIMEOUT_S,
      heartbeat_timeout_s=pick("heartbeat_timeout", "JAXLM_HEARTBEAT_TIMEOUT_S", int) or DEFAULT_HEARTBEAT_TIMEOUT_S,
  )


def initialize(cluster: Cluster, *, force: bool = False) -> bool:
  """Joins the other processes (`jax.distributed.initialize`) when `cluster.requested` or `force` (jax's cluster
  detection fills what is unset); returns whether this process is now part of a multi-process run.

  Must run before anything touches a jax backend: the device counts and the coordination client are fixed then.
  """
  import jax  # here, not at the top: `python -m train` reads its flags and config before jax loads

  if cluster.cpu_devices and jax.config.jax_num_cpu_devices != cluster.cpu_devices:
    jax.config.update("jax_num_cpu_devices", cluster.cpu_devices)
  if jax.distributed.is_initialized():
    return True
  if not (cluster.requested or force):
    return False
  jax.distributed.initialize(
      coordinator_address=cluster.coordinator, num_processes=cluster.num_processes,
      process_id=cluster.process_id,
      local_device_ids=list(cluster.local_device_ids) if cluster.local_device_ids is not None else None,
      initialization_timeout=cluster.init_timeout_s, heartbeat_timeout_seconds=cluster.heartbeat_timeout_s)
  return True
