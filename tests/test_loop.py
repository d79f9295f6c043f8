"""The step loop with stand-ins for the step, the meter and the checkpoints (no JAX
compile): which periodic action runs after which step, the data position each checkpoint
records, and the stop at a non-finite step."""

from __future__ import annotations

import pytest

from multitask_moe.train import loop


class Recorder:
    """Stands in for the meter, the writer, the checkpoints and the progress bar."""

    directory = "/ckpt"

    def __init__(self):
        self.events, self.saved = [], {}

    # meter
    def add(self, metrics):
        self.events.append(("meter", metrics["step"]))

    def summary(self):
        return {"train/loss": 1.0}

    def reset(self):
        pass

    # writer
    def write(self, step, scalars):
        self.events.append(("eval" if "eval/x" in scalars else "log", step))

    # checkpoints
    def save(self, step, state, progress):
        self.events.append(("save", step))
        self.saved[step] = progress

    def latest_step(self):
        return max(self.saved, default=None)

    # progress bar
    def update(self, n):
        pass

    def set_postfix(self, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def step_fn(state, batch):
    return state + 1, {"step": state + 1, "nonfinite": batch == "nan", "loss": 0.0, "grad_norm": 0}


def make_loop(recorder, start, stop, *, extra_draw=False, data=None):
    data = data if data is not None else iter(range(1000))
    batches = loop.Batches(data, position=start)
    if extra_draw:
        next(batches)  # a batch drawn outside any step
    throughput = loop.Throughput(start)
    actions = [
        loop.Log(3, recorder, recorder, throughput, batch_size=4, bar=recorder),
        loop.Evaluate(4, lambda state: {"eval/x": state}, recorder, throughput),
        loop.Checkpoint(5, recorder, lambda step: {"step": step, "data_step": batches.position}),
    ]
    pending = loop.PendingMetrics(recorder, recorder, skip_nonfinite=False)
    return lambda: loop.train_loop(
        start, range(start + 1, stop + 1), batches, step_fn, pending, actions, recorder
    )


def test_actions_run_after_their_steps_in_order_after_a_sync():
    recorder = Recorder()
    result = make_loop(recorder, 0, 8)()
    assert (result.step, result.state, result.preempted) == (8, 8, False)
    actions = [event for event in recorder.events if event[0] != "meter"]
    assert actions == [
        ("log", 3),
        ("eval", 4),
        ("save", 5),
        ("log", 6),
        ("log", 8),
        ("save", 8),
    ]  # no eval at the last step: the run evaluates the final state itself
    # Metrics are fetched only at sync points, every step before an action included.
    metered = [step for kind, step in recorder.events if kind == "meter"]
    assert metered == list(range(1, 9))
    assert recorder.events.index(("meter", 3)) < recorder.events.index(("log", 3))


def test_checkpoints_record_the_batches_served():
    recorder = Recorder()
    make_loop(recorder, 2, 10)()
    assert {s: p["data_step"] for s, p in recorder.saved.items()} == {5: 5, 10: 10}
    # A batch drawn outside a step shows in the position, where the resume check sees it.
    recorder = Recorder()
    make_loop(recorder, 0, 5, extra_draw=True)()
    assert recorder.saved[5]["data_step"] == 6


def test_a_nonfinite_step_stops_before_its_checkpoint():
    recorder = Recorder()
    data = iter(["ok"] * 5 + ["nan"] + ["ok"] * 10)
    with pytest.raises(
        loop.NonFiniteLossError, match=r"at step 6; the last good checkpoint is step 5"
    ):
        make_loop(recorder, 0, 12, data=data)()
    assert sorted(recorder.saved) == [5]


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_step_times_split_the_wall_time_by_kind():
    clock = FakeClock()
    times = loop.StepTimes(clock)
    with times.measure("input"):
        clock.now += 1.0
    clock.now += 5.0  # steps
    with times.measure("evaluation"):
        clock.now += 3.0
    with times.measure("checkpoint"):
        clock.now += 1.0
    with times.measure(None):  # a log: counts as step time
        clock.now += 0.0
    assert times.shares() == pytest.approx(
        {
            "time/step_share": 0.5,
            "time/input_share": 0.1,
            "time/evaluation_share": 0.3,
            "time/checkpoint_share": 0.1,
        }
    )
    assert times.summary() == (
        "Loop time 10.0 s: 50% in the steps, 10% waiting for input, 30% evaluating, "
        "10% checkpointing."
    )


def test_the_loop_times_input_evaluation_and_checkpoints():
    recorder = Recorder()
    clock = FakeClock()

    def slow_batches():
        while True:
            clock.now += 2.0  # the input pipeline
            yield 0

    times = loop.StepTimes(clock)
    throughput = loop.Throughput(0)

    def evaluate(state):
        clock.now += 7.0
        return {"eval/x": state}

    actions = [
        loop.Log(4, recorder, recorder, throughput, batch_size=4, bar=recorder, times=times),
        loop.Evaluate(2, evaluate, recorder, throughput),
    ]
    pending = loop.PendingMetrics(recorder, recorder, skip_nonfinite=False)
    loop.train_loop(0, range(1, 5), loop.Batches(slow_batches(), 0), step_fn, pending,
                    actions, recorder, times)  # fmt: skip
    # 4 batches x 2 s of input, one evaluation (step 2; not at the last step) of 7 s.
    assert times.seconds == {"input": 8.0, "evaluation": 7.0, "checkpoint": 0.0}


def test_profile_traces_its_steps_after_the_warmup(tmp_path):
    import jax
    import jax.numpy as jnp

    recorder = Recorder()
    profile = loop.Profile(1, 2, str(tmp_path), warmup=3)
    due = [s for s in range(1, 10) if profile.due(s, last=s == 9, stop=False)]
    assert due == [3]  # starts after the 3rd step
    step = jax.jit(lambda state, batch: (state + 1, {"step": state + 1, "nonfinite": False,
                                                     "loss": 0.0, "grad_norm": 0}))  # fmt: skip
    pending = loop.PendingMetrics(recorder, recorder, skip_nonfinite=False)
    loop.train_loop(jnp.int32(0), range(1, 9), loop.Batches(iter(range(100)), 0),
                    step, pending, [profile], recorder)  # fmt: skip
    assert profile.traced == 2 and not profile.tracing
    assert list(tmp_path.glob("plugins/profile/*/*.xplane.pb"))
    # A run shorter than the warm-up writes no trace.
    short = loop.Profile(1, 2, str(tmp_path / "short"), warmup=3)
    assert not [s for s in range(1, 4) if short.due(s, last=s == 3, stop=False)]
