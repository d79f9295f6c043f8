"""One run per workdir: a lock file that names its owner and notices when it is dead.

    with claim(workdir):        # made and locked first: RunLockError if a live run holds it
        experiment = prepare(config)   # datasets, model, compiles: only once the dir is ours
        ...                     # the run; the lock goes when the block ends

`claim` is what a command takes before it prepares anything, so a start refused for a
busy workdir costs only the imports and the config check. Process 0 alone takes the
lock; the other processes of the job learn its outcome through the distributed
runtime's key-value store (no device, no compile) and raise the same line. A workdir the
claim made and that is still empty when it ends is removed: a run refused later for a
bad config leaves nothing behind.

`workdir/run.lock` holds {"host", "pid", "started"} of the run that owns the workdir. It
is created atomically (O_EXCL) on a local path; on a remote path (gs://...) the check
and the write are two steps, so two starts in the same instant are not excluded there.
A lock left by a crashed run is stale when its host is this host and its pid is no
longer alive; the new run then says so and takes over. A lock from another host cannot
be checked from here: the error names the host and pid and the file to delete once
that run is known to be dead. Only process 0 of a multi-process run takes the lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator

import tensorflow as tf

from multitask_moe import parallel
from multitask_moe.errors import ConfigError

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
    """workdir/`file` while held. holder, target and flag word the refusal: "another
    run ... is using this workdir ...; use another --workdir" by default."""

    def __init__(
        self,
        workdir: str,
        *,
        enabled: bool = True,
        file: str = LOCK_FILE,
        holder: str = "run",
        target: str = "is using this workdir",
        flag: str = "--workdir",
    ):
        self.path = os.path.join(workdir, file)
        self.enabled = enabled
        self.holder, self.target, self.flag = holder, target, flag
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
            print(f"Taking over {self.path}: the {self.holder} that left it (pid {pid}) is gone.")
            return
        started = other.get("started")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
        where = "this host" if mine else f"host {host}"
        hint = "" if mine else f"; if that {self.holder} is dead, delete {self.path}"
        raise RunLockError(
            f"another {self.holder} (pid {pid} on {where}, started {since}) {self.target} "
            f"({self.path}); wait for it or use another {self.flag}{hint}"
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


@contextlib.contextmanager
def claim(workdir: str, **lock_args) -> Iterator[RunLock]:
    """`workdir` made (a local path or gs://) and locked by process 0, before anything else.

    Raises ConfigError (RunLockError for a live owner) on every process of the job when
    process 0 cannot make or lock it. lock_args: RunLock's file, holder and target.
    """
    process, count = parallel.process_position()
    lock = RunLock(workdir, enabled=process == 0, **lock_args)
    made = refusal = None
    if process == 0:
        try:
            made = _make_directory(workdir, lock.flag)
            lock.acquire()
        except ConfigError as error:
            refusal = error
    if count > 1:  # every process learns process 0's outcome, and stops with the same line
        shared = parallel.share_from_coordinator("claim", "" if refusal is None else str(refusal))
        if shared and refusal is None:
            refusal = RunLockError(shared) if "another " in shared else ConfigError(shared)
    if refusal is not None:
        raise refusal
    try:
        yield lock
    finally:
        lock.release()
        if made is not None:
            _remove_if_empty(workdir, made)


def _make_directory(path: str, flag: str) -> str | None:
    """Creates `path` (parents too); returns the outermost directory it created, or None."""
    created = None
    parent = path.rstrip("/")
    while parent and not tf.io.gfile.exists(parent):
        created = parent
        parent = os.path.dirname(parent)
    try:
        tf.io.gfile.makedirs(path)
    except (tf.errors.OpError, OSError) as error:
        reason = getattr(error, "message", None) or str(error)
        raise ConfigError(f"{flag}={path!r} cannot be created: {reason}") from None
    return created


def _remove_if_empty(path: str, outermost: str) -> None:
    """Removes `path` and its parents up to `outermost` while they are empty."""
    path = path.rstrip("/")
    while not tf.io.gfile.listdir(path):
        tf.io.gfile.rmtree(path)
        if path == outermost:
            return
        path = os.path.dirname(path)
