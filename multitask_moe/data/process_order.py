"""order="process": each process streams and shuffles its own shard of every task (tf.data).

Shapes: B global batch size, K = B / process_count slots of this process, T tasks, n_t
examples in this process's shard of task t's split.

  task t: its shard in the batch layout (split_cache.SplitCache.examples) -> epochs
          e = 0, 1, ..., each a shuffle seeded by (seed, split, process, t, e) with a
          buffer of min(n_t, shuffle_buffer) (a uniform permutation when the shard fits)
  mixture: tf.data.Dataset.choose_from_datasets(task streams, choices) where the choice
          of every slot of every step is a stateless hash (rates.TaskChoices); this is
          sample_from_datasets with its hidden RNG state replaced by a step-indexed one
          -> batch(K) -> prefetch.
Resumption by deterministic skip without replay: for start_step=N the choices of steps
[0, N) are re-hashed (no data read) to count the examples c_t each task stream gave up;
stream t then starts at epoch c_t // n_t and skips c_t % n_t examples of it (less than
one epoch of one shard). The batches from step N on are exactly those of an uninterrupted
stream. (tf.data's shuffle also folds in TensorFlow's global seed: a program that calls
tf.random.set_seed must do so the same way when it resumes.)

Any dataset size works (a shard larger than cache_bytes is re-read every epoch), but the
batches depend on the process count; global_order.py gives up the first for the second.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from multitask_moe.data import checks, split_cache
from multitask_moe.data import rates as rates_lib


def dataset(
    cache: split_cache.SplitCache,
    rates: np.ndarray,
    choices: rates_lib.TaskChoices,
    args: checks.StreamArgs,
    shuffle_buffer: int,
) -> Any:
    """The endless tf.data.Dataset of this process's batches of K = `args.local` examples."""
    import tensorflow as tf

    local, process = args.local, args.process
    slots = np.arange(process[0] * local, (process[0] + 1) * local)  # global slot ids [K]
    consumed = choices.counts_before(args.start_step, slots)  # [T]
    active = np.flatnonzero(rates > 0)
    stream_of_task = np.full(len(rates), -1, np.int64)
    stream_of_task[active] = np.arange(len(active))
    streams = [_task_stream(cache, int(t), args, int(consumed[t]), shuffle_buffer) for t in active]

    def step_choices(step: np.int64) -> np.ndarray:
        return stream_of_task[choices.tasks(np.array([step]), slots)[0]]  # [K]

    choice_stream = (
        tf.data.Dataset.range(args.start_step, rates_lib.FOREVER)
        .map(
            lambda step: tf.ensure_shape(tf.numpy_function(step_choices, [step], tf.int64), [local])
        )
        .unbatch()
    )
    mixed = tf.data.Dataset.choose_from_datasets(streams, choice_stream)
    return mixed.batch(local, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def _task_stream(
    cache: split_cache.SplitCache,
    task_id: int,
    args: checks.StreamArgs,
    consumed: int,
    shuffle_buffer: int,
) -> Any:
    """Task `task_id`'s endless example stream, after its first `consumed` examples."""
    import tensorflow as tf

    split, process = args.split, args.process
    examples, size = cache.examples(task_id, split, process)
    if size == 0:
        raise ValueError(
            f"Task {cache.tasks[task_id].name!r} has no {split!r} examples on process "
            f"{process[0]} of {process[1]}."
        )
    first_epoch, offset = divmod(consumed, size)
    buffer = min(size, shuffle_buffer)
    key = rates_lib.stream_key(args.seed, split, *process, task_id) % 2**31

    def epoch(index):
        return examples.shuffle(
            buffer, seed=key * 1_000_003 + index, reshuffle_each_iteration=False
        )

    return tf.data.Dataset.range(first_epoch, rates_lib.FOREVER).flat_map(epoch).skip(offset)
