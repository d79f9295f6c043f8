"""Claim 7, muNet: no forgetting, parameters added along the task sequence, quality
against per-task fine-tuning of the root, and the size trade-off of s."""

from __future__ import annotations

import numpy as np

from multitask_moe.experiments.claim import Claim, Context
from multitask_moe.experiments.scale import EVOLVE_TASKS
from multitask_moe.experiments.stats import Check, Compare

SIZE_SCALES = (1.0, 0.9, 0.5)


# 7. muNet: no forgetting, bounded growth, quality against fine-tuning, s trade-off.
def _evolution_figures(summary: dict) -> dict:
    records = [summary["per_task"][task] for task in summary["finished"]]
    added = [
        sum(c["size"] for c in r["components"].values() if c["kind"] != "reused") for r in records
    ]
    return {
        **{f"params_added/{i}": float(a) for i, a in enumerate(added, start=1)},
        "accuracy": float(np.mean([r["test_accuracy_when_added"] for r in records])),
        "forgetting": float(
            max(abs(r["test_accuracy_now"] - r["test_accuracy_when_added"]) for r in records)
        ),
        # The system: the root (locked from the start, reused by the first task) and what
        # every task added; the fine-tuned copies each hold a whole root.
        "params_total": float(summary["root_params"] + sum(added)),
        "params_added_first": float(added[0]),
        "params_added_later": float(np.mean(added[1:])) if len(added) > 1 else 0.0,
        "root_params": float(summary["root_params"]),
    }


def measure_evolution(ctx: Context, seed: int) -> dict:
    out = {"zero": 0.0}
    for s in SIZE_SCALES:
        summary = ctx.runner.evolve(f"evolve/s{s}", seed, s, baseline=s == 1.0)
        for key, value in _evolution_figures(summary).items():
            out[f"s{s}/{key}"] = value
        if s == 1.0:
            baseline = [summary["baseline"][t] for t in summary["finished"]]
            out["finetune/accuracy"] = float(np.mean([b["test_accuracy"] for b in baseline]))
            out["finetune/params_total"] = float(sum(b["params"] for b in baseline))
    return out


EVOLUTION = Claim(
    name="evolution",
    number=7,
    title="Dynamic tasks (muNet): no forgetting, bounded growth, quality against fine-tuning",
    paper=(
        "muNet / mu2Net (Gesmundo and Dean 2022, arXiv:2205.10937 and arXiv:2205.12755): "
        "tasks join one by one; earlier tasks never change; each new task adds few "
        "parameters as it reuses locked components; quality matches or beats fine-tuning "
        "a copy of the root per task; a smaller s trades quality for size."
    ),
    setting=(
        "configs/evolve.py (d_model 32, 2 blocks, MoE in block 1, 4 experts) on "
        "{evolve_tasks_text}: {evolve_generations} generations x {evolve_children} children "
        "x {evolve_steps} steps per task, for s = 1, 0.9, 0.5. Fine-tuning: the root copied "
        "per task (all its components and a new head) and trained as long as a path can be. "
        "Parameters added: components a task's best path made new or cloned."
    ),
    measure=measure_evolution,
    rows=(
        ("s = 1: mean test accuracy", "s1.0/accuracy"),
        ("s = 0.9: mean test accuracy", "s0.9/accuracy"),
        ("s = 0.5: mean test accuracy", "s0.5/accuracy"),
        ("fine-tuned root per task: mean test accuracy", "finetune/accuracy"),
        ("s = 1: parameters of the system (root + added)", "s1.0/params_total"),
        ("s = 0.9: parameters of the system (root + added)", "s0.9/params_total"),
        ("s = 0.5: parameters of the system (root + added)", "s0.5/params_total"),
        ("fine-tuned root per task: parameters", "finetune/params_total"),
        *(
            (f"s = 1: parameters added by task {i} ({task})", f"s1.0/params_added/{i}")
            for i, task in enumerate(EVOLVE_TASKS, start=1)
        ),
        ("s = 1: parameters added by the first task", "s1.0/params_added_first"),
        ("s = 1: parameters added per later task", "s1.0/params_added_later"),
        ("s = 0.5: parameters added per later task", "s0.5/params_added_later"),
        ("largest change of an earlier task's test accuracy", "s1.0/forgetting"),
    ),
    compares=(
        Compare(
            "later tasks add fewer parameters than the first",
            "s1.0/params_added_later",
            "s1.0/params_added_first",
            "<",
        ),
        Compare(
            "evolved >= fine-tuned accuracy (s = 1), within 0.01",
            "s1.0/accuracy",
            "finetune/accuracy",
            ">=",
            0.01,
        ),
        Compare("s = 0.5 smaller than s = 1", "s0.5/params_total", "s1.0/params_total", "<"),
    ),
    # Locked components cannot change, and the root is counted once against once per task:
    # both hold by construction when the code is right.
    checks=(
        Check("earlier tasks' accuracy unchanged (s = 1)", "s1.0/forgetting", "zero", "="),
        Check("earlier tasks' accuracy unchanged (s = 0.5)", "s0.5/forgetting", "zero", "="),
        Check(
            "root once + added < one fine-tuned root per task (parameters)",
            "s1.0/params_total",
            "finetune/params_total",
            "<",
        ),
    ),
)
