"""One run per workdir: a lock file that names its owner and notices when it is dead.

    with RunLock(workdir):      # RunLockError if a live run holds the workdir
        ...                     # the run; the lock goes when the block ends

`workdir/run.lock` holds {"host", "pid", "started"} of the run that owns the workdir. It
is created atomically (O_EXCL) on a local path; on a remote path (gs://...) the check
and the write are two steps, so two starts in the same instant are not excluded there.
A lock left by a crashed run is stale when its host is this host and its pid is no
longer alive; the new run then says so and takes over. A lock from another host cannot
be checked from here: the error names the host and pid and the file to delete once
that run is known to be dead. Only process 0 of a multi-process run takes the lock.
"""

from __future__ import annotations

import json
import os
import socket
import time

import tensorflow as tf

from multitask_moe.train.setup import ConfigError

LOCK_FILE = "run.lock"


class RunLockError(ConfigError):
    """Another live run owns the workdir (a ConfigError: the command line prints it as
    one line and exits with status 2, like any run that cannot start)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _is_local(path: str) -> bool:
    return "://" not in path


class RunLock:
    def __init__(self, workdir: str, *, enabled: bool = True):
        self.path = os.path.join(workdir, LOCK_FILE)
        self.enabled = enabled
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        self._held = False

    def _read(self) -> dict | None:
        try:
            with tf.io.gfile.GFile(self.path) as f:
                return json.load(f)
        except (tf.errors.NotFoundError, FileNotFoundError):
            return None
        except (ValueError, tf.errors.OpError):
            return {}  # half-written or unreadable: treated as stale below

    def _write(self, exclusive: bool) -> bool:
        text = json.dumps(self.owner)
        if exclusive and _is_local(self.path):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(text)
            return True
        with tf.io.gfile.GFile(self.path, "w") as f:
            f.write(text)
        return True

    def acquire(self) -> None:
        if not self.enabled:
            return
        if not self._write(exclusive=True):
            other = self._read()
            if other is not None:
                self._check_stale(other)
            self._write(exclusive=False)
        self._held = True

    def _check_stale(self, other: dict) -> None:
        host, pid = other.get("host"), other.get("pid")
        mine = host == self.owner["host"]
        if not other or (mine and isinstance(pid, int) and not _alive(pid)):
            print(f"Taking over {self.path}: the run that left it (pid {pid}) is gone.")
            return
        started = other.get("started")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
        where = "this host" if mine else f"host {host}"
        hint = "" if mine else f"; if that run is dead, delete {self.path}"
        raise RunLockError(
            f"another run (pid {pid} on {where}, started {since}) is using this workdir "
            f"({self.path}); wait for it or use another --workdir{hint}"
        )

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        other = self._read()
        if (
            other
            and other.get("pid") == self.owner["pid"]
            and other.get("host") == (self.owner["host"])
        ):
            tf.io.gfile.remove(self.path)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
