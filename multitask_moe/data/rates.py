"""Mixing rates and the stateless task-choice sequence of a mixture (numpy only).

Shapes: T tasks, S steps, B global batch size, K slots (examples) of one process's slice.

Rates (`mixing_rates`), as in seqio / T5 (`mixing_rate_num_examples`):
  explicit:      r_t ∝ w_t
  proportional:  r_t ∝ min(w_t * n_t, cap)                  (cap optional)
  temperature:   r_t ∝ min(w_t * n_t, cap) ** (1 / temperature)
with w_t the weight given for task t (a scale; 0 skips the task) and n_t its number of
training examples.

Task choices (`TaskChoices`): the task of slot b of the global batch at step s is a pure
function of (seed, stream, s, b): u = splitmix64 hash of the slot's counter, mapped through
the cumulative rates. Nothing depends on earlier steps, so a restarted iterator needs no
replay to know the choices of any step, and counting how many examples each task gave up
to step N (to place each task's stream) is a vectorized pass over N * K hashes.
Hashing the *global* slot index makes the task composition of the global batch
independent of the number of processes.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import numpy as np

RATE_KINDS = ("explicit", "proportional", "temperature")
# The end (exclusive) of the endless step range of a training stream,
# tf.data.Dataset.range(start_step, FOREVER): no run gets there.
FOREVER = 2**62

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _check_weights(weights: Sequence[float]) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0:
        raise ValueError(f"weights must be a non-empty list of numbers, got {weights!r}.")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"weights must be finite and >= 0, got {w.tolist()}.")
    if not np.any(w > 0):
        raise ValueError(f"At least one weight must be > 0, got {w.tolist()}.")
    return w


def mixing_rates(
    weights: Sequence[float],
    rate: str = "explicit",
    *,
    num_examples: Sequence[int] | None = None,
    cap: float | None = None,
    temperature: float | None = None,
) -> np.ndarray:
    """Normalized sampling rates [T] (they sum to 1; a task of weight 0 gets exactly 0).

    Args:
      weights: [T] non-negative numbers, not all 0.
      rate: "explicit" | "proportional" | "temperature" (formulas in the module doc).
      num_examples: [T] training examples per task; required unless rate is "explicit".
      cap: seqio's `maximum`: cap on the (scaled) example counts; proportional/temperature.
      temperature: > 0; required by (and only allowed with) rate="temperature".
    """
    w = _check_weights(weights)
    if rate not in RATE_KINDS:
        raise ValueError(f"rate={rate!r} is not one of {RATE_KINDS}.")
    if rate == "explicit":
        if cap is not None or temperature is not None:
            raise ValueError(
                f"rate='explicit' takes no cap or temperature (got cap={cap!r}, "
                f"temperature={temperature!r}); they apply to 'proportional'/'temperature'."
            )
        return w / w.sum()
    if rate == "proportional" and temperature is not None:
        raise ValueError(
            f"temperature={temperature!r} needs rate='temperature', not 'proportional'."
        )
    if rate == "temperature" and (
        temperature is None or not math.isfinite(temperature) or temperature <= 0
    ):
        raise ValueError(f"rate='temperature' needs a finite temperature > 0, got {temperature!r}.")
    if cap is not None and (not math.isfinite(cap) or cap <= 0):
        raise ValueError(f"cap must be a finite number > 0 or None, got {cap!r}.")
    if num_examples is None or len(num_examples) != len(w):
        raise ValueError(
            f"rate={rate!r} needs num_examples for each of the {len(w)} tasks, "
            f"got {num_examples!r}."
        )
    n = np.asarray(num_examples, dtype=np.float64)
    if np.any(n[w > 0] <= 0):
        raise ValueError(f"Tasks with weight > 0 need num_examples > 0, got {n.tolist()}.")
    scaled = w * n
    if cap is not None:
        scaled = np.minimum(scaled, cap)
    if rate == "temperature":
        scaled = scaled ** (1.0 / temperature)
    return scaled / scaled.sum()


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer, elementwise on uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):  # wrapping is the point (numpy warns on 0-d arrays)
        z = np.asarray(x, dtype=np.uint64) + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        return z ^ (z >> np.uint64(31))


def stream_key(*parts: int | str) -> int:
    """A 64-bit key from ints and strings (strings through crc32), for seeding streams."""
    key = np.zeros((), np.uint64)
    for part in parts:
        value = zlib.crc32(part.encode()) if isinstance(part, str) else int(part)
        if value < 0:
            raise ValueError(f"Seed parts must be >= 0, got {value}.")
        key = splitmix64(key ^ np.uint64(value % 2**64))
    return int(key)


class TaskChoices:
    """Stateless task choices of the slots of a global batch.

    Args:
      rates: [T] normalized mixing rates; tasks with rate 0 are never chosen.
      key: stream key (see `stream_key`), e.g. from (seed, split).
      global_batch_size: B; slot b of step s has counter s * B + b.
    """

    def __init__(self, rates: Sequence[float], key: int, global_batch_size: int):
        rates = np.asarray(rates, dtype=np.float64)
        cumulative = np.cumsum(rates)
        # Exactly 1 from the last task of rate > 0 on: u < 1 then never lands past it, even
        # when rounding left the cumulative sum a hair below 1.
        cumulative[np.flatnonzero(rates > 0)[-1] :] = 1.0
        self._cumulative = cumulative
        self._num_tasks = len(rates)
        self._key = np.uint64(key)
        self._batch = global_batch_size

    def tasks(self, steps: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """Task ids int64 [S, K] of `slots` [K] (global slot indices) at `steps` [S]."""
        steps = np.asarray(steps, dtype=np.uint64)[:, None]  # [S, 1]
        counters = steps * np.uint64(self._batch) + np.asarray(slots, dtype=np.uint64)  # [S, K]
        bits = splitmix64(counters ^ self._key)
        u = (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53  # [S, K] in [0, 1)
        return np.searchsorted(self._cumulative, u, side="right").astype(np.int64)

    def counts_before(self, step: int, slots: np.ndarray, chunk: int = 1 << 20) -> np.ndarray:
        """int64 [T]: how often each task was chosen for `slots` in steps [0, step)."""
        counts = np.zeros(self._num_tasks, np.int64)
        steps_per_chunk = max(1, chunk // max(1, len(slots)))
        for start in range(0, step, steps_per_chunk):
            steps = np.arange(start, min(step, start + steps_per_chunk))
            counts += np.bincount(self.tasks(steps, slots).ravel(), minlength=self._num_tasks)
        return counts
