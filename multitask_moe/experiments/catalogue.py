"""Every training run the claims read, by name (experiments.runs.Run)."""

from __future__ import annotations

from multitask_moe.experiments.runs import DENSE_FIELDS, Run

# The ten tasks of configs/default.py.
TASKS = (
    "digits/class",
    "digits/parity",
    "digits/rotated",
    "digits/lowres",
    "wine",
    "breast_cancer",
    "iris",
    "synthetic/a0",
    "synthetic/a1",
    "synthetic/a2",
)
LOW_RESOURCE = "digits/lowres"
SHOTS = (10, 50)


def single_task_run(task: str) -> str:
    return f"single_dense/{task.replace('/', '_')}"


def _catalogue() -> dict[str, Run]:
    runs = [
        # The 10-task mixture: every routing at equal active compute, and the dense twin.
        Run("mixture/task_tokens", "default:routing=task_tokens", "multitask"),
        Run("mixture/task", "default:routing=task", "multitask"),
        Run("mixture/tokens", "default:routing=tokens", "multitask"),
        Run("mixture/dense", "dense", "multitask"),
        Run("mixture/mod_squad", "default:mod_squad", "multitask"),
        Run(
            "mixture/mod_squad_no_mi",
            "default:mod_squad",
            "multitask",
            (("aux_loss.mutual_info", 0.0),),
        ),
        # Alone: the dense transformer on each task, and the low-resource task with MoE.
        *(
            Run(single_task_run(task), "dense", "single", (("data.tasks", f"{task}=1"),))
            for task in TASKS
        ),
        Run(
            "single_moe/digits_lowres", "default", "single", (("data.tasks", f"{LOW_RESOURCE}=1"),)
        ),
        # Adding tasks: the seen models (Task-MoE routing and dense), the held-out tasks
        # added from few examples, the unrelated tasks added later or trained jointly.
        Run("seen/moe", "add_tasks", "multitask"),
        Run("seen/dense", "add_tasks", "multitask", DENSE_FIELDS),
        Run("joint/moe", "add_tasks:joint", "multitask"),
        Run("joint/dense", "add_tasks:joint", "multitask", DENSE_FIELDS),
        Run("later/moe", "add_tasks:unrelated", "later", init_from="seen/moe"),
        Run("later/dense", "add_tasks:unrelated", "later", DENSE_FIELDS, init_from="seen/dense"),
    ]
    for shots in SHOTS:
        unseen = f"add_tasks:unseen,shots={shots}"
        runs += [
            Run(f"unseen{shots}/moe_nearest", unseen, "add", init_from="seen/moe"),
            Run(
                f"unseen{shots}/moe_scratch",
                unseen,
                "add",
                (("new_task_init", "scratch"),),
                init_from="seen/moe",
            ),
            Run(f"unseen{shots}/dense_nearest", unseen, "add", DENSE_FIELDS, "seen/dense"),
        ]
    return {run.name: run for run in runs}


RUNS = _catalogue()
