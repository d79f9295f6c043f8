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
        (">", [0.9, 0.8, 0.85], [0.7, 0.7, 0.72], 0, stats.AGREES),  # diffs .2 .1 .13
        ("<", [0.9, 0.8, 0.85], [0.7, 0.7, 0.72], 0, stats.DISAGREES),
        (">", [0.71, 0.69, 0.70], [0.70, 0.70, 0.70], 0, stats.WITHIN_NOISE),  # mean 0, std .01
        ("~", [0.805, 0.80], [0.80, 0.80], 0.01, stats.AGREES),
        ("~", [0.83, 0.82], [0.80, 0.80], 0.01, stats.DISAGREES),
        ("=", [0.0, 0.0], [0.0, 0.0], 0, stats.AGREES),
        ("=", [0.0, 1e-9], [0.0, 0.0], 0, stats.DISAGREES),
        (">", [0.5], [0.4], 0, stats.AGREES),  # one seed: the sign alone
    ],
)
def test_judge(expect, a, b, tolerance, outcome):
    verdict = stats.judge(stats.Compare("x", "a", "b", expect, tolerance), _seeds(a, b))
    diffs = np.subtract(a, b)
    assert verdict.outcome == outcome
    assert math.isclose(verdict.difference.mean, diffs.mean())
    if len(a) > 1:
        assert math.isclose(verdict.difference.std, diffs.std(ddof=1))


def test_judge_refuses_unknown_direction():
    with pytest.raises(ValueError, match="expect='>='"):
        stats.judge(stats.Compare("x", "a", "b", ">="), _seeds([1], [0]))


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
