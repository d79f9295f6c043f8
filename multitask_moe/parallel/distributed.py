"""Multi-host start-up: one call that joins this process to the others of a job.

    parallel.initialize()                    # auto: Cloud TPU / SLURM / Open MPI, else nothing
    parallel.initialize("explicit", coordinator_address="10.0.0.1:8476",
                        num_processes=4, process_id=rank)
    # or, with MTM_COORDINATOR_ADDRESS, MTM_NUM_PROCESSES, MTM_PROCESS_ID in the environment:
    parallel.initialize("explicit")

It must run before anything touches a JAX device (jax.devices(), creating an array):
JAX builds its device list once, and a process that built it alone cannot join later.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
from collections.abc import Sequence

import jax

logger = logging.getLogger(__name__)

MODES = ("auto", "none", "tpu", "slurm", "explicit")
ENV_COORDINATOR_ADDRESS = "MTM_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "MTM_NUM_PROCESSES"
ENV_PROCESS_ID = "MTM_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "MTM_LOCAL_DEVICE_IDS"
# Variables jax's SLURM detection needs (jax/_src/clusters/slurm_cluster.py).
_SLURM_VARS = (
    "SLURM_JOB_ID",
    "SLURM_STEP_NODELIST",
    "SLURM_NTASKS",
    "SLURM_PROCID",
    "SLURM_LOCALID",
)
_OPEN_MPI_VAR = "OMPI_MCA_orte_hnp_uri"


@dataclasses.dataclass(frozen=True)
class DistributedInfo:
    """What ``initialize`` did: the mode it resolved to and this process's place."""

    # The resolved mode: "none", "tpu", "slurm", "ompi", "explicit", or "external" when
    # jax.distributed was already running (started by an earlier call or by other code).
    mode: str
    process_id: int
    num_processes: int


def detect_cluster() -> str | None:
    """Which managed cluster this process runs in: "tpu", "slurm", "ompi" or None.

    Uses jax's own cluster detection for Cloud TPU (it needs jax's TPU start-up state),
    and the launcher's environment variables for SLURM and Open MPI, which are what
    jax's detection reads too.
    """
    if all(var in os.environ for var in _SLURM_VARS):
        return "slurm"
    if _OPEN_MPI_VAR in os.environ:
        return "ompi"
    from jax._src import cloud_tpu_init  # set by `import jax` on a Cloud TPU VM

    if cloud_tpu_init.running_in_cloud_tpu_vm:
        return "tpu"
    return None


def _from_env(value, env_name: str, arg_name: str, parse=str):
    if value is not None:
        return value
    raw = os.environ.get(env_name)
    if raw is None or raw == "":
        return None
    try:
        return parse(raw)
    except ValueError as err:
        raise ValueError(f"{arg_name} from ${env_name}={raw!r} is not valid: {err}") from None


def _parse_ids(raw: str) -> list[int]:
    return [int(part) for part in raw.split(",") if part.strip()]


def _explicit_args(coordinator_address, num_processes, process_id, local_device_ids):
    coordinator_address = _from_env(
        coordinator_address, ENV_COORDINATOR_ADDRESS, "coordinator_address"
    )
    num_processes = _from_env(num_processes, ENV_NUM_PROCESSES, "num_processes", int)
    process_id = _from_env(process_id, ENV_PROCESS_ID, "process_id", int)
    local_device_ids = _from_env(
        local_device_ids, ENV_LOCAL_DEVICE_IDS, "local_device_ids", _parse_ids
    )
    missing = [
        f"{arg} (or ${env})"
        for arg, env, value in (
            ("coordinator_address", ENV_COORDINATOR_ADDRESS, coordinator_address),
            ("num_processes", ENV_NUM_PROCESSES, num_processes),
            ("process_id", ENV_PROCESS_ID, process_id),
        )
        if value is None
    ]
    if missing:
        raise ValueError(f"mode='explicit' needs {', '.join(missing)}")
    if not isinstance(coordinator_address, str) or ":" not in coordinator_address:
        raise ValueError(f"coordinator_address must be 'host:port', got {coordinator_address!r}")
    if not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"num_processes must be an int >= 1, got {num_processes!r}")
    if not isinstance(process_id, int) or not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be an int in [0, {num_processes}), got {process_id!r}")
    return coordinator_address, num_processes, process_id, local_device_ids


def initialize(
    mode: str = "auto",
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
    *,
    initialization_timeout: int = 300,
) -> DistributedInfo:
    """Joins the processes of a multi-host job (``jax.distributed.initialize``).

    Modes:
      "none":     single process; does nothing.
      "auto":     explicit arguments or $MTM_* variables if any are given, else the
                  detected cluster (Cloud TPU VM, SLURM, Open MPI), else nothing.
      "tpu":      Cloud TPU VM / queued resource: jax finds everything itself.
      "slurm":    SLURM (srun): jax reads SLURM_* variables.
      "explicit": coordinator_address ("host:port" of process 0), num_processes,
                  process_id (and optional local_device_ids), each from the argument or
                  $MTM_COORDINATOR_ADDRESS, $MTM_NUM_PROCESSES, $MTM_PROCESS_ID,
                  $MTM_LOCAL_DEVICE_IDS ("0,1").

    Calling it again once JAX's distributed runtime is up is a no-op that reports it as
    mode "external": JAX's own state says whether this process has joined, so there is no
    second record of it here to disagree with.

    Raises:
      ValueError: unknown mode, missing or malformed explicit arguments, or a cluster mode
        requested outside that cluster.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if jax.distributed.is_initialized():  # already joined: report, do not restart
        return DistributedInfo("external", jax.process_index(), jax.process_count())

    given = (coordinator_address, num_processes, process_id, local_device_ids)
    env_given = any(
        os.environ.get(name)
        for name in (ENV_COORDINATOR_ADDRESS, ENV_NUM_PROCESSES, ENV_PROCESS_ID)
    )
    if mode == "auto":
        if any(value is not None for value in given) or env_given:
            mode = "explicit"
        else:
            mode = detect_cluster() or "none"
    elif mode in ("tpu", "slurm") and any(value is not None for value in given):
        raise ValueError(
            f"mode={mode!r} takes its addresses from the cluster; pass coordinator_address "
            "etc. only with mode='explicit'"
        )

    if mode == "none":
        return DistributedInfo("none", 0, 1)
    if mode == "explicit":
        address, count, index, ids = _explicit_args(*given)
        logger.info(
            "jax.distributed.initialize(%s, %d processes, process %d)", address, count, index
        )
        jax.distributed.initialize(
            coordinator_address=address,
            num_processes=count,
            process_id=index,
            local_device_ids=ids,
            initialization_timeout=initialization_timeout,
            # The arguments are complete: no cluster detection may override them.
            cluster_detection_method="deactivate" if ids is not None else None,
        )
    else:
        detected = detect_cluster()
        if mode != detected:
            if mode == "slurm":
                missing = [var for var in _SLURM_VARS if var not in os.environ]
                raise ValueError(
                    f"mode='slurm' but this is not a SLURM task: missing {missing} "
                    "(launch with srun)"
                )
            if mode == "tpu":
                raise ValueError(
                    "mode='tpu' but this is not a Cloud TPU VM (no TPU chips or libtpu "
                    "found); use mode='explicit' or 'auto'"
                )
        logger.info("jax.distributed.initialize() on a %s cluster", mode)
        if mode == "ompi":
            jax.distributed.initialize(
                cluster_detection_method="ompi", initialization_timeout=initialization_timeout
            )
        elif mode == "slurm":
            jax.distributed.initialize(
                cluster_detection_method="slurm", initialization_timeout=initialization_timeout
            )
        else:
            jax.distributed.initialize(initialization_timeout=initialization_timeout)
    return DistributedInfo(mode, jax.process_index(), jax.process_count())


def is_coordinator() -> bool:
    """True on the process that writes logs, metrics and plots (process 0)."""
    return jax.process_index() == 0


def process_position() -> tuple[int, int]:
    """(this process's index, the number of processes) without starting a JAX backend.

    jax.process_index() builds the device list; a run that must decide something before
    touching any device (e.g. whether its workdir is free) asks the distributed runtime,
    which `initialize` has joined by then, or is a single process.
    """
    from jax._src import distributed as jax_distributed

    state = jax_distributed.global_state
    if state.client is None:
        return 0, 1
    return int(state.process_id), int(state.num_processes)


# Every process draws the same sequence of keys: the shares happen in program order.
_share_keys = itertools.count()


def share_from_coordinator(name: str, value: str, *, timeout_s: float = 600.0) -> str:
    """Process 0's `value`, on every process (its own on process 0, as is when alone).

    Through the distributed runtime's key-value store, not a collective: no device, no
    compiled program, so it can run before a run has built anything.
    """
    from jax._src import distributed as jax_distributed

    state = jax_distributed.global_state
    key = f"multitask_moe/share/{next(_share_keys)}/{name}"
    if state.client is None:
        return value
    if state.process_id == 0:
        state.client.key_value_set(key, value)
        return value
    return state.client.blocking_key_value_get(key, int(timeout_s * 1000))
