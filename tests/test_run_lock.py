"""One run per workdir: the lock file against live, dead and foreign owners."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from multitask_moe.train.run_lock import LOCK_FILE, RunLock, RunLockError
from multitask_moe.train.setup import ConfigError


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
