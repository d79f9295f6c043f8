"""Task data: a TFDS task registry, embedded offline datasets, and task mixtures.

    from multitask_moe import data
    task = data.get_task("digits/parity")          # or "cifar10", "mnist", ... (TFDS)
    mix = data.Mixture({"digits/class": 1.0, "wine": 0.5}, rate="explicit",
                       image_size=16, patch_size=4)
    for batch in mix.iterator("train", batch_size=64, seed=0, start_step=0):
        batch["inputs"], batch["mask"], batch["label"], batch["task_id"]
    for task_id, batch in mix.eval_batches("validation", batch_size=64):
        batch["valid"]

Batch layout (one for all tasks). Shapes: K examples in this process's batch (the global
batch_size / process_count), L tokens, P features per token.
  inputs  float32 [K, L, P]  every example is a sequence of tokens, zero-padded to L x P
  mask    bool    [K, L]     True for the example's real tokens
  label   int32   [K]        class index
  task_id int32   [K]        position of the task in `Mixture.tasks`
  valid   bool    [K]        eval batches only: False for padding examples
- Image tasks: the image is resized to image_size x image_size (bilinear, antialiased),
  scaled to [-1, 1] and cut into non-overlapping patch_size x patch_size patches in
  row-major order; each patch, flattened in (row, column, channel) order, is one token of
  patch_size^2 * channels features. A model's image stem is a Dense over P (a patch
  embedding; the zero padding of narrower tokens contributes nothing).
- Tabular tasks: one token per feature, standardized with the train split's mean and std;
  the value sits in feature 0 of its token, the rest is 0. A model's tabular stem embeds
  per position (per feature).
- L = max over the mixture's tasks of their token counts, P = max of their token widths;
  Mixture.token_shape == (L, P). The stem is chosen per task by `Task.modality`.

Determinism and resumption (deterministic skip, no replay, no iterator state): the task
of every slot of every step is a stateless hash of (seed, split, step, slot), and each
task's examples come in seeded epochs; `start_step=N` recomputes from the hashes how many
examples each task gave up before step N and positions every task stream there, so it
yields exactly the batches an uninterrupted iterator yields from step N on
(see mixture.py, and process_order.py / global_order.py for the two example orders).

Multi-host: `iterator` and `eval_batches` take process_index / process_count (default
jax.process_index() / jax.process_count()); batch_size is the global batch size, each
process reads only its shard (tfds.even_splits) and yields its slice.

Tasks with weight 0 keep their task id (and are evaluated) but are never sampled.
"""

from multitask_moe.data.mixture import Mixture
from multitask_moe.data.rates import RATE_KINDS, mixing_rates
from multitask_moe.data.registry import get_task
from multitask_moe.data.tasks import (
    DATA_DIR_ENV,
    EMBEDDED_TASKS,
    MODALITIES,
    SPLITS,
    DatasetNotPreparedError,
    Task,
    default_data_dir,
)

__all__ = [
    "DATA_DIR_ENV",
    "EMBEDDED_TASKS",
    "MODALITIES",
    "RATE_KINDS",
    "SPLITS",
    "DatasetNotPreparedError",
    "Mixture",
    "Task",
    "default_data_dir",
    "get_task",
    "mixing_rates",
]
