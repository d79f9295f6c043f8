"""python -m multitask_moe.experiments [NAME ...] [--scale=full|quick|smoke] [--jobs=N]

Runs the named claims (all by default; names: task_moe, low_resource, unseen, unrelated,
mi_loss, extraction, evolution, inference) for every seed of the scale and writes
OUT/results/<claim>.json and .png and OUT/results.md (every claim JSON found there).
Trained runs, evolutions, extractions and per-seed measurements are kept under
--workdir and reused, so a killed run resumes and a second call only rewrites the report.
--jobs=3 measures the three seeds in three processes at once. --rejudge re-judges the
claim JSONs already in OUT from their stored per-seed numbers (after a change of the
verdict rule) without measuring anything.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def parse_args(argv: list[str]) -> argparse.Namespace:
    from multitask_moe.experiments.claims import CLAIMS
    from multitask_moe.experiments.scale import SCALES

    parser = argparse.ArgumentParser(
        prog="python -m multitask_moe.experiments", description=__doc__.split("\n\n")[1]
    )
    parser.add_argument("names", nargs="*", help=f"claims (default: all): {', '.join(CLAIMS)}")
    parser.add_argument("--scale", default="full", help=f"one of {', '.join(SCALES)}")
    parser.add_argument("--seeds", default="", help="comma-separated seeds (default: the scale's)")
    parser.add_argument(
        "--workdir", default="", help="runs and caches (default: workdir/experiments/<scale>)"
    )
    parser.add_argument(
        "--out",
        default="",
        help="where results.md and results/ go (default: docs for the full scale, else "
        "<workdir>/report, so a short run never replaces the committed results)",
    )
    parser.add_argument("--jobs", type=int, default=1, help="processes measuring seeds")
    parser.add_argument(
        "--rejudge",
        action="store_true",
        help="re-judge the claim JSONs already in --out from their per-seed numbers (the "
        "current verdict rule; nothing is measured) and rewrite the report",
    )
    parser.add_argument("--measure-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in CLAIMS]
    if unknown:
        parser.error(f"unknown claims {unknown}; allowed: {list(CLAIMS)}")
    if args.scale not in SCALES:
        parser.error(f"--scale={args.scale!r}; allowed: {list(SCALES)}")
    if args.jobs < 1:
        parser.error(f"--jobs={args.jobs} must be >= 1")
    args.names = args.names or list(CLAIMS)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds={args.seeds!r} must be comma-separated ints")
    args.seeds = tuple(dict.fromkeys(seeds)) or SCALES[args.scale].seeds  # once each
    args.workdir = args.workdir or os.path.join("workdir", "experiments", args.scale)
    args.out = args.out or (
        "docs" if args.scale == "full" else os.path.join(args.workdir, "report")
    )
    return args


def configure_jax(workdir: str) -> None:
    """CPU, and a persistent compilation cache: the seeds (and several claims) compile the
    same programs, so later ones load them instead of compiling."""
    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update(
        "jax_compilation_cache_dir", os.path.join(os.path.abspath(workdir), "jax_cache")
    )
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def measured(names, scale, seeds, workdir: str) -> dict[str, list[dict]]:
    """{claim: [measurement of each seed]}, measured now or read from the cache."""
    from multitask_moe.core.files import write_json
    from multitask_moe.experiments.claims import CLAIMS, Context
    from multitask_moe.experiments.runs import Runner

    context = Context(Runner(workdir, scale, log=lambda m: print(m, flush=True)))
    out = {name: [] for name in names}
    for seed in seeds:
        for name in names:
            path = os.path.join(workdir, f"seed{seed}", "measured", f"{name}.json")
            if not os.path.exists(path):
                start = time.perf_counter()
                values = CLAIMS[name].measure(context, seed)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                write_json(path, values)
                print(
                    f"seed {seed}: {name} measured in {time.perf_counter() - start:.0f} s",
                    flush=True,
                )
            with open(path) as f:
                out[name].append(json.load(f))
    return out


def measure_in_processes(args: argparse.Namespace) -> None:
    """Each of args.jobs processes measures every claim for its share of the seeds."""
    shares = [args.seeds[i :: args.jobs] for i in range(args.jobs)]
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "multitask_moe.experiments",
                *args.names,
                f"--scale={args.scale}",
                f"--seeds={','.join(map(str, share))}",
                f"--workdir={args.workdir}",
                "--measure-only",
            ]
        )
        for share in shares
        if share
    ]
    failed = [w.args for w in workers if w.wait()]
    if failed:
        sys.exit(f"error: {len(failed)} worker(s) failed: {failed}")


RUN_FILE = "run.json"  # how long the call that measured took, for the header


def missing(names, seeds, workdir: str) -> bool:
    """Whether any (seed, claim) still has to be measured."""
    return any(
        not os.path.exists(os.path.join(workdir, f"seed{seed}", "measured", f"{name}.json"))
        for seed in seeds
        for name in names
    )


def run_record(args, seconds: float | None, complete: bool) -> dict:
    """How the report's numbers were measured. A call that measured every (seed, claim)
    of every claim from scratch writes its wall time; a call that only rewrote the report
    keeps the record it finds; any other measuring call (one claim, a resumed run) writes
    a record without a wall time, naming what it measured."""
    path = os.path.join(args.out, "results", RUN_FILE)
    if seconds is None and os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    record = {
        "command": "python -m multitask_moe.experiments " + " ".join(sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "seeds": list(args.seeds),
        "cpu_cores": os.cpu_count(),
        "machine": platform.machine(),
        "wall_seconds": seconds if complete else None,
    }
    from multitask_moe.core.files import write_json

    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_json(path, record)
    return record


def header(record: dict) -> str:
    wall = record["wall_seconds"]
    return "\n".join(
        [
            "# Results: the papers' claims at small scale",
            "",
            f"Written by `{record['command']}` on {record['date']}: seeds "
            f"{', '.join(map(str, record['seeds']))}, {record['cpu_cores']} CPU cores "
            f"({record['machine']}), "
            + (
                f"{wall / 60:.0f} min wall to train and measure"
                if wall
                else "wall time not recorded (measured in parts or resumed)"
            )
            + ". Each claim: the "
            "setting, our numbers as mean ± standard deviation over seeds, the paper's "
            "direction and whether ours agrees by a one-sided paired t-test over the seeds "
            "at level 0.05 (p-value and 90% interval beside each verdict; what the test "
            "cannot decide is within noise; one seed is not enough), and the setting's "
            "structural checks apart. Nothing was tuned to make a claim agree; the raw "
            "numbers per seed are in `results/<claim>.json`, and docs/experiments.md says "
            "how to rerun one claim.",
        ]
    )


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    from multitask_moe.experiments.scale import SCALES

    scale = SCALES[args.scale]
    if args.rejudge:
        from multitask_moe.experiments import report

        report.rejudge(args.out)
        path = report.write_markdown(args.out, header(run_record(args, None, False)))
        print(f"Results: {path}", flush=True)
        return
    start = time.perf_counter()
    measures = missing(args.names, args.seeds, args.workdir)
    from multitask_moe.experiments.claims import CLAIMS

    complete = set(args.names) == set(CLAIMS) and all(
        missing([name], [seed], args.workdir) for name in CLAIMS for seed in args.seeds
    )
    if args.jobs > 1 and len(args.seeds) > 1 and not args.measure_only:
        measure_in_processes(args)
    configure_jax(args.workdir)
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    results = measured(args.names, scale, args.seeds, args.workdir)
    if args.measure_only:
        return
    from multitask_moe.experiments import report

    for name, per_seed in results.items():
        report.write_claim(args.out, report.claim_result(CLAIMS[name], scale, per_seed, args.seeds))
    record = run_record(args, time.perf_counter() - start if measures else None, complete)
    path = report.write_markdown(args.out, header(record))
    print(f"Results: {path}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
