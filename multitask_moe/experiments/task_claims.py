"""Claims 1-4, what a task gains or loses from the others: task-aware routing against
dense, token routing and single-task models; low-resource transfer; an unseen task
routed from its nearest seen task; the original tasks after unrelated ones join."""

from __future__ import annotations

import json
import os

import numpy as np

from multitask_moe.experiments.catalogue import LOW_RESOURCE, SHOTS, TASKS, single_task_run
from multitask_moe.experiments.claim import Claim, Context, mean_accuracy, task_accuracy
from multitask_moe.experiments.stats import Compare

# configs/add_tasks.py's task lists.
SEEN = (
    "digits/class",
    "digits/rotated",
    "synthetic/a0",
    "synthetic/a1",
    "wine",
    "breast_cancer",
    "iris",
)
HELD_OUT = ("digits/parity", "synthetic/a2")


# 1. Task-aware routing against dense, token routing and single-task models.
MIXTURE_ARMS = {
    "task": "mixture/task",
    "task_tokens": "mixture/task_tokens",
    "tokens": "mixture/tokens",
    "dense": "mixture/dense",
}


def measure_task_moe(ctx: Context, seed: int) -> dict:
    out = {}
    for arm, run in MIXTURE_ARMS.items():
        metrics = ctx.metrics(run, seed)
        for task in TASKS:
            out[f"{arm}/{task}"] = task_accuracy(metrics, task)
    for task in TASKS:
        out[f"single/{task}"] = task_accuracy(ctx.metrics(single_task_run(task), seed), task)
        out[f"logreg/{task}"] = ctx.logreg(task)
    for arm in (*MIXTURE_ARMS, "single", "logreg"):
        out[arm] = float(np.mean([out[f"{arm}/{task}"] for task in TASKS]))
    return out


TASK_MOE = Claim(
    name="task_moe",
    number=1,
    title="Task-aware MoE against a dense multitask model of equal active compute",
    paper=(
        "Multitask MoE (Gupta et al. 2022, arXiv:2204.07689): "
        "routing by task matches or beats a dense multitask model of the same "
        "active compute and token-level routing, in mean per-task quality."
    ),
    setting=(
        "The 10 tasks of configs/default.py, {multitask_steps} steps, batch 64, one device. "
        "MoE blocks 1 and 3 (8 experts, top-2, hidden 64 each: the active compute of the "
        "dense MLP of hidden 128). Single-task: the dense transformer on one task for "
        "{single_steps} steps. Logistic regression: standardized raw features, sklearn."
    ),
    measure=measure_task_moe,
    rows=(
        ("MoE, task routing (Task-MoE)", "task"),
        ("MoE, task + token routing (default)", "task_tokens"),
        ("MoE, token routing", "tokens"),
        ("dense multitask", "dense"),
        ("dense single-task, one model per task", "single"),
        ("logistic regression per task", "logreg"),
    ),
    compares=(
        Compare("task routing > dense", "task", "dense", ">"),
        Compare("task + token routing > dense", "task_tokens", "dense", ">"),
        Compare("task routing > token routing", "task", "tokens", ">"),
        Compare("task + token routing > token routing", "task_tokens", "tokens", ">"),
        Compare("task routing > single-task models", "task", "single", ">"),
    ),
    per_task=("task", "task_tokens", "tokens", "dense", "single", "logreg"),
)


# 2. Low-resource transfer.
def measure_low_resource(ctx: Context, seed: int) -> dict:
    return {
        "moe_mixture": task_accuracy(ctx.metrics("mixture/task_tokens", seed), LOW_RESOURCE),
        "moe_alone": task_accuracy(ctx.metrics("single_moe/digits_lowres", seed), LOW_RESOURCE),
        "dense_mixture": task_accuracy(ctx.metrics("mixture/dense", seed), LOW_RESOURCE),
        "dense_alone": task_accuracy(
            ctx.metrics(single_task_run(LOW_RESOURCE), seed), LOW_RESOURCE
        ),
        "logreg": ctx.logreg(LOW_RESOURCE),
    }


LOW_RESOURCE_CLAIM = Claim(
    name="low_resource",
    number=2,
    title="Low-resource transfer: digits/lowres (50 examples) alone and in the mixture",
    paper=(
        "Multitask MoE (Gupta et al. 2022, arXiv:2204.07689): "
        "a task with few examples gains from related tasks trained "
        "with it (here digits/class, digits/rotated, digits/parity share its images)."
    ),
    setting=(
        "digits/lowres has 5 training images per digit. In the mixture: the 10-task runs of "
        "claim 1 (MoE: task + token routing; dense). Alone: the same models on digits/lowres "
        "only, {single_steps} steps."
    ),
    measure=measure_low_resource,
    rows=(
        ("MoE in the mixture", "moe_mixture"),
        ("MoE alone", "moe_alone"),
        ("dense in the mixture", "dense_mixture"),
        ("dense alone", "dense_alone"),
        ("logistic regression alone", "logreg"),
    ),
    compares=(
        Compare("MoE: mixture > alone", "moe_mixture", "moe_alone", ">"),
        Compare("dense: mixture > alone", "dense_mixture", "dense_alone", ">"),
    ),
)


# 3. An unseen task routed from its nearest seen task.
UNSEEN_ARMS = ("moe_nearest", "moe_scratch", "dense_nearest")


def measure_unseen(ctx: Context, seed: int) -> dict:
    from multitask_moe.train.warm_start import WARM_START_FILE

    out = {}
    for shots in SHOTS:
        for arm in UNSEEN_ARMS:
            run = f"unseen{shots}/{arm}"
            metrics = ctx.metrics(run, seed)
            for task in HELD_OUT:
                out[f"{arm}@{shots}/{task}"] = task_accuracy(metrics, task)
            out[f"{arm}@{shots}"] = mean_accuracy(metrics, HELD_OUT)
            if arm.endswith("nearest"):
                with open(os.path.join(ctx.workdir(run, seed), WARM_START_FILE)) as f:
                    record = json.load(f)
                for task in HELD_OUT:
                    out[f"note/{arm}@{shots}/{task}"] = record["new_tasks"][task]["start"]
    return out


UNSEEN = Claim(
    name="unseen",
    number=3,
    title="An unseen task from few examples, routed from its nearest seen task",
    paper=(
        "Multitask MoE (Gupta et al. 2022, arXiv:2204.07689): "
        "a new task starts better from the routing of a related "
        "seen task than from scratch, and a sparse model adapts better than a dense one."
    ),
    setting=(
        "configs/add_tasks.py: a Task-MoE model (routing=task) and its dense twin trained "
        "{multitask_steps} steps on 7 seen tasks; digits/parity and synthetic/a2 held out. "
        "Each joins with 10 or 50 training examples, everything the seen tasks use frozen, "
        "{add_steps} steps; starting from the nearest seen task (docs/lifecycle.md) or "
        "from fresh rows. Mean test accuracy of the two new tasks."
    ),
    measure=measure_unseen,
    rows=tuple(
        (f"{label}, {shots} examples", f"{arm}@{shots}")
        for shots in SHOTS
        for arm, label in zip(
            UNSEEN_ARMS,
            ("MoE from the nearest task", "MoE from scratch", "dense from the nearest task"),
            strict=True,
        )
    ),
    compares=tuple(
        compare
        for shots in SHOTS
        for compare in (
            Compare(
                f"{shots} examples: nearest > scratch",
                f"moe_nearest@{shots}",
                f"moe_scratch@{shots}",
                ">",
            ),
            Compare(
                f"{shots} examples: MoE > dense",
                f"moe_nearest@{shots}",
                f"dense_nearest@{shots}",
                ">",
            ),
        )
    ),
)


# 4. Robustness to unrelated tasks.
def measure_unrelated(ctx: Context, seed: int) -> dict:
    out = {}
    for model in ("moe", "dense"):
        alone = mean_accuracy(ctx.metrics(f"seen/{model}", seed), SEEN)
        out[f"{model}_alone"] = alone
        for how in ("joint", "later"):
            accuracy = mean_accuracy(ctx.metrics(f"{how}/{model}", seed), SEEN)
            out[f"{model}_{how}"] = accuracy
            out[f"{model}_{how}_drop"] = alone - accuracy
    return out


UNRELATED = Claim(
    name="unrelated",
    number=4,
    title="Robustness: the original tasks after unrelated tasks join",
    paper=(
        "Multitask MoE (Gupta et al. 2022, arXiv:2204.07689): "
        "with task-aware routing, unrelated tasks take their own "
        "experts, so the original tasks lose less than in a dense model."
    ),
    setting=(
        "The 7 seen tasks of claim 3 (Task-MoE and dense). synthetic/b0-b2 (a second "
        "teacher family) join either from the start (joint, {multitask_steps} steps) or "
        "after the seen model is trained (later: {later_steps} more steps, nothing frozen). "
        "Mean test accuracy of the 7 seen tasks; drop = alone - with the new tasks."
    ),
    measure=measure_unrelated,
    rows=(
        ("MoE, seen tasks alone", "moe_alone"),
        ("MoE, trained jointly with b*", "moe_joint"),
        ("MoE, b* added later", "moe_later"),
        ("dense, seen tasks alone", "dense_alone"),
        ("dense, trained jointly with b*", "dense_joint"),
        ("dense, b* added later", "dense_later"),
        ("MoE drop, joint", "moe_joint_drop"),
        ("dense drop, joint", "dense_joint_drop"),
        ("MoE drop, later", "moe_later_drop"),
        ("dense drop, later", "dense_later_drop"),
    ),
    compares=(
        Compare("joint: MoE drops less than dense", "moe_joint_drop", "dense_joint_drop", "<"),
        Compare("later: MoE drops less than dense", "moe_later_drop", "dense_later_drop", "<"),
    ),
)
