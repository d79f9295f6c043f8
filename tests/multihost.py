"""Runs a script as several local JAX processes joined by jax.distributed (gloo on CPU).

Used by the multi-host tests: each child is `python SCRIPT ...` with its own simulated
CPU devices, told where the coordinator is through the MTM_* variables that
multitask_moe.parallel.initialize() reads. Everything stays on 127.0.0.1, and every child
is killed when the call returns, whatever happened.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env(process_id: int, num_processes: int, port: int, devices: int) -> dict[str, str]:
    """The environment of one child: its own device count, the coordinator on localhost."""
    env = dict(os.environ)
    # Replace (not append to) the parent's device-count flag: conftest set 8 for itself.
    flags = [
        flag
        for flag in env.get("XLA_FLAGS", "").split()
        if not flag.startswith("--xla_force_host_platform_device_count")
    ]
    flags.append(f"--xla_force_host_platform_device_count={devices}")
    env.update(
        XLA_FLAGS=" ".join(flags),
        JAX_PLATFORMS="cpu",
        JAX_NUM_CPU_DEVICES=str(devices),
        MTM_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
        MTM_NUM_PROCESSES=str(num_processes),
        MTM_PROCESS_ID=str(process_id),
        # The coordinator would otherwise listen on every interface ([::]:port).
        JAX_COORDINATOR_BIND_ADDRESS=f"127.0.0.1:{port}",
        PYTHONPATH=os.pathsep.join(
            [str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        ),
    )
    return env


def run_processes(
    script: Path,
    args: list[str],
    *,
    log_dir: Path,
    num_processes: int = 2,
    devices_per_process: int = 4,
    timeout_s: float = 240.0,
    on_poll=None,
) -> None:
    """Starts `num_processes` children of `script`, waits for all, raises if any fails.

    on_poll(procs): called every 0.2 s while they run (e.g. to send one of them a signal).

    A child that fails makes the others hang at their next collective, so the first
    failure (or the time limit) kills all of them at once. Logs go to log_dir/process_<i>.log
    and their tails are in the error message.
    """
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []
    logs = []
    try:
        for index in range(num_processes):
            log = open(log_dir / f"process_{index}.log", "w")  # noqa: SIM115 closed below
            logs.append(log)
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(script), *args],
                    env=child_env(index, num_processes, port, devices_per_process),
                    cwd=REPO_ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        deadline = time.monotonic() + timeout_s
        while True:
            codes = [proc.poll() for proc in procs]
            if any(code not in (None, 0) for code in codes):
                raise RuntimeError(
                    f"a process failed (exit codes {codes})" + _tails(log_dir, num_processes)
                )
            if all(code == 0 for code in codes):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"processes still running after {timeout_s:.0f}s "
                    f"(exit codes {codes})" + _tails(log_dir, num_processes)
                )
            if on_poll is not None:
                on_poll(procs)
            time.sleep(0.2)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        for proc in procs:
            proc.wait()
        for log in logs:
            log.close()


def _tails(log_dir: Path, num_processes: int, lines: int = 25) -> str:
    text = []
    for index in range(num_processes):
        path = log_dir / f"process_{index}.log"
        tail = path.read_text().splitlines()[-lines:] if path.exists() else []
        text.append(f"\n--- process {index} ({path}) ---\n" + "\n".join(tail))
    return "".join(text)
