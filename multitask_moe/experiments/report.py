"""docs/results.md, docs/results/<claim>.json and docs/results/<claim>.png from the
per-seed measurements of each claim."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence

from multitask_moe.core.files import write_json
from multitask_moe.experiments import stats
from multitask_moe.experiments.claims import CLAIMS, Claim
from multitask_moe.experiments.scale import Scale

RESULTS_DIR = "results"
RESULTS_FILE = "results.md"
# Written by hand after reading a full run (what the numbers mean, what was looked into);
# results.md includes it after the summary table, so a new run keeps it.
DISCUSSION_FILE = "discussion.md"
NOT_MEASURED = "not measured"


def setting_text(claim: Claim, scale: Scale) -> str:
    fields = dataclasses.asdict(scale)
    fields["evolve_tasks_text"] = ", ".join(scale.evolve_tasks)
    return claim.setting.format(**fields)


def _measured(keys, numbers: Sequence[Mapping[str, float]]) -> bool:
    return all(k in seed for seed in numbers for k in keys)


def verdicts(claim: Claim, numbers: Sequence[Mapping[str, float]]) -> list[dict]:
    """Each comparison judged, or NOT_MEASURED where a seed lacks one of its keys (a
    measurement written before the key existed)."""
    return [
        dataclasses.asdict(stats.judge(c, numbers))
        if _measured((c.a, c.b), numbers)
        else {"label": c.label, "expect": c.expect, "outcome": NOT_MEASURED}
        for c in claim.compares
    ]


def checks(claim: Claim, numbers: Sequence[Mapping[str, float]]) -> list[dict]:
    return [
        dataclasses.asdict(stats.check(c, numbers))
        if _measured((c.a, c.b), numbers)
        else {"label": c.label, "relation": c.relation, "outcome": NOT_MEASURED}
        for c in claim.checks
    ]


def claim_result(claim: Claim, scale: Scale, per_seed: Sequence[dict], seeds) -> dict:
    """The JSON of one claim: per-seed values, mean and std per key, verdicts, checks."""
    numbers = [{k: v for k, v in m.items() if not k.startswith("note/")} for m in per_seed]
    notes = sorted({k for m in per_seed for k in m if k.startswith("note/")})
    return {
        "claim": claim.number,
        "name": claim.name,
        "title": claim.title,
        "paper": claim.paper,
        "setting": setting_text(claim, scale),
        "scale": scale.name,
        "seeds": list(seeds),
        "per_seed": per_seed,
        "stats": {k: dataclasses.asdict(s) for k, s in stats.aggregate(numbers).items()},
        "notes": {k.removeprefix("note/"): [m.get(k) for m in per_seed] for k in notes},
        "alpha": stats.ALPHA,
        "verdicts": verdicts(claim, numbers),
        "checks": checks(claim, numbers),
    }


def write_claim(out_dir: str, result: dict) -> None:
    directory = os.path.join(out_dir, RESULTS_DIR)
    os.makedirs(directory, exist_ok=True)
    write_json(os.path.join(directory, f"{result['name']}.json"), result)
    plot(result, os.path.join(directory, f"{result['name']}.png"))


def _unit(mean: float) -> str:
    """Rows of one plot panel share a scale: parameter counts, counts and ratios around 1
    and above (experts, speedups), accuracies and other fractions."""
    if abs(mean) >= 100:
        return "parameters"
    return "counts and ratios" if abs(mean) > 1.0 else "fractions"


def plot(result: dict, path: str) -> None:
    """Horizontal bars of the table's rows (mean, with the seeds' standard deviation as
    error bars), one panel per unit so that no row is dwarfed by another."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    claim = CLAIMS[result["name"]]
    rows = [(label, result["stats"][key]) for label, key in claim.rows if key in result["stats"]]
    if not rows:
        return
    panels: dict[str, list] = {}
    for label, s in rows:
        panels.setdefault(_unit(s["mean"]), []).append((label, s))
    heights = [0.35 * len(members) + 0.8 for members in panels.values()]
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(8, sum(heights) + 0.6), squeeze=False,
        gridspec_kw={"height_ratios": heights},
    )  # fmt: skip
    for ax, (unit, members) in zip(axes[:, 0], panels.items(), strict=True):
        ax.barh(
            range(len(members)),
            [s["mean"] for _, s in members],
            xerr=[s["std"] for _, s in members],
            color="#4C72B0",
            capsize=3,
        )
        ax.set_yticks(range(len(members)), [label for label, _ in members], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(unit, fontsize=7)
    fig.suptitle(f"{result['claim']}. {result['title']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(s: Mapping) -> str:
    value = stats.Stat(**s)
    if abs(value.mean) >= 100 or value.std >= 100:  # parameter counts
        return f"{value.mean:,.0f} ± {value.std:,.0f}" if value.n > 1 else f"{value.mean:,.0f}"
    return str(value)


def _verdict_line(v: Mapping) -> str:
    expect = {
        ">": "higher",
        "<": "lower",
        ">=": f"not lower by more than {v.get('tolerance')}",
        "~": f"within {v.get('tolerance')}",
    }[v["expect"]]
    if v["outcome"] == NOT_MEASURED:
        return f"- {v['label']} (paper: {expect}) -> **{NOT_MEASURED}**"
    test = ""
    if v["p_value"] is not None:
        low, high = v["interval"]
        test = f", 90% interval [{low:.3g}, {high:.3g}], p = {v['p_value']:.2g}"
    decide = f"; about {v['seeds_to_decide']} seeds would decide" if v["seeds_to_decide"] else ""
    return (
        f"- {v['label']}: difference {_fmt(v['difference'])}{test} (paper: {expect}) -> "
        f"**{v['outcome']}**{decide}"
    )


def _check_line(c: Mapping) -> str:
    if c["outcome"] == NOT_MEASURED:
        return f"- {c['label']} -> **{NOT_MEASURED}**"
    failing = f" (fails in {c['failing_seeds']} seeds)" if c["failing_seeds"] else ""
    return f"- {c['label']}: difference {_fmt(c['difference'])} -> **{c['outcome']}**{failing}"


def claim_markdown(result: dict) -> str:
    claim = CLAIMS[result["name"]]
    lines = [
        f"## {result['claim']}. {result['title']}",
        "",
        f"**Paper.** {result['paper']}",
        "",
        f"**Setting.** {result['setting']}",
        "",
        "| | mean ± std over seeds |",
        "|---|---|",
    ]
    for label, key in claim.rows:
        if key in result["stats"]:
            lines.append(f"| {label} | {_fmt(result['stats'][key])} |")
    lines += ["", "**Direction.**", ""]
    lines += [_verdict_line(v) for v in result["verdicts"]]
    if result.get("checks"):
        lines += ["", "**Checks** (structural facts of the setting, not the paper's finding):", ""]
        lines += [_check_line(c) for c in result["checks"]]
    if claim.per_task:
        tasks = sorted(
            {k.split("/", 1)[1] for k in result["stats"] if k.startswith(f"{claim.per_task[0]}/")},
            key=lambda t: list(result["stats"]).index(f"{claim.per_task[0]}/{t}"),
        )
        lines += ["", "Per task (mean over seeds):", ""]
        lines.append("| dataset | " + " | ".join(claim.per_task) + " |")
        lines.append("|---" * (len(claim.per_task) + 1) + "|")
        for task in tasks:
            cells = [f"{result['stats'][f'{arm}/{task}']['mean']:.3f}" for arm in claim.per_task]
            lines.append(f"| {task} | " + " | ".join(cells) + " |")
    if result["notes"]:
        lines += ["", "Per seed:", ""]
        for key, values in result["notes"].items():
            lines.append(f"- {key}: {', '.join(str(v) for v in values)}")
    lines += ["", f"![{result['name']}]({RESULTS_DIR}/{result['name']}.png)", ""]
    return "\n".join(lines)


def _claim_results(directory: str) -> list[dict]:
    """Every claim JSON in `directory`, in claim order."""
    results = []
    for claim in CLAIMS.values():
        path = os.path.join(directory, f"{claim.name}.json")
        if os.path.exists(path):
            with open(path) as f:
                results.append(json.load(f))
    return results


def rejudge(out_dir: str) -> None:
    """Rewrites every claim JSON (and plot) in out_dir/results from its stored per-seed
    measurements with the current verdicts and checks: no run is measured again."""
    from multitask_moe.experiments.scale import SCALES

    for result in _claim_results(os.path.join(out_dir, RESULTS_DIR)):
        claim = CLAIMS[result["name"]]
        scale = SCALES[result["scale"]]
        write_claim(out_dir, claim_result(claim, scale, result["per_seed"], result["seeds"]))


def summary_table(results: Sequence[dict]) -> str:
    lines = ["| claim | statement | ours |", "|---|---|---|"]
    for result in results:
        for v in result["verdicts"]:
            lines.append(f"| {result['claim']}. {result['name']} | {v['label']} | {v['outcome']} |")
        for c in result.get("checks", ()):
            lines.append(
                f"| {result['claim']}. {result['name']} | check: {c['label']} | {c['outcome']} |"
            )
    return "\n".join(lines)


def write_markdown(out_dir: str, header: str) -> str:
    """Renders results.md from every claim JSON in out_dir/results (claim order) and the
    hand-written discussion beside them."""
    directory = os.path.join(out_dir, RESULTS_DIR)
    discussion = ""
    runs = {(r["scale"], tuple(r["seeds"])) for r in _claim_results(directory)}
    if len(runs) > 1:
        raise ValueError(
            f"{directory} holds claims of different scales or seeds {sorted(runs)}: one "
            "report shows one run; use another --out"
        )
    if os.path.exists(os.path.join(directory, DISCUSSION_FILE)):
        with open(os.path.join(directory, DISCUSSION_FILE)) as f:
            discussion = f.read().strip() + "\n"
    results = _claim_results(directory)
    text = "\n".join(
        [header, "", summary_table(results), "", discussion, *map(claim_markdown, results)]
    )
    path = os.path.join(out_dir, RESULTS_FILE)
    with open(path, "w") as f:
        f.write(text.rstrip() + "\n")
    return path
