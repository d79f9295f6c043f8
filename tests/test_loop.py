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
