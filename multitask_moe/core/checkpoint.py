"""Orbax checkpoints of a run, in workdir/checkpoints, and of an evolving system, in
workdir/system: one layer for both.

Each checkpoint holds two items: arrays (a training run's "state", the sharded train state
pytree; an evolution's "arrays", every live component's) and JSON (a run's "progress": the
step, the number of batches the data iterator has served, the mesh it was written on; an
evolution's "meta"). Saves are asynchronous: the loop goes on while the arrays are written, and
only the next save or `close()` waits. Restoring takes the target shardings, so a
checkpoint written on one mesh restores onto another (each process reads its shards).

Failures lose nothing. Orbax writes a step into a temporary directory and renames it
when complete, so a run killed mid-write leaves the previous steps as they were. A write
that fails (disk full, a directory made read-only) raises CheckpointWriteError naming the
step and the path; older steps are only deleted after a newer one is committed. A step
that cannot be read back (a truncated array file, a step directory missing parts) is
moved to <directory>.unreadable/ beside the directory (checkpoints.unreadable/), never
deleted, and the previous step is tried; in a multi-process run every process reads its
own shards and then they agree, so all of them give up a step that any one of them could
not read. A step whose
arrays have other shapes than the model (the config changed) raises
CheckpointShapeError: that is a wrong config, not a damaged checkpoint.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from multitask_moe.core.failed_reads import QuietFailedReads
from multitask_moe.core.storable import abstract_storable, from_storable, to_storable
from multitask_moe.errors import one_line
from multitask_moe.models.keys import key_names, path_text

logger = logging.getLogger(__name__)


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; the message names the step and the path."""


class CheckpointShapeError(ValueError):
    """A checkpoint holds arrays of other shapes than the state it is restored into.

    differences: [(path, saved shape, expected shape)], in tree order.
    """

    def __init__(self, message: str, differences: list[tuple[str, tuple, tuple]]):
        super().__init__(message)
        self.differences = differences


class Checkpoints:
    """CheckpointManager for one directory: save(step, state, progress), restore(step,
    ...), restore_latest_readable(...)."""

    def __init__(
        self,
        directory: str,
        *,
        keep: int,
        enable_async: bool = True,
        writer: bool = False,
        items: tuple[str, str] = ("state", "progress"),
    ):
        """writer: this is the run that writes here (it holds the workdir's run lock), so
        the partial step directories a killed run left (`<step>.orbax-checkpoint-tmp`,
        never a checkpoint) are removed now. Rewriting the same step over one of them
        failed in a resumed run ("NOT_FOUND ... Error reading Byte range" in its OCDBT
        files); a reader must leave them, they may be a live run's write.
        items: the names of the arrays item and the JSON item in each step."""
        # Orbax wants an absolute path; gs:// buckets already are.
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=enable_async,
            cleanup_tmp_directories=writer,
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_names=items,
            # Named handlers, so the saved shapes can be read without restoring the arrays.
            item_handlers={
                items[0]: ocp.StandardCheckpointHandler(),
                items[1]: ocp.JsonCheckpointHandler(),
            },
        )
        self.items = items
        self._writing: int | None = None  # the step whose asynchronous write may be running
        # Reads go through a Checkpointer of this process alone. The manager's restore
        # ends in a barrier of all processes, which a process whose read failed never
        # reaches (a shard only it reads: experts sharded across processes), so the
        # others would wait there for ever; restore_latest_readable agrees instead.
        alone = ocp.options.MultiprocessingOptions(
            primary_host=jax.process_index(), active_processes={jax.process_index()}
        )
        self._reader = ocp.Checkpointer(
            ocp.CompositeCheckpointHandler(
                **{
                    items[0]: ocp.StandardCheckpointHandler(multiprocessing_options=alone),
                    items[1]: ocp.JsonCheckpointHandler(multiprocessing_options=alone),
                }
            ),
            multiprocessing_options=alone,
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, progress: dict[str, Any]) -> None:
        """Starts an asynchronous save of `state` and `progress` at `step`.

        Raises CheckpointWriteError when this write cannot start or the previous one
        failed (Orbax reports an asynchronous failure at the next save or wait).
        """
        if step in self.manager.all_steps():
            return  # e.g. the final step right after a periodic save of the same step
        self.wait()  # Orbax would wait too; here a failure of that write names its step
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    **{
                        self.items[0]: ocp.args.StandardSave(to_storable(state)),
                        self.items[1]: ocp.args.JsonSave(_plain(progress)),
                    }
                ),
                force=True,
            )
        except Exception as error:  # noqa: BLE001 -- any I/O failure, named in one line
            raise self._write_error(step, error) from None
        self._writing = step

    def _write_error(self, step: int, error: BaseException) -> CheckpointWriteError:
        previous = [s for s in self.manager.all_steps() if s < step]
        kept = f"step {max(previous)} is intact" if previous else "no earlier checkpoint exists"
        return CheckpointWriteError(
            f"could not write checkpoint step {step} to {self.directory}: "
            f"{one_line(error, limit=200)}; {kept}"
        )

    def saved_shapes(self, step: int) -> dict[str, tuple[int, ...]] | None:
        """{array path: shape} of `step`'s state as its metadata records it; None when the
        metadata cannot be read (the restore then decides)."""
        try:
            metadata = self.manager.item_metadata(step)[self.items[0]]
            leaves = jax.tree_util.tree_flatten_with_path(dict(metadata))[0]
        except Exception:  # noqa: BLE001 -- unreadable metadata: a damaged step
            return None
        return {
            path_text(key_names(path, variables=True)): tuple(leaf.shape) for path, leaf in leaves
        }

    def check_shapes(self, step: int, abstract_state) -> None:
        """CheckpointShapeError when `step` was saved with other array shapes (nothing to
        compare with for abstract_state=None)."""
        saved = None if abstract_state is None else self.saved_shapes(step)
        if saved is None:
            return
        expected = {
            path_text(key_names(path, variables=True)): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(
                abstract_storable(abstract_state)
            )[0]
        }
        differences = [
            (name, saved.get(name), expected.get(name))
            for name in sorted(set(saved) | set(expected))
            if saved.get(name) != expected.get(name)
        ]
        if differences:
            shown = "; ".join(
                f"{name}: saved {_shape(a)}, now {_shape(b)}" for name, a, b in differences[:3]
            )
            more = f" (and {len(differences) - 3} more)" if len(differences) > 3 else ""
            raise CheckpointShapeError(
                f"checkpoint step {step} in {self.directory} holds arrays of other shapes "
                f"than this model: {shown}{more}",
                differences,
            )

    def restore_latest_readable(
        self, abstract_state, warn: Callable[[str], None]
    ) -> tuple[int, Any, dict[str, Any]] | None:
        """(step, state, progress) of the newest step that restores, or None if none
        (abstract_state: as for `restore`).

        A step that does not restore, on this process or any other, is moved aside (`warn`
        gets one line naming it and where it went) and the one before is tried.
        CheckpointShapeError propagates.
        """
        with QuietFailedReads() as quiet:
            for step in sorted(self.manager.all_steps(), reverse=True):
                failure = None
                try:
                    self.check_shapes(step, abstract_state)
                    state, progress = self.restore(step, abstract_state)
                except CheckpointShapeError as error:
                    failure = error
                except Exception as error:  # noqa: BLE001 -- tensorstore, JSON, I/O errors
                    failure = error
                reason = self._agreed_failure(step, failure)
                if reason is None:
                    return step, state, progress
                quiet.failed = True
                moved = self.move_aside(step)
                warn(
                    f"checkpoint step {step} in {self.directory} is unreadable "
                    f"({reason}); moved it to {moved}; trying the previous step"
                )
        return None

    def _agreed_failure(self, step: int, failure: BaseException | None) -> str | None:
        """One line for a restore of `step` that failed on this process or any other, None
        if it succeeded everywhere. Every process calls it after every attempt, so they all
        give up a step together, whoever could not read it. A CheckpointShapeError (a
        wrong config, not damage) is raised on every process."""
        status = 2 if isinstance(failure, CheckpointShapeError) else int(failure is not None)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            gathered = multihost_utils.process_allgather(np.array([step, status], np.int32))
            steps, statuses = gathered[:, 0], gathered[:, 1]  # [processes] each
            if (steps != step).any():
                raise RuntimeError(
                    f"the processes see different checkpoint steps in {self.directory} "
                    f"({sorted(set(steps.tolist()))}); is the directory shared by all?"
                )
        else:
            statuses = np.array([status])
        if status == 2:
            raise failure
        if (statuses == 2).any():
            shown = ", ".join(str(i) for i in np.flatnonzero(statuses == 2))
            raise CheckpointShapeError(
                f"checkpoint step {step} in {self.directory} holds arrays of other shapes "
                f"than this model (found by process {shown})",
                [],
            )
        if failure is not None:
            return one_line(failure, limit=200)
        failed = [str(i) for i in np.flatnonzero(statuses)]
        if failed:
            return f"process{'es' if len(failed) > 1 else ''} {', '.join(failed)} could not read it"
        return None

    def move_aside(self, step: int) -> str:
        """Moves step `step` out of the checkpoint directory; returns where it went."""
        target_dir = f"{self.directory}.unreadable"
        target = os.path.join(target_dir, str(step))
        if jax.process_index() == 0:
            tf_gfile().makedirs(target_dir)
            if tf_gfile().exists(target):
                target = f"{target}.{time.strftime('%Y%m%d-%H%M%S')}"
            tf_gfile().rename(os.path.join(self.directory, str(step)), target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"checkpoint {step} moved aside")
        self.manager.reload()
        return target

    def restore(self, step: int, abstract_state) -> tuple[Any, dict[str, Any]]:
        """Restores `step` onto the shardings of `abstract_state` (any mesh), or, for
        abstract_state=None, as the arrays were saved (an evolving system, whose pool
        the JSON item describes). Each process reads its own shards with no barrier; a
        failure raises on the processes it hit only (restore_latest_readable makes them
        agree)."""
        target = None if abstract_state is None else abstract_storable(abstract_state)
        restored = self._reader.restore(
            os.path.join(self.directory, str(step)),
            args=ocp.args.Composite(
                **{
                    self.items[0]: ocp.args.StandardRestore(target),
                    self.items[1]: ocp.args.JsonRestore(),
                }
            ),
        )
        state = restored[self.items[0]]
        if abstract_state is not None:
            state = from_storable(state, abstract_state)
        return state, dict(restored[self.items[1]])

    def wait(self) -> None:
        """Waits for the running write; CheckpointWriteError if it failed."""
        if self._writing is None:
            return
        step, self._writing = self._writing, None  # a failure is reported once
        try:
            self.manager.wait_until_finished()
        except Exception as error:  # noqa: BLE001 -- any I/O failure, named in one line
            raise self._write_error(step, error) from None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()
            self._reader.close()


def tf_gfile():
    """tf.io.gfile (local paths and gs://), imported when a step is moved aside."""
    import tensorflow as tf

    return tf.io.gfile


def _shape(shape) -> str:
    return "absent" if shape is None else f"[{', '.join(str(n) for n in shape)}]"


def _plain(value):
    """JSON-able copy of progress values (numpy scalars -> Python)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
