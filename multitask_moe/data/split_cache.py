"""A mixture's task splits in its common batch layout, each read from TFDS once and kept.

Shapes: n examples (of a split, or of this process's shard of it), L tokens, P features
per token; one example is inputs float32 [L, P], mask bool [L], label int32 [],
task_id int32 [].

  padded(t, split, process)    tf.data.Dataset of the shard's examples in the layout
  examples(t, split, process)  (padded, its size n): the dataset is cached in memory after
                               its first pass when its inputs take at most cache_bytes
                               (n * L * P * 4), else re-read from TFDS on every pass
  in_memory(t, split)          the whole split as numpy arrays [n, ...] (order="global")
  size(t, split)               n of the whole split
  check_fits(t, n)             order="global": ValueError unless n examples fit in
                               cache_bytes
Each is computed once per key and kept for the mixture's lifetime.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from multitask_moe.data import tasks as tasks_lib


class SplitCache:
    """The splits of `tasks` (task id = position) padded to `token_shape` (L, P)."""

    def __init__(
        self,
        tasks: Sequence[tasks_lib.Task],
        token_shape: tuple[int, int],
        *,
        image_size: int,
        patch_size: int,
        cache_bytes: int,
    ) -> None:
        self.tasks = tasks
        self.token_shape = token_shape
        self.image_size, self.patch_size = image_size, patch_size
        self.cache_bytes = cache_bytes
        self._examples: dict[tuple[int, str, int, int], tuple[Any, int]] = {}
        self._arrays: dict[tuple[int, str], dict[str, np.ndarray]] = {}
        self._sizes: dict[tuple[int, str], int] = {}

    def _bytes(self, size: int) -> int:
        """Bytes of the float32 inputs [size, L, P] of `size` examples."""
        length, width = self.token_shape
        return size * length * width * 4

    def padded(self, task_id: int, split: str, process: tuple[int, int]) -> Any:
        """tf.data.Dataset of this process's shard of the task's split in the batch layout."""
        import tensorflow as tf

        from multitask_moe.data import preprocess

        length, width = self.token_shape
        tokens = self.tasks[task_id].dataset(
            split,
            image_size=self.image_size,
            patch_size=self.patch_size,
            process_index=process[0],
            process_count=process[1],
        )

        def to_layout(example):
            inputs, mask = preprocess.pad_tokens(
                example["tokens"], length, width, example.get("valid")
            )
            task = tf.constant(task_id, tf.int32)
            return {"inputs": inputs, "mask": mask, "label": example["label"], "task_id": task}

        return tokens.map(to_layout, num_parallel_calls=tf.data.AUTOTUNE)

    def examples(self, task_id: int, split: str, process: tuple[int, int]) -> tuple[Any, int]:
        """(`padded`, cached in memory when under cache_bytes, and its size)."""
        key = (task_id, split, *process)
        if key not in self._examples:
            examples = self.padded(task_id, split, process)
            size = int(examples.cardinality())
            if size < 0:  # unknown cardinality: count once
                size = int(examples.reduce(np.int64(0), lambda count, _: count + 1))
            if self._bytes(size) <= self.cache_bytes:
                examples = examples.cache()
            self._examples[key] = (examples, size)
        return self._examples[key]

    def in_memory(self, task_id: int, split: str) -> dict[str, np.ndarray]:
        """The task's whole split as numpy arrays [n, ...] by name (at most cache_bytes)."""
        key = (task_id, split)
        if key not in self._arrays:
            size = self.tasks[task_id].num_examples(split)
            if size == 0:
                raise ValueError(f"Task {self.tasks[task_id].name!r} has no {split!r} examples.")
            self.check_fits(task_id, size)
            # Read once into numpy, not through `examples`: its tf.data cache would hold
            # the split a second time.
            element = self.padded(task_id, split, (0, 1)).batch(size).get_single_element()
            self._arrays[key] = {name: value.numpy() for name, value in element.items()}
        return self._arrays[key]

    def size(self, task_id: int, split: str) -> int:
        """Examples in the task's whole split (all processes together)."""
        if (task_id, split) not in self._sizes:
            self._sizes[task_id, split] = self.tasks[task_id].num_examples(split)
        return self._sizes[task_id, split]

    def check_fits(self, task_id: int, size: int) -> None:
        """order="global": a task's split of `size` examples must fit in cache_bytes."""
        needed = self._bytes(size)
        if needed > self.cache_bytes:
            raise ValueError(
                f"order='global' holds each task's split in memory: task "
                f"{self.tasks[task_id].name!r} needs {needed} bytes > cache_bytes="
                f"{self.cache_bytes}; use order='process'."
            )
