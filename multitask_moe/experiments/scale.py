"""How long the experiments train: the full run behind docs/results.md, a quick run of
one seed for the slow test, and a smoke run for the suite."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Scale:
    """Step counts of every kind of run (the same for every seed).

    multitask_steps: the 10-task mixtures (claims 1, 2, 5, 6, 8) and the seen models.
    single_steps: one model per task, trained on that task alone (the baselines).
    add_steps: a held-out task added to a frozen seen model from 10 or 50 examples.
    later_steps: the unrelated tasks joining a trained model, nothing frozen.
    evolve_*: the evolution runs (configs/evolve.py with these fields).
    timing_calls: forward calls per timing round (claim 8), 7 rounds interleaved.
    """

    name: str
    seeds: tuple[int, ...]
    multitask_steps: int
    single_steps: int
    add_steps: int
    later_steps: int
    evolve_tasks: tuple[str, ...]
    evolve_generations: int
    evolve_children: int
    evolve_steps: int
    timing_calls: int


EVOLVE_TASKS = ("digits/class", "iris", "digits/parity", "wine")

SCALES = {
    "full": Scale(
        name="full",
        seeds=(0, 1, 2),
        multitask_steps=800,
        single_steps=300,
        add_steps=200,
        later_steps=300,
        evolve_tasks=EVOLVE_TASKS,
        evolve_generations=2,
        evolve_children=3,
        evolve_steps=80,
        timing_calls=5,
    ),
    "quick": Scale(
        name="quick",
        seeds=(0,),
        multitask_steps=100,
        single_steps=50,
        add_steps=30,
        later_steps=50,
        evolve_tasks=EVOLVE_TASKS[:2],
        evolve_generations=1,
        evolve_children=2,
        evolve_steps=20,
        timing_calls=2,
    ),
    "smoke": Scale(
        name="smoke",
        seeds=(0,),
        multitask_steps=4,
        single_steps=4,
        add_steps=4,
        later_steps=4,
        evolve_tasks=EVOLVE_TASKS[:2],
        evolve_generations=1,
        evolve_children=1,
        evolve_steps=4,
        timing_calls=1,
    ),
}
