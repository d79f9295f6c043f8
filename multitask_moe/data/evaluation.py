"""Exact eval passes: every example of a process's shard of a task's split once, in full batches.

Shapes: K examples per process batch, L tokens, P features per token, n examples in the
task's split, count processes.

Each process reads its shard of the split in stored order, pads the last batch
(valid=False, label 0, inputs 0, mask of a real example of the task so no row is
all-masked) and adds all-padding batches so that every process yields
ceil(ceil(n / count) / K) batches per task, the same number on every process.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from multitask_moe.data import split_cache


class EvalPasses:
    """The padded eval pass of each (task, split, process, batch count, K), built once."""

    def __init__(self, cache: split_cache.SplitCache) -> None:
        self._cache = cache
        self._passes: dict[tuple[int, str, int, int, int, int], Any] = {}

    def num_batches(self, task_id: int, split: str, process_count: int, local: int) -> int:
        """ceil(ceil(n / count) / K): batches of K examples of the task on every process."""
        total = self._cache.size(task_id, split)
        return math.ceil(math.ceil(total / process_count) / local)

    def dataset(
        self, task_id: int, split: str, process: tuple[int, int], num_batches: int, local: int
    ) -> Any:
        """tf.data.Dataset of `num_batches` batches of K = `local` examples plus valid [K].

        Batch: inputs float32 [K, L, P], mask bool [K, L], label int32 [K],
        task_id int32 [K], valid bool [K] (False for the padding examples).
        """
        import tensorflow as tf

        key = (task_id, split, *process, num_batches, local)
        if key not in self._passes:
            examples, size = self._cache.examples(task_id, split, process)
            padding = num_batches * local - size
            if padding < 0:
                raise RuntimeError(f"Shard of {size} examples exceeds {num_batches}x{local} slots.")
            length, width = self._cache.token_shape
            task = self._cache.tasks[task_id]
            num_tokens = task.num_tokens(self._cache.image_size, self._cache.patch_size)
            filler = {
                "inputs": np.zeros((length, width), np.float32),
                "mask": np.arange(length) < num_tokens,
                "label": np.int32(0),
                "task_id": np.int32(task_id),
                "valid": False,
            }
            real = examples.map(lambda example: {**example, "valid": tf.constant(True)})
            padded = real.concatenate(tf.data.Dataset.from_tensors(filler).repeat(padding))
            self._passes[key] = padded.batch(local)
        return self._passes[key]
