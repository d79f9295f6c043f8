"""Evolution machinery cost: a child's train step vs the plain train step of the same
model, and compiles and wall time per generation of the default evolution config.

    .venv/bin/python benchmarks/evolution.py --out=benchmarks/results/evolution.json

step ratio  a child step (core/step.py with the masks and the learning rate as traced
            inputs: one compiled step for every child of an architecture) over the same
            train step with the same masks bound as constants (a warm start's freeze),
            on one single-task path model with half its components locked: both train
            the same set, so the ratio is the machinery's overhead alone; median of
            per-pair ratios over --runs interleaved runs of --steps steps (target <= 1.3)
freezing    the plain step with half the components frozen over the plain step training
            everything: what freezing saves (or costs), apart from the machinery
generation  compiles and seconds of each generation of configs/evolve.py on its first
            --tasks tasks (from the run's own records), on the command's devices (8
            simulated CPU devices); --set evolve.devices_per_child=4 trains each child
            expert-parallel on a group of 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="path of the JSON result")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--tasks", type=int, default=2, help="tasks of the evolution run")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, REPO)

    import functools

    import jax
    from absl import logging

    from multitask_moe.core import config_lib, runtime
    from multitask_moe.core.state import make_optimizer, with_learning_rate
    from multitask_moe.core.step import AUX_LOSSES, LossSettings, make_train_step
    from multitask_moe.evolution import System, child, path_model
    from multitask_moe.evolve import settings_from_config

    logging.set_verbosity(logging.WARNING)
    config = config_lib.sibling_config(os.path.join(REPO, "configs", "x.py"), "evolve")
    config_lib.set_from_strings(config, args.set)
    runtime.configure_jax(config)  # the command's 8 CPU devices, before JAX starts
    tasks = [t.strip() for t in config.evolve.tasks.split(",")][: args.tasks]
    config.evolve.tasks = ", ".join(tasks)
    settings = settings_from_config(config)

    # -- step cost: one architecture, a child step vs the plain step ---------------------
    system = System(settings)
    arch = system.arch[system.root]
    graphdef, fresh = path_model.build(settings.model, arch, system.token_shape, 0)
    steps = system.steps_for(arch)
    names = arch.component_names()
    trainable = {name: i >= len(names) // 2 for i, name in enumerate(names)}
    mask = child.pure_mask(path_model.leaf_trainable(fresh, trainable, arch), fresh)
    opt_state = with_learning_rate(steps.tx.init(fresh["params"]), 3e-3)
    batches = system.mixture(tasks[0]).iterator("train", batch_size=settings.batch_size, seed=0)
    batch_list = [next(batches) for _ in range(4)]

    config.optimizer.learning_rate = 3e-3
    tx, schedule = make_optimizer(config.optimizer, args.steps * args.runs)
    step = make_train_step(
        graphdef,
        tx,
        schedule,
        LossSettings(
            num_tasks=1,
            task_weights=(1.0,),
            aux_weights={k: float(config.aux_loss[k]) for k in AUX_LOSSES},
            sparse_layers=tuple(steps_sparse(graphdef, fresh)),
        ),
        skip_nonfinite=False,
    )
    # The same trainable set as the child, bound as numpy constants (a warm start's way).
    constant_mask = jax.tree.map(np.asarray, mask)
    plain_steps = {
        "frozen": jax.jit(functools.partial(step, trainable=constant_mask)),
        "all": jax.jit(step),
    }
    plain_states = {
        name: {
            "step": jax.numpy.zeros((), jax.numpy.int32),
            "params": fresh["params"],
            "model_state": fresh["model_state"],
            "opt_state": tx.init(fresh["params"]),
        }
        for name in plain_steps
    }
    child_state = dict(fresh)

    def run_child():
        nonlocal child_state, opt_state
        for i in range(args.steps):
            child_state, opt_state, loss = steps.train_step(
                child_state, opt_state, batch_list[i % 4], mask
            )
        jax.block_until_ready(loss)

    def run_plain(name):
        for i in range(args.steps):
            plain_states[name], metrics = plain_steps[name](plain_states[name], batch_list[i % 4])
        jax.block_until_ready(metrics["loss"])

    runs = {
        "child": run_child,
        "frozen": lambda: run_plain("frozen"),
        "all": lambda: run_plain("all"),
    }
    for fn in runs.values():  # compile, warm up
        fn()
    times = {name: [] for name in runs}
    for _ in range(args.runs):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) / args.steps)

    def paired(a, b):
        return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))

    ratio, freezing = paired("child", "frozen"), paired("frozen", "all")

    # -- a short evolution: compiles and wall time per generation ------------------------
    start = time.perf_counter()
    system = System(settings)
    system.run()
    wall = time.perf_counter() - start
    generations = [
        {"task": task, **{k: g[k] for k in ("generation", "compiles", "seconds")}}
        for task, record in system.records.items()
        for g in record["generations"]
    ]
    result = {
        "config": {**vars(args), "tasks": tasks, "children": settings.children},
        "child_step_s": statistics.median(times["child"]),
        "plain_step_s": statistics.median(times["frozen"]),
        "plain_step_all_trainable_s": statistics.median(times["all"]),
        "trainable_components": sorted(name for name, free in trainable.items() if free),
        "step_ratio_child_over_plain": ratio,
        "step_ratio_frozen_over_all_trainable": freezing,
        "target_ratio": 1.3,
        "generations": generations,
        "evolution_wall_s": wall,
        "platform": jax.default_backend(),
        "test_accuracy": {t: r["test_accuracy_when_added"] for t, r in system.records.items()},
    }
    print(
        f"child step {1e3 * result['child_step_s']:.2f} ms, plain step with the same "
        f"trainable set {1e3 * result['plain_step_s']:.2f} ms: {ratio:.2f}x (target <= 1.3x)"
    )
    print(
        f"plain step, half frozen / everything trainable "
        f"({1e3 * result['plain_step_all_trainable_s']:.2f} ms): {freezing:.2f}x"
    )
    for g in generations:
        print(
            f"{g['task']:<16} generation {g['generation']}: {g['compiles']} compiles, "
            f"{g['seconds']:.1f} s ({settings.children} children)"
        )
    print(f"evolution of {len(tasks)} tasks: {wall:.1f} s")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


def steps_sparse(graphdef, fresh):
    from flax import nnx

    return nnx.merge(graphdef, fresh["params"], fresh["model_state"]).sparse_layer_names()


if __name__ == "__main__":
    main()
