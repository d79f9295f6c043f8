"""The step loop and its periodic actions: logging, evaluation, checkpoints, preemption.

The loop never waits on a step it has just dispatched: per-step metrics stay on device
and are fetched in bulk at the next sync point (a log, eval or checkpoint step), where the
non-finite check runs too. A checkpoint is only written after every step up to it has
been checked, so a NaN never reaches disk: the last checkpoint is always a good one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator

import jax
import numpy as np
from tqdm import tqdm

from multitask_moe.train.checkpoint import Checkpoints
from multitask_moe.train.metrics import MetricWriter, TrainMeter

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """A step produced a NaN/inf loss or gradient norm (and updates are not skipped)."""


class PreemptionWatcher(contextlib.AbstractContextManager):
    """Turns SIGTERM into a flag the loop polls, so it can save and exit cleanly.

    Cloud TPU / SLURM preemption sends SIGTERM and waits a grace period before SIGKILL.
    With several processes the flag is combined over all of them, so that every process
    stops after the same step (a checkpoint is a collective write).
    """

    def __init__(self):
        self._flag = threading.Event()
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        else:
            logger.warning("not in the main thread: SIGTERM will not trigger a checkpoint")
        return self

    def _handle(self, signum, frame):
        del signum, frame
        self._flag.set()

    def requested(self) -> bool:
        local = self._flag.is_set()
        if jax.process_count() == 1:
            return local
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.array(local))))

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False


@dataclasses.dataclass
class LoopResult:
    state: dict
    step: int
    preempted: bool


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def train_loop(
    *,
    state: dict,
    start_step: int,
    num_steps: int,
    batches: Iterator[dict[str, jax.Array]],
    train_step: Callable[[dict, dict], tuple[dict, dict]],
    evaluate: Callable[[dict], dict[str, float]],
    checkpoints: Checkpoints,
    writer: MetricWriter,
    meter: TrainMeter,
    progress: Callable[[int], dict],
    config,
    show_progress: bool,
) -> LoopResult:
    """Runs steps start_step+1 .. num_steps (or until SIGTERM) with the periodic actions.

    `batches` yields global batches; `evaluate(state)` returns eval scalars; `progress(step)`
    gives the JSON saved with a checkpoint.
    """
    pending: list[tuple[int, dict]] = []  # dispatched steps whose metrics are not fetched
    last_saved = checkpoints.latest_step()
    log_time, log_step = time.perf_counter(), start_step

    def sync() -> None:
        """Fetches pending metrics; stops at the first non-finite step (unless skipping)."""
        nonlocal pending
        if not pending:
            return
        fetched = jax.device_get([metrics for _, metrics in pending])
        for (step, _), metrics in zip(pending, fetched, strict=True):
            if bool(metrics["nonfinite"]) and not config.skip_nonfinite_updates:
                pending = []
                saved = (
                    f"the last good checkpoint is step {last_saved} in {checkpoints.directory}"
                    if last_saved is not None
                    else "no checkpoint was written before it"
                )
                raise NonFiniteLossError(
                    f"non-finite loss {float(metrics['loss'])} (gradient norm "
                    f"{float(metrics['grad_norm'])}) at step {step}; {saved}. Lower "
                    "optimizer.learning_rate, or set skip_nonfinite_updates=True to skip such "
                    "updates"
                )
            meter.add(metrics)
        pending = []

    watcher = PreemptionWatcher()
    bar = tqdm(
        total=num_steps,
        initial=start_step,
        desc="train",
        unit="step",
        disable=not show_progress,
        mininterval=1.0,
        dynamic_ncols=True,
    )
    step = start_step
    with watcher, bar:
        while step < num_steps:
            batch = next(batches)
            # Catches accidental host<->device copies inside the step (big_vision's habit).
            with jax.transfer_guard("disallow"):
                state, metrics = train_step(state, batch)
            step += 1
            pending.append((step, metrics))
            bar.update(1)
            stop = watcher.requested()
            last = step == num_steps
            log_now = _due(step, config.log_every_steps) or last or stop
            eval_now = _due(step, config.eval_every_steps) and not last
            save_now = _due(step, config.checkpoint_every_steps) or last or stop
            if not (log_now or eval_now or save_now):
                continue
            sync()
            if log_now:
                now = time.perf_counter()
                steps_per_sec = (step - log_step) / max(now - log_time, 1e-9)
                scalars = meter.summary()
                meter.reset()
                scalars.update(
                    steps_per_sec=steps_per_sec, examples_per_sec=steps_per_sec * config.batch_size
                )
                writer.write(step, scalars)
                bar.set_postfix(
                    loss=f"{scalars['train/loss']:.4f}",
                    ex_per_s=f"{scalars['examples_per_sec']:.0f}",
                    refresh=False,
                )
                log_time, log_step = now, step
            if eval_now:
                writer.write(step, evaluate(state))
                log_time = time.perf_counter()  # eval time is not training throughput
            if save_now:
                checkpoints.save(step, state, progress(step))
                last_saved = step
            if stop:
                if jax.process_index() == 0:
                    bar.clear()
                    print(
                        f"\nSIGTERM: saved a checkpoint at step {step} in "
                        f"{checkpoints.directory}; run the same command again to resume.",
                        flush=True,
                    )
                break
    return LoopResult(state=state, step=step, preempted=step < num_steps)
