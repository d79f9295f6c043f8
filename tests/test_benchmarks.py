"""`make bench` keeps working: each benchmark runs end to end at toy sizes and writes the
JSON its closing-note figures come from. No timing is asserted (figures live in
benchmarks/results, measured by `make bench`); only that the measured quantities exist and
the exact ones (all-to-all bytes) are right."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script: str, out, *args: str, timeout: int = 300) -> dict:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("XLA_FLAGS", None)  # each script sets up its own devices
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", script), f"--out={out}", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out) as f:
        return json.load(f)


@pytest.mark.parametrize(
    "script, args",
    [
        pytest.param(
            "moe_layer.py",
            [
                "--tokens=256",
                "--d_model=16",
                "--d_hidden=32",
                "--runs=1",
                "--einsum_dropless_group=32",
            ],
            marks=pytest.mark.slow,  # the suite's time budget; every dispatch compiles
        ),
        (
            "expert_parallel.py",
            ["--batch=8", "--length=16", "--d_model=16", "--d_hidden=32", "--runs=0"]
            + ["--meshes=2x4"],
        ),
    ],
    ids=["moe_layer", "expert_parallel"],
)
def test_benchmark_runs_at_toy_size(script, args, tmp_path):
    result = _run(script, tmp_path / "result.json", *args)
    rows = result["rows"]
    assert len(rows) >= 3
    if script == "expert_parallel.py":
        # length 16: cf * S * K / E is a whole number of slots for cf 1 and 1.25 (no rounding).
        by_mode = {(r["mesh"], r["mode"]): r for r in rows}
        for mesh, n in (("2x4", 4),):
            for mode, ratio in (("cf 1.0", 1.0), ("cf 1.25", 1.25), ("dropless a2a", 8 / 2)):
                row = by_mode[mesh, mode]
                assert row["collectives"]["all-to-all"] == 2 and row["bytes_ratio"] == ratio
            ring = by_mode[mesh, "dropless ring"]
            assert ring["collectives"]["all-to-all"] == 0
            # All-gather and reduce-scatter of every token: 2 (n - 1) x N x D, against the
            # minimum 2 (n - 1) / n x N x K x D: n / K. Every device routes the gathered
            # tokens itself, so no choices cross (token routing, no padding).
            tokens = 8 * 16 // 8
            assert ring["bytes_sent_per_device"] == (n - 1) * tokens * 2 * 16 * 4
            assert ring["bytes_ratio"] == n / 2
            ragged = by_mode[mesh, "dropless ragged"]
            assert 0 < ragged["bytes_ratio"] < 2 and ragged["bytes_source"] == "estimate"
            assert by_mode[mesh, "cf 1.0"]["bytes_source"] == "compiled HLO"
    else:
        assert all(r["seconds"] > 0 and r["peak_bytes"] > 0 for r in rows)


@pytest.mark.slow  # ~1 min: builds and compiles both default-size models
def test_train_step_benchmark_runs(tmp_path):
    result = _run("train_step.py", tmp_path / "result.json", "--runs=1", "--steps=2", "--warmup=1")
    assert set(result["results"]) == {"moe", "moe_dropless", "dense"}
    for entry in result["results"].values():
        assert entry["step_seconds_median"] > 0 and entry["compile_seconds"] > 0
        assert entry["mesh"] == {"data": 2, "expert": 4}  # the default config's mesh
    assert result["ratio_moe_over_dense"] > 0 and result["ratio_dropless_over_capacity"] > 0


@pytest.mark.slow  # builds the embedded datasets' pipelines at full size
def test_input_pipeline_benchmark_runs(tmp_path):
    result = _run(
        "input_pipeline.py",
        tmp_path / "result.json",
        "--runs=1",
        "--steps=5",
        "--warmup_steps=1",
        "--resume_step=1000",
        "--step_runs=1",
        "--step_steps=1",
    )
    assert result["train_examples_per_s_median"] > 0
    assert result["consumed_source"] == "measured train step"
    assert result["target_examples_per_s"] == 10 * result["consumed_examples_per_s"] > 0


@pytest.mark.slow  # ~3 min: trains both variants briefly, extracts one task of each
def test_extraction_benchmark_runs(tmp_path):
    result = _run(
        "extraction.py",
        tmp_path / "result.json",
        "--steps=8",
        "--tasks=iris",
        "--runs=1",
        "--calls=1",
        f"--workdir={tmp_path / 'runs'}",
        timeout=900,
    )
    assert set(result["variants"]) == {"mod_squad", "task"}
    for variant in result["variants"].values():
        (row,) = variant["tasks"]
        assert row["task"] == "iris" and 0 < row["params_ratio"] < 1
        assert row["speedup"] > 0 and row["peak_bytes"]["extracted"] > 0
    task_row = result["variants"]["task"]["tasks"][0]
    assert set(task_row["kept_experts"].values()) == {2}  # top-k of the task's routing row


@pytest.mark.slow  # a short evolution of one task
def test_evolution_benchmark_runs(tmp_path):
    result = _run(
        "evolution.py",
        tmp_path / "result.json",
        "--runs=1",
        "--steps=2",
        "--tasks=1",
        "--set=evolve.steps=4",
        "--set=evolve.generations=1",
        "--set=evolve.children=2",
    )
    assert result["step_ratio_child_over_plain"] > 0
    assert result["step_ratio_frozen_over_all_trainable"] > 0
    assert [g["generation"] for g in result["generations"]] == [0]
    assert result["generations"][0]["compiles"] >= 1


@pytest.mark.slow  # two short evolutions of two tasks
def test_expert_cloning_benchmark_runs(tmp_path):
    result = _run(
        "expert_cloning.py",
        tmp_path / "result.json",
        "--tasks=2",
        "--set=evolve.steps=4",
        "--set=evolve.generations=1",
        "--set=evolve.children=2",
        timeout=900,
    )
    for mode in ("whole-block", "experts"):
        (run,) = result["runs"][mode]
        assert [row["task"] for row in run["tasks"]] == ["digits/class", "iris"]
        assert all(row["params_added"] > 0 for row in run["tasks"])  # a head at least
        assert all(row["moe_params_added"] <= row["params_added"] for row in run["tasks"])
