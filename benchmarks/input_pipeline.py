"""Input pipeline throughput: examples/s of the default task mixture on CPU, alone.

    python benchmarks/input_pipeline.py --out=benchmarks/results/input_pipeline.json

The mixture, its rates, batch size, image and patch size are those of configs/default.py
(digit tasks, tabular tasks, the synthetic family "a"). What training consumes is measured
here first: the default config's train step on its mesh (8 simulated CPU devices), timed
on batches made before the clock starts, gives examples/s; the target is 10x that
(--consumed overrides the measurement). Reported: the pipeline's median over several timed
runs after a warm-up, plus the cost of starting an iterator at step 0 and at a far step
(resumption without replay) and of one full eval pass. All figures come from this one
process, the step's before the pipeline's (they never run at once).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _default_config():
    spec = importlib.util.spec_from_file_location(
        "bench_default_config", os.path.join(REPO, "configs", "default.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


TARGET_RATIO = 10


def consumed_examples_per_s(config, runs: int, steps: int) -> float:
    """Examples/s the config's train step takes in: batch / median step time over `runs`
    runs of `steps` steps on four prepared batches, after a compile and 3 warm-up steps."""
    from multitask_moe.core import runtime

    runtime.configure_jax(config)  # the config's CPU devices, before JAX starts
    import jax

    from multitask_moe import parallel
    from multitask_moe.core.evaluate import global_batch
    from multitask_moe.core.state import create_state
    from multitask_moe.core.step import TRAIN_KEYS
    from multitask_moe.train import setup

    experiment = setup.prepare(config)
    with jax.set_mesh(experiment.mesh):
        state = create_state(experiment.model.spec, config.seed)
        sharding = parallel.batch_sharding(experiment.mesh)
        local = experiment.mixture.iterator("train", batch_size=config.batch_size, seed=0)
        batches = [global_batch(next(local), TRAIN_KEYS, sharding) for _ in range(4)]
        for i in range(3):
            state, _ = experiment.train_step(state, batches[i % 4])
        jax.block_until_ready(state)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            for i in range(steps):
                state, _ = experiment.train_step(state, batches[i % 4])
            jax.block_until_ready(state)
            times.append((time.perf_counter() - start) / steps)
    return config.batch_size / statistics.median(times)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--data_dir", default=None, help="TFDS data dir (default: $MTM_DATA_DIR)")
    parser.add_argument("--batch_size", type=int, default=None, help="default: the config's")
    parser.add_argument("--image_size", type=int, default=None, help="default: the config's")
    parser.add_argument("--patch_size", type=int, default=None, help="default: the config's")
    parser.add_argument("--warmup_steps", type=int, default=50)
    parser.add_argument("--steps", type=int, default=300, help="batches per timed run")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--resume_step", type=int, default=100_000)
    parser.add_argument(
        "--consumed", type=float, default=None,
        help="examples/s training consumes (default: measured from the train step)",
    )  # fmt: skip
    parser.add_argument("--step_runs", type=int, default=5, help="timed runs of the step")
    parser.add_argument("--step_steps", type=int, default=10, help="steps per timed run")
    return parser.parse_args(argv)


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str]) -> dict:
    args = _parse(argv)
    config = _default_config()
    consumed = args.consumed or consumed_examples_per_s(config, args.step_runs, args.step_steps)
    from multitask_moe import data
    from multitask_moe.core.config_lib import parse_weights

    tasks = parse_weights(config.data.tasks, "data.tasks")
    args.batch_size = args.batch_size or config.batch_size
    args.image_size = args.image_size or config.data.image_size
    args.patch_size = args.patch_size or config.data.patch_size
    process = {"process_index": 0, "process_count": 1}
    start = time.perf_counter()
    mixture = data.Mixture(
        tasks,
        rate=config.data.rate,
        image_size=args.image_size,
        patch_size=args.patch_size,
        data_dir=args.data_dir,
    )
    setup_s = time.perf_counter() - start

    def first_batch(start_step: int) -> float:
        return _seconds(
            lambda: next(
                mixture.iterator(
                    "train", batch_size=args.batch_size, start_step=start_step, **process
                )
            )
        )

    first_batch_s = first_batch(0)  # also fills the per-task caches
    first_batch_warm_s = first_batch(0)
    resume_s = first_batch(args.resume_step)

    batches = mixture.iterator("train", batch_size=args.batch_size, seed=0, **process)
    for _ in range(args.warmup_steps):
        next(batches)
    rates = []
    for _ in range(args.runs):
        elapsed = _seconds(lambda: [next(batches) for _ in range(args.steps)])
        rates.append(args.steps * args.batch_size / elapsed)
    median = statistics.median(rates)

    eval_examples = 0

    def eval_pass() -> None:
        nonlocal eval_examples
        for _, batch in mixture.eval_batches("validation", batch_size=args.batch_size, **process):
            eval_examples += int(batch["valid"].sum())

    eval_pass()  # fill caches
    eval_examples = 0
    eval_s = _seconds(eval_pass)

    target = consumed * TARGET_RATIO
    results = {
        "benchmark": "input_pipeline",
        "tasks": tasks,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "patch_size": args.patch_size,
        "token_shape": list(mixture.token_shape),
        "cpu_count": os.cpu_count(),
        "train_examples_per_s_median": median,
        "train_examples_per_s_runs": rates,
        "consumed_examples_per_s": consumed,
        "consumed_source": "--consumed" if args.consumed else "measured train step",
        "target_examples_per_s": target,
        "ratio_to_consumption": median / consumed,
        "meets_target": median >= target,
        "mixture_setup_s": setup_s,
        "first_batch_cold_s": first_batch_s,
        "first_batch_warm_s": first_batch_warm_s,
        "resume_step": args.resume_step,
        "first_batch_at_resume_step_s": resume_s,
        "eval_examples": eval_examples,
        "eval_examples_per_s": eval_examples / eval_s,
    }
    rows = [
        ("train examples/s (median)", f"{median:,.0f}"),
        ("  runs", ", ".join(f"{r:,.0f}" for r in rates)),
        ("consumed by training", f"{consumed:,.0f}" + (" (given)" if args.consumed else "")),
        ("ratio (target >= 10)", f"{median / consumed:,.1f}x"),
        ("mixture set-up", f"{setup_s:.2f} s"),
        (
            "first batch, cold (imports TF) / warm",
            f"{first_batch_s:.2f} s / {first_batch_warm_s:.2f} s",
        ),
        (f"first batch at step {args.resume_step:,}", f"{resume_s:.2f} s"),
        ("eval pass (validation)", f"{eval_examples} ex, {eval_examples / eval_s:,.0f} ex/s"),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"input pipeline, batch {args.batch_size}, token shape {mixture.token_shape}")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=2)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
