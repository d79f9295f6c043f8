"""One global example order for a mixture's training stream, whatever the process count.

Shapes: B global batch, K = B / process_count rows of this process, L tokens, P features
per token, T tasks, n_t examples in task t's split.

The process-sharded stream (process_order.py) gives each process its own shard and shuffle, so
the batches, and a model trained on them, depend on how many processes read. Here every
process holds every task's whole split in memory and addresses it by index:
  slot b of step s chooses task t = TaskChoices(s, b) (the same stateless hash);
  it takes position p of task t's global stream, p = the slots of steps [0, s) and of
  slots [0, b) of step s that chose t;
  position p is example perm_{t, e}[p mod n_t] of the split, e = p // n_t, perm_{t, e} a
  permutation seeded by (seed, split, t, e): every epoch visits each example once.
A process computes the B choices of a step (numpy, no data read) and gathers only its K
rows [k K, (k + 1) K): the global batch of every step is the same for 1 process x 8
devices and 2 processes x 4, so the training is too. Resuming at step N re-hashes the
choices of steps [0, N) to count the positions, as the sharded stream does.

`dataset` wraps `Stream` in the endless tf.data.Dataset of this process's batches; each
task's split comes from the mixture's split_cache.SplitCache, so it must fit in
cache_bytes.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

from multitask_moe.data import checks, split_cache
from multitask_moe.data import rates as rates_lib


class TaskExamples:
    """One task's split in memory and its per-epoch permutations.

    Args:
      arrays: {"inputs": [n, L, P], "mask": [n, L], "label": [n], "task_id": [n]}.
      key: stream key of (seed, split, task).
    """

    def __init__(self, arrays: Mapping[str, np.ndarray], key: int) -> None:
        self.arrays = dict(arrays)
        self.size = len(self.arrays["label"])
        self._key = key
        self._orders: dict[int, np.ndarray] = {}

    def order(self, epoch: int) -> np.ndarray:
        """int64 [n]: the split's indices in epoch `epoch`'s order."""
        if epoch not in self._orders:
            if len(self._orders) > 2:  # only the latest epochs are asked for again
                self._orders.pop(min(self._orders))
            rng = np.random.default_rng([self._key, epoch])
            self._orders[epoch] = rng.permutation(self.size)
        return self._orders[epoch]

    def indices(self, positions: np.ndarray) -> np.ndarray:
        """int64 [m]: split indices of global stream positions [m] (ascending)."""
        epochs, offsets = np.divmod(positions, self.size)
        out = np.empty(len(positions), np.int64)
        for epoch in np.unique(epochs):
            at = epochs == epoch
            out[at] = self.order(int(epoch))[offsets[at]]
        return out


class Stream:
    """This process's K rows of the global batches, step after step from `start_step`.

    `examples` holds the tasks that are ever chosen (rate > 0), by task id. The positions
    of a step follow from those of the step before; a step asked for out of turn (a new
    pass over the tf.data.Dataset, a second iterator) re-counts them from the choices.
    """

    def __init__(
        self,
        examples: Mapping[int, TaskExamples],
        choices: rates_lib.TaskChoices,
        *,
        batch_size: int,
        start_step: int,
        process: tuple[int, int],
        num_tasks: int,
    ) -> None:
        self._examples = examples
        self._choices = choices
        self._local = batch_size // process[1]
        self._slots = np.arange(batch_size)  # [B]
        self._mine = slice(process[0] * self._local, (process[0] + 1) * self._local)
        self._tasks = np.arange(num_tasks)
        self._taken = choices.counts_before(start_step, self._slots)  # [T] positions used
        self._next_step = start_step
        self._lock = threading.Lock()  # tf.data may call from several threads
        self.names = list(next(iter(examples.values())).arrays)

    def batch(self, step: int) -> list[np.ndarray]:
        """The arrays (in `names` order) of this process's rows at `step`."""
        step = int(step)
        tasks = self._choices.tasks(np.array([step]), self._slots)[0]  # [B]
        chosen = tasks[:, None] == self._tasks  # [B, T]
        before = np.cumsum(chosen, axis=0) - chosen  # [B, T] earlier slots of each task
        with self._lock:
            if step != self._next_step:
                self._taken = self._choices.counts_before(step, self._slots)
            positions = self._taken[tasks] + before[self._slots, tasks]  # [B]
            self._taken = self._taken + chosen.sum(axis=0)
            self._next_step = step + 1
        local_tasks, local_positions = tasks[self._mine], positions[self._mine]  # [K]
        first = self._examples[int(local_tasks[0])].arrays
        out = {n: np.empty((self._local, *first[n].shape[1:]), first[n].dtype) for n in first}
        for task in np.unique(local_tasks):
            rows = local_tasks == task
            source = self._examples[int(task)]
            picked = source.indices(local_positions[rows])
            for name, array in source.arrays.items():
                out[name][rows] = array[picked]
        return [out[name] for name in self.names]


def dataset(
    cache: split_cache.SplitCache,
    rates: np.ndarray,
    choices: rates_lib.TaskChoices,
    args: checks.StreamArgs,
) -> Any:
    """The endless tf.data.Dataset of this process's rows of the process-independent batches."""
    import tensorflow as tf

    examples = {}  # {task id: TaskExamples} of the tasks ever chosen
    for t in map(int, np.flatnonzero(rates)):
        arrays = cache.in_memory(t, args.split)
        examples[t] = TaskExamples(arrays, rates_lib.stream_key(args.seed, args.split, "global", t))
    stream = Stream(
        examples,
        choices,
        batch_size=args.batch_size,
        start_step=args.start_step,
        process=args.process,
        num_tasks=len(rates),
    )
    local = args.local
    length, width = cache.token_shape
    shapes = {"inputs": [local, length, width], "mask": [local, length]}
    types = {"inputs": tf.float32, "mask": tf.bool, "label": tf.int32, "task_id": tf.int32}

    def rows(step):
        arrays = tf.numpy_function(stream.batch, [step], [types[n] for n in stream.names])
        return {
            name: tf.ensure_shape(array, shapes.get(name, [local]))
            for name, array in zip(stream.names, arrays, strict=True)
        }

    # One call per step in order (the positions of a step continue the step before's);
    # any other order is still exact (Stream re-counts), only slower.
    return (
        tf.data.Dataset.range(args.start_step, rates_lib.FOREVER)
        .map(rows)
        .prefetch(tf.data.AUTOTUNE)
    )
