"""Task mixtures: a sampled, sharded, resumable training stream and exact eval passes.

Shapes: B global batch size, K = B / process_count examples per process, L tokens,
P features per token, T tasks.

Training stream (per process), built from tf.data:
  task t: its shard of the split -> tokens padded to [L, P] (+ mask, label, task_id)
          -> cached in memory (when under `cache_bytes`) -> epochs e = 0, 1, ...,
          each a shuffle seeded by (seed, split, process, t, e) with a buffer of
          min(n_t, shuffle_buffer) (a uniform permutation when the shard fits)
  mixture: tf.data.Dataset.choose_from_datasets(task streams, choices) where the choice
          of every slot of every step is a stateless hash (rates.TaskChoices); this is
          sample_from_datasets with its hidden RNG state replaced by a step-indexed one
          -> batch(K) -> prefetch.
Resumption by deterministic skip without replay: for start_step=N the choices of steps
[0, N) are re-hashed (no data read) to count the examples c_t each task stream gave up;
stream t then starts at epoch c_t // n_t and skips c_t % n_t examples of it (less than
one epoch of one shard). The batches from step N on are exactly those of an uninterrupted
iterator. There is no iterator state to checkpoint: (seed, N) is the state. (tf.data's
shuffle also folds in TensorFlow's global seed: a program that calls tf.random.set_seed
must do so the same way when it resumes.)

With order="global" (global_order.py) every process holds every task's split in memory
and takes its rows of one global example order instead: the batches of a step are the
same for any process count.

Eval: each process reads its shard of each task's split in stored order, pads the last
batch (valid=False, inputs 0, mask of a real example of the task so no row is all-masked)
and adds all-padding batches so that every process yields ceil(ceil(n / count) / K)
batches per task, the same number on every process.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from numbers import Real
from typing import Any

import numpy as np

from multitask_moe.data import global_order
from multitask_moe.data import rates as rates_lib
from multitask_moe.data import tasks as tasks_lib

_FOREVER = 2**62
ORDERS = ("process", "global")


def _resolve_process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    tasks_lib.check_process(process_index, process_count)
    return process_index, process_count


def _check_int(name: str, value: object, minimum: int) -> int:
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}.")
    return int(value)


def _local_batch_size(batch_size: object, process_count: int) -> int:
    batch_size = _check_int("batch_size", batch_size, 1)
    if batch_size % process_count:
        raise ValueError(
            f"batch_size={batch_size} (the global batch) must be divisible by "
            f"process_count={process_count}."
        )
    return batch_size // process_count


def _parse_weights(tasks: Mapping[str, float] | Sequence[str]) -> tuple[list[str], list[float]]:
    if isinstance(tasks, str):
        raise ValueError(
            f"tasks must be a mapping name -> weight or a list of names, got {tasks!r}."
        )
    items = list(tasks.items()) if isinstance(tasks, Mapping) else [(name, 1.0) for name in tasks]
    if not items:
        raise ValueError("A mixture needs at least one task.")
    names = [name for name, _ in items]
    if len(set(names)) != len(names):
        raise ValueError(f"Task names must be unique, got {names}.")
    for name, weight in items:
        if not isinstance(weight, Real) or not math.isfinite(weight) or weight < 0:
            raise ValueError(
                f"Weight of task {name!r} must be a finite number >= 0, got {weight!r}."
            )
    if not any(weight > 0 for _, weight in items):
        raise ValueError(f"At least one task weight must be > 0, got {dict(items)}.")
    return names, [float(weight) for _, weight in items]


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
        names, weights = _parse_weights(tasks)
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
        self.shuffle_buffer = _check_int("shuffle_buffer", shuffle_buffer, 1)
        self.cache_bytes = _check_int("cache_bytes", cache_bytes, 0)
        self.tasks = [tasks_lib.get_task(name, data_dir) for name in names]
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
        min_tokens, min_width = (_check_int("min_token_shape", n, 0) for n in min_token_shape)
        self.token_shape = (
            max(min_tokens, *(task.num_tokens(image_size, patch_size) for task in self.tasks)),
            max(min_width, *(task.token_dim(image_size, patch_size) for task in self.tasks)),
        )
        if order == "global":  # refuse now what would not fit, before a model is built
            for task_id, task in enumerate(self.tasks):
                if self.rates[task_id] > 0:
                    self._check_fits(task_id, task.num_examples("train"))
        self._examples_cache: dict[tuple[int, str, int, int], tuple[Any, int]] = {}
        self._eval_cache: dict[tuple[int, str, int, int, int, int], Any] = {}
        self._split_sizes: dict[tuple[int, str], int] = {}
        self._in_memory: dict[tuple[int, str], dict[str, np.ndarray]] = {}

    def _padded(self, task_id: int, split: str, process: tuple[int, int]) -> Any:
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

    def _examples(self, task_id: int, split: str, process: tuple[int, int]) -> tuple[Any, int]:
        """(`_padded`, cached in memory when under cache_bytes, and its size)."""
        key = (task_id, split, *process)
        if key not in self._examples_cache:
            length, width = self.token_shape
            examples = self._padded(task_id, split, process)
            size = int(examples.cardinality())
            if size < 0:  # unknown cardinality: count once
                size = int(examples.reduce(np.int64(0), lambda count, _: count + 1))
            if size * length * width * 4 <= self.cache_bytes:
                examples = examples.cache()
            self._examples_cache[key] = (examples, size)
        return self._examples_cache[key]

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
        import tensorflow as tf

        process = _resolve_process(process_index, process_count)
        local = _local_batch_size(batch_size, process[1])
        seed = _check_int("seed", seed, 0)
        start_step = _check_int("start_step", start_step, 0)
        for task in self.tasks:
            task.tfds_split(split)
        choices = rates_lib.TaskChoices(self.rates, rates_lib.stream_key(seed, split), batch_size)
        if self.order == "global":
            return self._global_dataset(split, choices, batch_size, seed, start_step, process)
        slots = np.arange(process[0] * local, (process[0] + 1) * local)  # global slot ids [K]
        consumed = choices.counts_before(start_step, slots)  # [T]
        active = np.flatnonzero(self.rates > 0)
        stream_of_task = np.full(len(self.tasks), -1, np.int64)
        stream_of_task[active] = np.arange(len(active))
        streams = [
            self._task_stream(int(t), split, process, seed, int(consumed[t])) for t in active
        ]

        def step_choices(step: np.int64) -> np.ndarray:
            return stream_of_task[choices.tasks(np.array([step]), slots)[0]]  # [K]

        choice_stream = (
            tf.data.Dataset.range(start_step, _FOREVER)
            .map(
                lambda step: tf.ensure_shape(
                    tf.numpy_function(step_choices, [step], tf.int64), [local]
                )
            )
            .unbatch()
        )
        mixed = tf.data.Dataset.choose_from_datasets(streams, choice_stream)
        return mixed.batch(local, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

    def _global_dataset(
        self,
        split: str,
        choices: rates_lib.TaskChoices,
        batch_size: int,
        seed: int,
        start_step: int,
        process: tuple[int, int],
    ) -> Any:
        """order="global": this process's rows of the process-independent batches."""
        import tensorflow as tf

        examples = {
            int(t): self._task_in_memory(int(t), split, seed) for t in np.flatnonzero(self.rates)
        }
        stream = global_order.Stream(
            examples,
            choices,
            batch_size=batch_size,
            start_step=start_step,
            process=process,
            num_tasks=len(self.tasks),
        )
        local = batch_size // process[1]
        length, width = self.token_shape
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
        return tf.data.Dataset.range(start_step, _FOREVER).map(rows).prefetch(tf.data.AUTOTUNE)

    def _task_in_memory(self, task_id: int, split: str, seed: int) -> global_order.TaskExamples:
        """Task `task_id`'s whole split in memory (order="global"; at most cache_bytes)."""
        key = (task_id, split)
        if key not in self._in_memory:
            size = self.tasks[task_id].num_examples(split)
            if size == 0:
                raise ValueError(f"Task {self.tasks[task_id].name!r} has no {split!r} examples.")
            self._check_fits(task_id, size)
            # Read once into numpy, not through `_examples`: its tf.data cache would hold
            # the split a second time.
            element = self._padded(task_id, split, (0, 1)).batch(size).get_single_element()
            self._in_memory[key] = {name: value.numpy() for name, value in element.items()}
        stream = rates_lib.stream_key(seed, split, "global", task_id)
        return global_order.TaskExamples(self._in_memory[key], stream)

    def _check_fits(self, task_id: int, size: int) -> None:
        """order="global": a task's split of `size` examples must fit in cache_bytes."""
        length, width = self.token_shape
        needed = size * length * width * 4
        if needed > self.cache_bytes:
            raise ValueError(
                f"order='global' holds each task's split in memory: task "
                f"{self.tasks[task_id].name!r} needs {needed} bytes > cache_bytes="
                f"{self.cache_bytes}; use order='process'."
            )

    def _task_stream(
        self, task_id: int, split: str, process: tuple[int, int], seed: int, consumed: int
    ) -> Any:
        """Task `task_id`'s endless example stream, after its first `consumed` examples."""
        import tensorflow as tf

        examples, size = self._examples(task_id, split, process)
        if size == 0:
            raise ValueError(
                f"Task {self.tasks[task_id].name!r} has no {split!r} examples on process "
                f"{process[0]} of {process[1]}."
            )
        first_epoch, offset = divmod(consumed, size)
        buffer = min(size, self.shuffle_buffer)
        key = rates_lib.stream_key(seed, split, *process, task_id) % 2**31

        def epoch(index):
            return examples.shuffle(
                buffer, seed=key * 1_000_003 + index, reshuffle_each_iteration=False
            )

        return tf.data.Dataset.range(first_epoch, _FOREVER).flat_map(epoch).skip(offset)

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
        count = _check_int("process_count", process_count, 1)
        local = _local_batch_size(batch_size, count)
        if (task_id, split) not in self._split_sizes:
            self._split_sizes[task_id, split] = self.tasks[task_id].num_examples(split)
        total = self._split_sizes[task_id, split]
        return math.ceil(math.ceil(total / count) / local)

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
        import tensorflow as tf

        self._check_task_id(task_id)
        process = _resolve_process(process_index, process_count)
        local = _local_batch_size(batch_size, process[1])
        self.tasks[task_id].tfds_split(split)
        num_batches = self.num_eval_batches(
            task_id, split, batch_size=batch_size, process_count=process[1]
        )
        key = (int(task_id), split, *process, num_batches, local)
        if key not in self._eval_cache:
            examples, size = self._examples(int(task_id), split, process)
            padding = num_batches * local - size
            if padding < 0:
                raise RuntimeError(f"Shard of {size} examples exceeds {num_batches}x{local} slots.")
            length, width = self.token_shape
            num_tokens = self.tasks[task_id].num_tokens(self.image_size, self.patch_size)
            filler = {
                "inputs": np.zeros((length, width), np.float32),
                "mask": np.arange(length) < num_tokens,
                "label": np.int32(0),
                "task_id": np.int32(task_id),
                "valid": False,
            }
            real = examples.map(lambda example: {**example, "valid": tf.constant(True)})
            padded = real.concatenate(tf.data.Dataset.from_tensors(filler).repeat(padding))
            self._eval_cache[key] = padded.batch(local)
        return self._eval_cache[key].as_numpy_iterator()

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
