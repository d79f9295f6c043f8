"""What a claim is: the numbers it measures per seed, the rows of its table, the
comparisons its paper's direction is judged on; and the Context its measurements read
(trained runs, extractions, the logistic-regression reference)."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable

import numpy as np

from multitask_moe.experiments import baselines
from multitask_moe.experiments.catalogue import RUNS
from multitask_moe.experiments.runs import Runner
from multitask_moe.experiments.stats import Check, Compare

# The runs whose tasks are extracted (claims 6 and 8).
EXTRACTED = {"task_moe": "mixture/task", "mod_squad": "mixture/mod_squad"}


class Context:
    """What a claim's measurement reads: trained runs (trained on first use) and the
    logistic-regression reference, which does not depend on the seed."""

    def __init__(self, runner: Runner):
        self.runner = runner
        self._logreg: dict[str, float] = {}

    def metrics(self, run: str, seed: int) -> dict[str, float]:
        return self.runner.train(RUNS[run], seed, RUNS)["metrics"]

    def workdir(self, run: str, seed: int) -> str:
        self.runner.train(RUNS[run], seed, RUNS)
        return self.runner.workdir(run, seed)

    def logreg(self, task: str) -> float:
        if task not in self._logreg:
            self._logreg[task] = baselines.logistic_regression_accuracy(task)
        return self._logreg[task]

    def extraction(self, variant: str, task: str, seed: int) -> dict:
        """extraction.json of `task` extracted (threshold 3) from the variant's run."""
        from multitask_moe import lifecycle

        out = os.path.join(
            self.runner.workdir(f"extracted/{variant}", seed), task.replace("/", "_")
        )
        summary_file = os.path.join(out, "extraction.json")
        if not os.path.exists(summary_file):
            source = self.workdir(EXTRACTED[variant], seed)
            lifecycle.extract(source, task, out, splits=("test",), overwrite=True)
        with open(summary_file) as f:
            return json.load(f)


@dataclasses.dataclass(frozen=True)
class Claim:
    """One claim: `measure(context, seed)` returns {key: float} (and "note/..." strings);
    `rows` are the (label, key) pairs of its table; `compares` the paper's statements,
    each judged by a test over seeds; `checks` the structural facts of the setting."""

    name: str
    number: int
    title: str
    paper: str
    setting: str
    measure: Callable[[Context, int], dict]
    rows: tuple[tuple[str, str], ...]
    compares: tuple[Compare, ...]
    checks: tuple[Check, ...] = ()
    per_task: tuple[str, ...] = ()  # arms whose "<arm>/<task>" keys make a per-task table


def task_accuracy(metrics: dict, task: str) -> float:
    return metrics[f"test/{task}/accuracy"]


def mean_accuracy(metrics: dict, tasks) -> float:
    return float(np.mean([task_accuracy(metrics, t) for t in tasks]))
