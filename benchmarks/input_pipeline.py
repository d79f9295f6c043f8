"""Input pipeline throughput: examples/s of the default task mixture on CPU, alone.

    python benchmarks/input_pipeline.py --out=benchmarks/results/input_pipeline.json

The default mixture is every embedded digit task, every embedded tabular task and the
synthetic family "a", at batch 64, image_size 16, patch_size 4. The training job is
assumed to consume 64 examples x ~10 steps/s = 640 examples/s; the target is 10x that.
Reported: the median over several timed runs after a warm-up, plus the cost of starting
an iterator at step 0 and at a far step (resumption without replay) and of one full eval
pass. All figures come from this one process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from multitask_moe import data

DEFAULT_TASKS = [
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
]
CONSUMED_EXAMPLES_PER_S = 64 * 10
TARGET_RATIO = 10


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--data_dir", default=None, help="TFDS data dir (default: $MTM_DATA_DIR)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--image_size", type=int, default=16)
    parser.add_argument("--patch_size", type=int, default=4)
    parser.add_argument("--warmup_steps", type=int, default=50)
    parser.add_argument("--steps", type=int, default=300, help="batches per timed run")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--resume_step", type=int, default=100_000)
    return parser.parse_args(argv)


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str]) -> dict:
    args = _parse(argv)
    process = {"process_index": 0, "process_count": 1}
    start = time.perf_counter()
    mixture = data.Mixture(
        {name: 1.0 for name in DEFAULT_TASKS},
        rate="explicit",
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

    target = CONSUMED_EXAMPLES_PER_S * TARGET_RATIO
    results = {
        "benchmark": "input_pipeline",
        "tasks": DEFAULT_TASKS,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "patch_size": args.patch_size,
        "token_shape": list(mixture.token_shape),
        "cpu_count": os.cpu_count(),
        "train_examples_per_s_median": median,
        "train_examples_per_s_runs": rates,
        "consumed_examples_per_s": CONSUMED_EXAMPLES_PER_S,
        "target_examples_per_s": target,
        "ratio_to_consumption": median / CONSUMED_EXAMPLES_PER_S,
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
        ("consumed by training", f"{CONSUMED_EXAMPLES_PER_S:,}"),
        ("ratio (target >= 10)", f"{median / CONSUMED_EXAMPLES_PER_S:,.1f}x"),
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
