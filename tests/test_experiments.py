"""The experiment harness (multitask_moe.experiments): verdicts against hand-computed
differences, a run trained once and read back, the report from known measurements, and
(slow) the quick scale of every claim through the command line."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from multitask_moe.experiments import SCALES, Run, Runner, report, stats
from multitask_moe.experiments.__main__ import parse_args
from multitask_moe.experiments.claims import CLAIMS, LOW_RESOURCE_CLAIM

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _seeds(a, b):
    return [{"a": x, "b": y} for x, y in zip(a, b, strict=True)]


@pytest.mark.parametrize(
    "expect, a, b, tolerance, outcome",
    [
        (">", [0.9, 0.8, 0.85], [0.7, 0.7, 0.72], 0, stats.AGREES),  # diffs .2 .1 .13: t 4.6
        ("<", [0.9, 0.8, 0.85], [0.7, 0.7, 0.72], 0, stats.DISAGREES),
        (">", [0.71, 0.69, 0.70], [0.70, 0.70, 0.70], 0, stats.WITHIN_NOISE),  # mean 0
        # mean .1 > std .058 (the old rule's "agrees"), but t = 1.73: p = .11 decides nothing.
        (">", [0.8, 0.8, 0.7], [0.7, 0.7, 0.7], 0, stats.WITHIN_NOISE),
        (">=", [0.695, 0.70, 0.705], [0.70, 0.70, 0.70], 0.01, stats.AGREES),  # a tie passes
        (">=", [0.60, 0.62, 0.61], [0.70, 0.70, 0.70], 0.01, stats.DISAGREES),
        ("~", [0.801, 0.80, 0.799], [0.80, 0.80, 0.80], 0.01, stats.AGREES),
        ("~", [0.83, 0.82, 0.825], [0.80, 0.80, 0.80], 0.01, stats.DISAGREES),
        ("~", [0.805, 0.80], [0.80, 0.80], 0.01, stats.WITHIN_NOISE),  # interval .03 wide
        (">", [0.5], [0.4], 0, stats.NOT_ENOUGH_SEEDS),  # one seed: no spread, no test
        ("~", [0.5], [0.5], 0.01, stats.NOT_ENOUGH_SEEDS),
    ],
)
def test_judge(expect, a, b, tolerance, outcome):
    verdict = stats.judge(stats.Compare("x", "a", "b", expect, tolerance), _seeds(a, b))
    diffs = np.subtract(a, b)
    assert verdict.outcome == outcome
    assert math.isclose(verdict.difference.mean, diffs.mean())
    if len(a) > 1:
        assert math.isclose(verdict.difference.std, diffs.std(ddof=1))


@pytest.mark.parametrize("expect, alternative", [(">", "greater"), ("<", "less")])
def test_p_value_and_interval_are_the_paired_t_tests(expect, alternative):
    from scipy import stats as scipy_stats

    a, b = [0.81, 0.74, 0.79, 0.77], [0.70, 0.72, 0.75, 0.71]
    verdict = stats.judge(stats.Compare("x", "a", "b", expect), _seeds(a, b))
    assert verdict.p_value == pytest.approx(
        scipy_stats.ttest_rel(a, b, alternative=alternative).pvalue, rel=1e-9
    )
    interval = scipy_stats.ttest_rel(a, b).confidence_interval(1 - 2 * stats.ALPHA)
    assert verdict.interval == pytest.approx((interval.low, interval.high), rel=1e-9)


def test_error_rate_under_no_difference_is_alpha():
    """2000 three-seed comparisons of two equal arms (normal noise): each side is read
    with probability ALPHA (binomial sd 0.005); the old one-sd rule read each about 0.11."""
    rng = np.random.default_rng(0)
    outcomes = [
        stats.judge(
            stats.Compare("x", "a", "b", ">"), _seeds(rng.normal(size=3), [0, 0, 0])
        ).outcome
        for _ in range(2000)
    ]
    for outcome in (stats.AGREES, stats.DISAGREES):
        assert outcomes.count(outcome) / len(outcomes) == pytest.approx(stats.ALPHA, abs=0.02)


def test_seeds_to_decide_is_the_fewest_that_clear_the_test():
    d = stats.Stat(mean=0.02, std=0.03, n=3)
    n = stats.seeds_to_decide(d)
    assert n is not None and n > 3

    def decides(seeds):
        return stats.judge(
            stats.Compare("x", "a", "b", ">"),
            [{"a": d.mean + d.std * z, "b": 0.0} for z in _unit_spread(seeds)],
        ).outcome

    assert decides(n) == stats.AGREES and decides(n - 1) == stats.WITHIN_NOISE
    assert stats.seeds_to_decide(stats.Stat(0.0, 0.1, 3)) is None  # no effect: never
    noise = stats.judge(stats.Compare("x", "a", "b", ">"), _seeds([0.8, 0.8, 0.7], [0.7] * 3))
    assert noise.seeds_to_decide == stats.seeds_to_decide(noise.difference)


def _unit_spread(n):
    """n values with mean exactly 0 and sample standard deviation exactly 1."""
    z = np.linspace(-1, 1, n)
    return (z - z.mean()) / z.std(ddof=1)


def test_checks_hold_in_every_seed():
    fact = stats.Check("smaller", "a", "b", "<")
    assert stats.check(fact, _seeds([0.5, 0.6], [1, 1])).outcome == stats.HOLDS
    failed = stats.check(fact, _seeds([0.5, 1.0, 1.2], [1, 1, 1]))
    assert (failed.outcome, failed.failing_seeds) == (stats.FAILS, 2)  # a tie fails "<"
    assert stats.check(stats.Check("tie", "a", "b", "<="), _seeds([1.0], [1])).outcome == "holds"


def test_bad_comparisons_name_the_value():
    with pytest.raises(ValueError, match="expect='=>'"):
        stats.Compare("x", "a", "b", "=>")
    with pytest.raises(ValueError, match="expect='~' needs a tolerance > 0"):
        stats.Compare("x", "a", "b", "~")
    with pytest.raises(ValueError, match="relation='!='"):
        stats.Check("x", "a", "b", "!=")


def test_runner_trains_once_and_reads_back(tmp_path, monkeypatch):
    runner = Runner(str(tmp_path), SCALES["smoke"], log=lambda _: None)
    run = Run("iris_alone", "dense", "single", (("data.tasks", "iris=1"),))
    record = runner.train(run, 3, {run.name: run})
    assert record["metrics"]["test/iris/num_examples"] == 30
    assert 0.0 <= record["metrics"]["test/iris/accuracy"] <= 1.0
    config = json.load(open(tmp_path / "seed3" / "iris_alone" / "config.json"))
    assert (config["seed"], config["num_train_steps"], config["mesh"]) == (
        3,
        SCALES["smoke"].single_steps,
        {"data": -1, "expert": 1},
    )
    assert record["command"].startswith("python -m multitask_moe.train --config=configs/dense.py ")
    assert "--config.data.tasks='iris=1'" in record["command"]
    assert "--config.seed=3" in record["command"]

    from multitask_moe.train import train as train_lib

    def no_training(*_):
        raise AssertionError("a finished run trained again")

    monkeypatch.setattr(train_lib, "train_and_evaluate", no_training)
    assert runner.train(run, 3, {run.name: run}) == record


def test_report_from_known_measurements(tmp_path):
    per_seed = [
        {"moe_mixture": 0.6, "moe_alone": 0.5, "dense_mixture": 0.4, "dense_alone": 0.45,
         "logreg": 0.75},
        {"moe_mixture": 0.7, "moe_alone": 0.5, "dense_mixture": 0.5, "dense_alone": 0.45,
         "logreg": 0.75},
        {"moe_mixture": 0.8, "moe_alone": 0.6, "dense_mixture": 0.3, "dense_alone": 0.45,
         "logreg": 0.75},
    ]  # fmt: skip
    result = report.claim_result(LOW_RESOURCE_CLAIM, SCALES["full"], per_seed, (0, 1, 2))
    assert result["stats"]["moe_mixture"]["mean"] == pytest.approx(0.7)
    assert result["stats"]["moe_mixture"]["std"] == pytest.approx(0.1)
    outcomes = {v["label"]: v["outcome"] for v in result["verdicts"]}
    # MoE diffs .1 .2 .2 (mean .167 > std .058); dense diffs -.05 .05 -.15 (mean -.05 < std .1).
    assert outcomes == {
        "MoE: mixture > alone": stats.AGREES,
        "dense: mixture > alone": stats.WITHIN_NOISE,
    }
    report.write_claim(str(tmp_path), result)
    path = report.write_markdown(str(tmp_path), "# header")
    text = open(path).read()
    assert "| MoE in the mixture | 0.700 ± 0.100 |" in text
    assert "| 2. low_resource | MoE: mixture > alone | agrees |" in text
    assert "p = 0.019" in text  # t = 5.0 on 2 degrees of freedom
    assert f"{SCALES['full'].single_steps} steps" in text  # the setting names the scale's steps
    assert (tmp_path / "results" / "low_resource.png").stat().st_size > 0
    assert json.load(open(tmp_path / "results" / "low_resource.json"))["per_seed"] == per_seed


def test_bad_arguments_name_the_value(capsys):
    for argv, message in (
        (["nope"], "unknown claims ['nope']"),
        (["--scale=huge"], "--scale='huge'"),
        (["--jobs=0"], "--jobs=0 must be >= 1"),
        (["--seeds=a"], "--seeds='a'"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            parse_args(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    quick = parse_args(["mi_loss", "--scale=quick", "--seeds=1,1,0"])
    assert quick.seeds == (1, 0)  # once each: two workers never share a seed's workdir
    # A short scale caches and reports apart from the full run's committed results.
    assert quick.workdir == os.path.join("workdir", "experiments", "quick")
    assert quick.out == os.path.join(quick.workdir, "report")
    assert parse_args([]).out == "docs"


def test_report_lists_checks_apart_and_keys_not_measured():
    from multitask_moe.experiments.expert_claims import EXTRACTION, INFERENCE

    seeds = [
        {"task_moe/full": f, "task_moe/extracted": f, "task_moe/params_ratio": r,
         "task_moe/one": 1.0, "mod_squad/full": f, "mod_squad/extracted": f - 0.1,
         "mod_squad/params_ratio": 1.0, "mod_squad/one": 1.0}
        for f, r in ((0.8, 0.5), (0.7, 0.6), (0.75, 0.55))
    ]  # fmt: skip
    result = report.claim_result(EXTRACTION, SCALES["full"], seeds, (0, 1, 2))
    assert [c["outcome"] for c in result["checks"]] == [stats.HOLDS, stats.FAILS]
    assert [v["outcome"] for v in result["verdicts"]] == [stats.AGREES, stats.DISAGREES]
    text = report.claim_markdown(result)
    assert "- Mod-Squad: extracted / full parameters < 1: difference 0.000 ± 0.000" in text
    assert "**fails** (fails in 3 seeds)" in text
    assert "| 6. extraction | check: Task-MoE: extracted / full parameters < 1 | holds |" in (
        report.summary_table([result])
    )
    # A measurement from before claim 8 timed same-size groups has no such key.
    old = [{"speedup": 1.5, "one": 1.0, "extracted_accuracy": 0.7, "tokens_accuracy": 0.7}] * 2
    outcomes = {v["label"]: v["outcome"] for v in report.verdicts(INFERENCE, old)}
    assert outcomes["extracted is faster (same routing groups)"] == report.NOT_MEASURED


def test_one_report_shows_one_scale(tmp_path):
    per_seed = [{"moe_mixture": 0.6, "moe_alone": 0.5, "dense_mixture": 0.4, "dense_alone": 0.45,
                 "logreg": 0.75}]  # fmt: skip
    full = report.claim_result(LOW_RESOURCE_CLAIM, SCALES["full"], per_seed, (0,))
    report.write_claim(str(tmp_path), full)
    quick = {**report.claim_result(LOW_RESOURCE_CLAIM, SCALES["quick"], per_seed, (0,)),
             "name": "unseen"}  # fmt: skip
    with open(tmp_path / "results" / "unseen.json", "w") as f:
        json.dump(quick, f)
    with pytest.raises(ValueError, match="different scales or seeds"):
        report.write_markdown(str(tmp_path), "# header")


@pytest.mark.slow  # ~15 min: every claim at the quick scale (one seed, 100-step runs)
@pytest.mark.experiment  # make test-experiments; CI's make test-slow leaves it out
@pytest.mark.timeout(1800)  # the suite's 600 s default is for single tests, not this run
def test_quick_scale_measures_every_claim(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-m", "multitask_moe.experiments", "--scale=quick",
         f"--workdir={tmp_path / 'work'}", f"--out={tmp_path / 'docs'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = open(tmp_path / "docs" / "results.md").read()
    for claim in CLAIMS.values():
        result = json.load(open(tmp_path / "docs" / "results" / f"{claim.name}.json"))
        assert len(result["verdicts"]) == len(claim.compares)
        for _, key in claim.rows:
            if "/params_added/" in key and int(key.rsplit("/", 1)[1]) > len(
                SCALES["quick"].evolve_tasks
            ):
                continue  # the quick scale evolves fewer tasks than the full one
            assert math.isfinite(result["stats"][key]["mean"]), (claim.name, key)
        assert f"## {claim.number}. {claim.title}" in text
    evolution = json.load(open(tmp_path / "docs" / "results" / "evolution.json"))
    assert evolution["stats"]["s1.0/forgetting"]["mean"] == 0.0
