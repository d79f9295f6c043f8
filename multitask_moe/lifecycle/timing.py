"""The forward of a restored model, compiled once and timed call by call: what the
extraction benchmark and the experiments measure throughput and peak memory with."""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping

import jax
from flax import nnx

from multitask_moe import parallel
from multitask_moe.core import evaluate as evaluate_lib
from multitask_moe.core.step import EVAL_KEYS


def forward_fn(restored):
    """A jitted forward (state, batch) -> logits of a restored model."""
    graphdef = restored.experiment.model.spec.graphdef

    @jax.jit
    def forward(state, batch):
        model = nnx.merge(graphdef, state["params"], state["model_state"])
        logits, _ = model(batch["inputs"], batch["mask"], batch["task_id"], deterministic=True)
        return logits

    return forward


def peak_bytes(compiled) -> int:
    analysis = compiled.memory_analysis()
    return int(
        analysis.argument_size_in_bytes
        + analysis.temp_size_in_bytes
        + analysis.output_size_in_bytes
        - analysis.alias_size_in_bytes
    )


def task_batch(restored, task_id: int, batch_size: int) -> dict:
    """The first `batch_size` test examples of one task (padded rows included), on the mesh."""
    experiment = restored.experiment
    _, batch = next(
        experiment.mixture.eval_batches("test", batch_size=batch_size, task_ids=[task_id])
    )
    return evaluate_lib.global_batch(batch, EVAL_KEYS, parallel.batch_sharding(experiment.mesh))


class Timed:
    """One model's compiled forward on one batch, timed call by call."""

    def __init__(self, restored, task_id: int, batch_size: int):
        self.mesh = restored.experiment.mesh
        self.state = {k: restored.state[k] for k in ("params", "model_state")}
        with jax.set_mesh(self.mesh):
            self.batch = task_batch(restored, task_id, batch_size)
            start = time.perf_counter()
            self.compiled = forward_fn(restored).lower(self.state, self.batch).compile()
            self.compile_seconds = time.perf_counter() - start
        self.peak_bytes = peak_bytes(self.compiled)
        self.times: list[float] = []

    def run(self, calls: int) -> None:
        with jax.set_mesh(self.mesh):
            jax.block_until_ready(self.compiled(self.state, self.batch))  # warm
            start = time.perf_counter()
            for _ in range(calls):
                out = self.compiled(self.state, self.batch)
            jax.block_until_ready(out)
        self.times.append((time.perf_counter() - start) / calls)


def run_interleaved(models: Mapping[str, Timed], rounds: int, calls: int) -> None:
    """`rounds` timed runs of every model, one model after another in each round, so
    load on the machine hits them alike."""
    for _ in range(rounds):
        for timed in models.values():
            timed.run(calls)


def speedup(slow: Timed, fast: Timed) -> float:
    """The median over rounds of slow's time / fast's time (paired round by round)."""
    return statistics.median(s / f for s, f in zip(slow.times, fast.times, strict=True))
