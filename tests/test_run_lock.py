"""One run per workdir: the lock file against live, dead and foreign owners, and the
claim that commands take before they build anything."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from multihost import child_env, free_port  # noqa: I001 (tests/ is on the path)

from multitask_moe.core.run_lock import LOCK_FILE, RunLock, RunLockError, claim
from multitask_moe.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def write_lock(workdir, pid, host=None):
    (workdir / LOCK_FILE).write_text(
        json.dumps({"host": host or socket.gethostname(), "pid": pid, "started": 0.0})
    )


@pytest.fixture
def live_pid():
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process.pid
    process.kill()
    process.wait()


def dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_live_run_on_this_host_is_refused_by_name(tmp_path, live_pid):
    write_lock(tmp_path, live_pid)
    with pytest.raises(RunLockError) as error:
        RunLock(str(tmp_path)).acquire()
    message = str(error.value)
    assert f"pid {live_pid} on this host" in message and "\n" not in message
    assert isinstance(error.value, ConfigError)  # the CLI prints it as one line, status 2
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == live_pid  # untouched


def test_a_run_on_another_host_is_refused_with_the_file_to_delete(tmp_path):
    write_lock(tmp_path, 1, host="tpu-worker-7")
    with pytest.raises(RunLockError, match=r"pid 1 on host tpu-worker-7.*delete .*run\.lock"):
        RunLock(str(tmp_path)).acquire()


def test_a_stale_lock_is_taken_over_and_released_at_the_end(tmp_path, capsys):
    write_lock(tmp_path, dead_pid())
    with RunLock(str(tmp_path)) as lock:
        assert "the run that left it" in capsys.readouterr().out
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == lock.owner["pid"]
        with pytest.raises(RunLockError):  # held: a second start in the meantime refuses
            RunLock(str(tmp_path)).acquire()
    assert not (tmp_path / LOCK_FILE).exists()
    (tmp_path / LOCK_FILE).write_text("{half a")  # unreadable: stale, taken over
    with RunLock(str(tmp_path)):
        pass
    assert not (tmp_path / LOCK_FILE).exists()


def test_release_leaves_another_runs_lock_alone(tmp_path, live_pid):
    lock = RunLock(str(tmp_path))
    lock.acquire()
    write_lock(tmp_path, live_pid)  # someone replaced it (e.g. took it over as stale)
    lock.release()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == live_pid


def test_claim_makes_the_workdir_and_removes_only_what_it_made_and_left_empty(tmp_path):
    made = tmp_path / "new" / "run"
    with claim(str(made)):
        assert sorted(p.name for p in made.iterdir()) == [LOCK_FILE]
    assert not (tmp_path / "new").exists()  # made by the claim, empty at the end: gone
    with claim(str(made)):
        (made / "metrics.jsonl").write_text("{}\n")
    assert sorted(p.name for p in made.iterdir()) == ["metrics.jsonl"]  # a run's files stay
    existing = tmp_path / "existing"
    existing.mkdir()
    with claim(str(existing)):
        pass
    assert existing.is_dir()  # there before: left, empty or not


def test_a_refused_claim_leaves_the_workdir_as_it_was(tmp_path, live_pid):
    write_lock(tmp_path, live_pid)
    with pytest.raises(RunLockError, match=f"pid {live_pid} on this host"):
        with claim(str(tmp_path)):
            raise AssertionError("the body of a refused claim never runs")
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == live_pid


def _refusing(monkeypatch, module, name):
    """Replaces module.name by a function that fails the test if anything calls it."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(name)
        raise AssertionError(f"{name} ran before the busy workdir was refused")

    monkeypatch.setattr(module, name, refuse)
    return calls


def test_train_evolve_and_extract_are_refused_before_building_anything(
    tmp_path, live_pid, monkeypatch
):
    """A busy workdir (or --out) is refused before datasets, models or steps: the
    functions that build them are made to fail if they are ever called."""
    import multitask_moe.evolution
    import multitask_moe.lifecycle.extraction as extraction
    import multitask_moe.train.train as train_module
    from multitask_moe import evolve as evolve_module
    from multitask_moe.core import config_lib

    calls = _refusing(monkeypatch, train_module, "prepare")
    calls += _refusing(monkeypatch, multitask_moe.evolution, "System")
    calls += _refusing(monkeypatch, extraction, "load_config")
    for name in ("train", "evolve"):
        (tmp_path / name).mkdir()
        write_lock(tmp_path / name, live_pid)
    write_lock(tmp_path, live_pid)
    (tmp_path / LOCK_FILE).rename(tmp_path / "out.lock")

    with pytest.raises(RunLockError, match=f"another run \\(pid {live_pid} on this host"):
        train_module.train_and_evaluate(config_lib.base_config(), str(tmp_path / "train"))
    evolve_config = evolve_module_config()
    with pytest.raises(RunLockError, match=f"another run \\(pid {live_pid} on this host"):
        evolve_module.evolve(evolve_config, str(tmp_path / "evolve"))
    with pytest.raises(RunLockError, match=f"another extraction \\(pid {live_pid}.*--out"):
        extraction.extract(str(tmp_path / "train"), "wine", str(tmp_path / "out"))
    assert calls == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evolve", "out.lock", "train"]
    for name in ("train", "evolve"):
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == [LOCK_FILE]


def evolve_module_config():
    import importlib.util

    spec = importlib.util.spec_from_file_location("evolve_config", REPO / "configs" / "evolve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.mark.slow
def test_every_process_of_a_job_stops_at_a_busy_workdir_with_the_same_line(tmp_path, live_pid):
    """Two processes of one job: process 0 finds the lock of a live run, process 1 learns
    it through the distributed runtime; both print the same line and exit 2, having
    built no dataset and compiled nothing (JAX logs every compile when asked)."""
    workdir = tmp_path / "busy"
    workdir.mkdir()
    write_lock(workdir, live_pid)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    port = free_port()
    processes = []
    for index in range(2):
        env = child_env(index, 2, port, devices=4)
        env.update(JAX_LOG_COMPILES="1", MTM_DATA_DIR=str(data_dir))
        command = [
            sys.executable,
            "-m",
            "multitask_moe.train",
            "--config=configs/default.py",
            f"--workdir={workdir}",
            "--config.num_cpu_devices=0",
        ]
        processes.append(
            subprocess.Popen(
                command,
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    try:
        outputs = [process.communicate(timeout=240) for process in processes]
    finally:
        for process in processes:
            process.kill()
    errors = []
    for process, (_, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 2, stderr
        assert "Compiling" not in stderr and "Traceback" not in stderr, stderr
        errors.append([line for line in stderr.splitlines() if line.startswith("error:")])
    assert errors[0] == errors[1] and len(errors[0]) == 1
    assert f"another run (pid {live_pid} on this host" in errors[0][0]
    assert list(data_dir.iterdir()) == []  # no dataset was built
    assert sorted(p.name for p in workdir.iterdir()) == [LOCK_FILE]
