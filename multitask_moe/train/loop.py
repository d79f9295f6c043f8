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
from tqdm import tqdm

from multitask_moe.core.checkpoint import Checkpoints
from multitask_moe.train.metrics import MetricWriter, TrainMeter

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """A step produced a NaN/inf loss or gradient norm (and updates are not skipped)."""


class PreemptionWatcher(contextlib.AbstractContextManager):
    """Tells the loop when to save and stop because the job is being preempted.

    Cloud TPU / SLURM preemption sends SIGTERM and waits a grace period before SIGKILL.
    One process: a SIGTERM handler sets a flag the loop polls after each step. Several
    processes: every process must stop after the same step (a checkpoint is a collective
    write), so the loop asks JAX's preemption sync point
    (multihost_utils.reached_preemption_sync_point): the distributed runtime catches
    SIGTERM on any process, agrees in the background on the first step all processes can
    still reach, and answers True there on every process. No collective runs per step,
    so asynchronous dispatch never stalls on the check.
    """

    def __init__(self):
        self._flag = threading.Event()
        self._previous = None
        self._synced = jax.process_count() > 1

    def __enter__(self):
        if self._synced:
            return self  # the distributed runtime owns SIGTERM; a Python handler would hide it
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        else:
            logger.warning("not in the main thread: SIGTERM will not trigger a checkpoint")
        return self

    def _handle(self, signum, frame):
        del signum, frame
        self._flag.set()

    def requested(self, step: int) -> bool:
        """Whether to save and stop after `step` (call after every step, in order)."""
        if not self._synced:
            return self._flag.is_set()
        from jax.experimental import multihost_utils

        return multihost_utils.reached_preemption_sync_point(step)

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False


class Batches(Iterator):
    """The train batches with their position: how many the data has served since step 0.

    A checkpoint records this count, not the step, so the resume check compares two
    independent facts: a loop that drew a batch outside a step (or skipped one) leaves a
    position that differs from the step, and that checkpoint is refused.
    """

    def __init__(self, batches: Iterator[dict[str, jax.Array]], position: int):
        self._batches = batches
        self.position = position

    def __next__(self) -> dict[str, jax.Array]:
        batch = next(self._batches)
        self.position += 1
        return batch


class PendingMetrics:
    """Per-step metrics still on device, fetched in bulk at a sync point.

    The loop never waits on a step it has just dispatched. `sync` feeds the fetched metrics
    to the meter and stops at the first non-finite step unless such updates are skipped;
    it runs before any checkpoint, so a NaN never reaches disk.
    """

    def __init__(self, meter: TrainMeter, checkpoints: Checkpoints, *, skip_nonfinite: bool):
        self.meter, self.checkpoints, self.skip_nonfinite = meter, checkpoints, skip_nonfinite
        self._pending: list[tuple[int, dict]] = []

    def add(self, step: int, metrics: dict) -> None:
        self._pending.append((step, metrics))

    def sync(self) -> None:
        pending, self._pending = self._pending, []
        fetched = jax.device_get([metrics for _, metrics in pending])
        for (step, _), metrics in zip(pending, fetched, strict=True):
            if bool(metrics["nonfinite"]) and not self.skip_nonfinite:
                raise NonFiniteLossError(
                    f"non-finite loss {float(metrics['loss'])} (gradient norm "
                    f"{float(metrics['grad_norm'])}) at step {step}; {self._last_good()}. "
                    "Lower optimizer.learning_rate, or set skip_nonfinite_updates=True to skip "
                    "such updates"
                )
            self.meter.add(metrics)

    def _last_good(self) -> str:
        last = self.checkpoints.latest_step()
        if last is None:
            return "no checkpoint was written before it"
        return f"the last good checkpoint is step {last} in {self.checkpoints.directory}"


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


class Throughput:
    """Steps per second since the last reading, not counting time spent evaluating."""

    def __init__(self, step: int):
        self.step, self.start = step, time.perf_counter()

    def read(self, step: int) -> float:
        now = time.perf_counter()
        rate = (step - self.step) / max(now - self.start, 1e-9)
        self.step, self.start = step, now
        return rate

    def exclude(self, seconds: float) -> None:
        self.start += seconds


class StepTimes:
    """Where the loop's wall time goes: waiting for the next batch (the input pipeline),
    evaluation, checkpoints, and the rest: the steps themselves (dispatch, and the waits
    for their results at each sync). `clock` is injectable for tests."""

    KINDS = ("input", "evaluation", "checkpoint")

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.start = clock()
        self.seconds = dict.fromkeys(self.KINDS, 0.0)

    @contextlib.contextmanager
    def measure(self, kind: str | None):
        start = self.clock()
        try:
            yield
        finally:
            if kind is not None:
                self.seconds[kind] += self.clock() - start

    def total(self) -> float:
        return self.clock() - self.start

    def shares(self) -> dict[str, float]:
        """`time/<kind>_share` of the wall time so far; the four sum to 1."""
        total = max(self.total(), 1e-9)
        step = max(total - sum(self.seconds.values()), 0.0)
        shares = {"time/step_share": step / total}
        shares.update({f"time/{kind}_share": s / total for kind, s in self.seconds.items()})
        return shares

    def summary(self) -> str:
        shares = self.shares()
        return (
            f"Loop time {self.total():.1f} s: {shares['time/step_share']:.0%} in the steps, "
            f"{shares['time/input_share']:.0%} waiting for input, "
            f"{shares['time/evaluation_share']:.0%} evaluating, "
            f"{shares['time/checkpoint_share']:.0%} checkpointing."
        )


class Log:
    """Every `every` steps, at the end and when stopping: train scalars, throughput and
    the shares of wall time so far (StepTimes)."""

    kind = None

    def __init__(
        self,
        every: int,
        meter: TrainMeter,
        writer: MetricWriter,
        throughput: Throughput,
        *,
        batch_size: int,
        bar: tqdm,
        times: StepTimes | None = None,
    ):
        self.every, self.meter, self.writer, self.throughput = every, meter, writer, throughput
        self.batch_size, self.bar, self.times = batch_size, bar, times

    def due(self, step: int, *, last: bool, stop: bool) -> bool:
        return _due(step, self.every) or last or stop

    def __call__(self, step: int, state: dict) -> None:
        del state
        steps_per_sec = self.throughput.read(step)
        scalars = self.meter.summary()
        self.meter.reset()
        scalars.update(
            steps_per_sec=steps_per_sec, examples_per_sec=steps_per_sec * self.batch_size
        )
        if self.times is not None:
            scalars.update(self.times.shares())
        self.writer.write(step, scalars)
        self.bar.set_postfix(
            loss=f"{scalars['train/loss']:.4f}",
            ex_per_s=f"{scalars['examples_per_sec']:.0f}",
            refresh=False,
        )


class Evaluate:
    """Every `every` steps except the last (the run evaluates the final state itself)."""

    kind = "evaluation"

    def __init__(
        self,
        every: int,
        evaluate: Callable[[dict], dict[str, float]],
        writer: MetricWriter,
        throughput: Throughput,
    ):
        self.every, self.evaluate, self.writer, self.throughput = (
            every,
            evaluate,
            writer,
            throughput,
        )

    def due(self, step: int, *, last: bool, stop: bool) -> bool:
        del stop
        return _due(step, self.every) and not last

    def __call__(self, step: int, state: dict) -> None:
        start = time.perf_counter()
        self.writer.write(step, self.evaluate(state))
        self.throughput.exclude(time.perf_counter() - start)


class Checkpoint:
    """Every `every` steps, at the end and when stopping: the state and `progress(step)`."""

    kind = "checkpoint"

    def __init__(self, every: int, checkpoints: Checkpoints, progress: Callable[[int], dict]):
        self.every, self.checkpoints, self.progress = every, checkpoints, progress

    def due(self, step: int, *, last: bool, stop: bool) -> bool:
        return _due(step, self.every) or last or stop

    def __call__(self, step: int, state: dict) -> None:
        self.checkpoints.save(step, state, self.progress(step))


class Profile:
    """A jax.profiler trace of `steps` steps into `directory`, starting after `warmup`
    steps of this run (so compiles and first-step transfers stay out of it); cut short at
    the run's last step. `traced` is the number of steps traced."""

    kind = None

    def __init__(self, first_step: int, steps: int, directory: str, warmup: int = 3):
        self.warmup = warmup
        self.begin = first_step - 1 + warmup  # the trace starts after this step
        self.end = self.begin + steps
        self.directory = directory
        self.tracing, self.traced = False, 0

    def due(self, step: int, *, last: bool, stop: bool) -> bool:
        if self.tracing:
            return step == self.end or last or stop
        return step == self.begin and not (last or stop) and not self.traced

    def __call__(self, step: int, state: dict) -> None:
        jax.block_until_ready(state)  # the trace holds exactly its steps' work
        if self.tracing:
            jax.profiler.stop_trace()
            self.tracing, self.traced = False, step - self.begin
        else:
            jax.profiler.start_trace(self.directory)
            self.tracing = True

    def close(self) -> None:
        """Stops a trace an exception left running."""
        if self.tracing:
            jax.profiler.stop_trace()
            self.tracing = False


@dataclasses.dataclass
class LoopResult:
    state: dict
    step: int
    preempted: bool


def train_loop(
    state: dict,
    steps: range,
    batches: Iterator[dict[str, jax.Array]],
    train_step: Callable[[dict, dict], tuple[dict, dict]],
    pending: PendingMetrics,
    actions: list[Log | Evaluate | Checkpoint | Profile],
    bar: tqdm,
    times: StepTimes | None = None,
) -> LoopResult:
    """Runs `steps` (start + 1 .. num_steps) until done or SIGTERM; after a step where any
    action is due, syncs the pending metrics and runs the due actions in order. `times`
    accumulates the input, evaluation and checkpoint time."""
    times = times if times is not None else StepTimes()
    step = steps.start - 1
    try:
        with PreemptionWatcher() as watcher, bar:
            for step in steps:
                with times.measure("input"):
                    batch = next(batches)  # placed on the devices here, outside the guard
                # Catches accidental host<->device copies inside the step (big_vision's habit).
                with jax.transfer_guard("disallow"):
                    state, metrics = train_step(state, batch)
                pending.add(step, metrics)
                bar.update(1)
                stop = watcher.requested(step)
                last = step == steps.stop - 1
                due = [a for a in actions if a.due(step, last=last, stop=stop)]
                if due:
                    pending.sync()
                for action in due:
                    with times.measure(action.kind):
                        action(step, state)
                if stop:
                    return LoopResult(state=state, step=step, preempted=step < steps.stop - 1)
        return LoopResult(state=state, step=step, preempted=False)
    finally:
        for action in actions:
            if isinstance(action, Profile):
                action.close()
