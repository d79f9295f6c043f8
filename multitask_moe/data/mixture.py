"""Task mixtures: a sampled, sharded, resumable training stream and exact eval passes.

Shapes: B global batch size, K = B / process_count examples per process, L tokens,
P features per token, T tasks.

`Mixture` checks its arguments (checks.py), sets the tasks' rates (rates.py) and their
common layout (L, P), and leaves the data to:
  split_cache.py    each task's splits in the layout, read once and kept
  process_order.py  order="process": each process streams and shuffles its own shards
  global_order.py   order="global": one example order for any process count
  evaluation.py     eval passes, padded to the same batch count on every process
In both orders the task of every slot of every step is a stateless hash of (seed, split,
step, slot) (rates.TaskChoices), so start_step=N re-hashes the choices of steps [0, N)
(no data read) to place every task stream, and yields exactly the batches of an
uninterrupted iterator from step N on. There is no iterator state to checkpoint:
(seed, N) is the state.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from multitask_moe.data import (
    checks,
    evaluation,
    global_order,
    process_order,
    registry,
    split_cache,
)
from multitask_moe.data import rates as rates_lib
from multitask_moe.data import tasks as tasks_lib
from multitask_moe.errors import check_int

ORDERS = ("process", "global")


class Mixture:
    """A weighted set of tasks brought to one batch layout.

    Args:
      tasks: {name: weight} (weight 0 keeps the task and its id but never samples it) or
        a list of names (all weight 1). Task ids are positions in this order.
      rate: "explicit" | "proportional" | "temperature" (see `rates.mixing_rates`; the
        weights scale the example counts for the last two, like seqio's `scale`).
      cap: cap on the scaled example counts ("proportional" and "temperature").
      temperature: for rate="temperature".
      image_size, patch_size: images become (image_size / patch_size)^2 patch tokens.
      data_dir: TFDS data directory (default `tasks.default_data_dir()`).
      shuffle_buffer: the largest per-task shuffle buffer (examples).
      cache_bytes: a task shard whose padded tokens fit in this many bytes is kept in
        memory after its first pass; a larger one is re-read from TFDS every epoch.
      min_token_shape: (L, P) to pad to at least, e.g. the layout of the mixture a model
        extracted for one of its tasks was trained on; (0, 0) = the tasks' own.
      train_examples: {name: N}: those tasks train on N examples of their train split
        (`Task.limited`: the same N for the same `subset_seed`).
      order: "process": each process streams and shuffles its own shard of every task
        (any dataset size; the batches depend on the process count). "global": one
        example order for any process count (each process holds every task's training
        split in memory, which must fit in `cache_bytes`).

    Attributes:
      tasks: list[Task] in task-id order.
      weights: float64 [T] as given.
      rates: float64 [T] normalized sampling rates.
      token_shape: (L, P), the largest token count and token width over all tasks.
    """

    def __init__(
        self,
        tasks: Mapping[str, float] | Sequence[str],
        rate: str = "explicit",
        *,
        cap: float | None = None,
        temperature: float | None = None,
        image_size: int = 16,
        patch_size: int = 4,
        data_dir: str | None = None,
        shuffle_buffer: int = 16_384,
        cache_bytes: int = 1 << 30,
        min_token_shape: tuple[int, int] = (0, 0),
        train_examples: Mapping[str, int] | None = None,
        subset_seed: int = 0,
        order: str = "process",
    ):
        names, weights = checks.parse_weights(tasks)
        if order not in ORDERS:
            raise ValueError(f"order={order!r} is not one of {ORDERS}.")
        self.order = order
        train_examples = dict(train_examples or {})
        unknown = sorted(set(train_examples) - set(names))
        if unknown:
            raise ValueError(f"train_examples names {unknown}, which are not tasks; tasks: {names}")
        if rate not in rates_lib.RATE_KINDS:
            raise ValueError(f"rate={rate!r} is not one of {rates_lib.RATE_KINDS}.")
        tasks_lib.check_image_layout(image_size, patch_size)
        self.image_size, self.patch_size = image_size, patch_size
        self.shuffle_buffer = check_int(shuffle_buffer, "shuffle_buffer", 1)
        self.cache_bytes = check_int(cache_bytes, "cache_bytes", 0)
        self.tasks = [registry.get_task(name, data_dir) for name in names]
        self.tasks = [
            task.limited(train_examples[task.name], subset_seed)
            if task.name in train_examples
            else task
            for task in self.tasks
        ]
        self.weights = np.asarray(weights)
        num_examples = None
        if rate != "explicit":
            num_examples = [
                task.num_examples("train") if w > 0 else 0
                for task, w in zip(self.tasks, weights, strict=True)
            ]
        self.rates = rates_lib.mixing_rates(
            weights, rate, num_examples=num_examples, cap=cap, temperature=temperature
        )
        min_tokens, min_width = (check_int(n, "min_token_shape", 0) for n in min_token_shape)
        self.token_shape = (
            max(min_tokens, *(task.num_tokens(image_size, patch_size) for task in self.tasks)),
            max(min_width, *(task.token_dim(image_size, patch_size) for task in self.tasks)),
        )
        self._splits = split_cache.SplitCache(
            self.tasks,
            self.token_shape,
            image_size=image_size,
            patch_size=patch_size,
            cache_bytes=self.cache_bytes,
        )
        if order == "global":  # refuse now what would not fit, before a model is built
            for task_id, task in enumerate(self.tasks):
                if self.rates[task_id] > 0:
                    self._splits.check_fits(task_id, task.num_examples("train"))
        self._eval = evaluation.EvalPasses(self._splits)

    def dataset(
        self,
        split: str = "train",
        *,
        batch_size: int,
        seed: int = 0,
        start_step: int = 0,
        process_index: int | None = None,
        process_count: int | None = None,
    ) -> Any:
        """The infinite training tf.data.Dataset of this process's batches (see `iterator`)."""
        args = checks.stream_args(split, batch_size, seed, start_step, process_index, process_count)
        for task in self.tasks:
            task.tfds_split(split)
        key = rates_lib.stream_key(args.seed, split)
        choices = rates_lib.TaskChoices(self.rates, key, batch_size)
        if self.order == "global":
            return global_order.dataset(self._splits, self.rates, choices, args)
        return process_order.dataset(self._splits, self.rates, choices, args, self.shuffle_buffer)

    def iterator(
        self,
        split: str = "train",
        *,
        batch_size: int,
        seed: int = 0,
        start_step: int = 0,
        process_index: int | None = None,
        process_count: int | None = None,
    ) -> Iterator[dict[str, np.ndarray]]:
        """Endless numpy batches of this process: its K = batch_size / process_count slice.

        Each batch: inputs float32 [K, L, P], mask bool [K, L], label int32 [K],
        task_id int32 [K]. The same (seed, split, batch_size, process) gives the same
        batches; start_step=N yields exactly the batches from step N on.
        """
        return self.dataset(
            split,
            batch_size=batch_size,
            seed=seed,
            start_step=start_step,
            process_index=process_index,
            process_count=process_count,
        ).as_numpy_iterator()

    def _check_task_id(self, task_id: object) -> None:
        if not isinstance(task_id, int | np.integer) or not 0 <= task_id < len(self.tasks):
            raise ValueError(f"task_id must be an int in [0, {len(self.tasks)}), got {task_id!r}.")

    def num_eval_batches(
        self, task_id: int, split: str, *, batch_size: int, process_count: int | None = None
    ) -> int:
        """Batches `eval_iterator` yields for the task on every process."""
        self._check_task_id(task_id)
        if process_count is None:
            import jax

            process_count = jax.process_count()
        count = check_int(process_count, "process_count", 1)
        local = checks.local_batch_size(batch_size, count)
        return self._eval.num_batches(task_id, split, count, local)

    def eval_iterator(
        self,
        task_id: int,
        split: str = "validation",
        *,
        batch_size: int,
        process_index: int | None = None,
        process_count: int | None = None,
    ) -> Iterator[dict[str, np.ndarray]]:
        """Every example of this process's shard of the task's split once, in full batches.

        Batches are those of `iterator` plus valid bool [K]; padding examples have
        valid=False, label 0 and inputs 0.
        """
        self._check_task_id(task_id)
        process = checks.resolve_process(process_index, process_count)
        local = checks.local_batch_size(batch_size, process[1])
        self.tasks[task_id].tfds_split(split)
        num_batches = self.num_eval_batches(
            task_id, split, batch_size=batch_size, process_count=process[1]
        )
        passes = self._eval.dataset(int(task_id), split, process, num_batches, local)
        return passes.as_numpy_iterator()

    def eval_batches(
        self,
        split: str = "validation",
        *,
        batch_size: int,
        process_index: int | None = None,
        process_count: int | None = None,
        task_ids: Sequence[int] | None = None,
    ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """(task_id, batch) for every task (or `task_ids`), task after task: `eval_iterator`."""
        task_ids = range(len(self.tasks)) if task_ids is None else list(task_ids)
        iterators = [
            (
                t,
                self.eval_iterator(
                    t,
                    split,
                    batch_size=batch_size,
                    process_index=process_index,
                    process_count=process_count,
                ),
            )
            for t in task_ids
        ]  # built eagerly so that bad arguments raise here, not at the first next()
        return ((t, batch) for t, batches in iterators for batch in batches)
