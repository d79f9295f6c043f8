"""Every script in launch/ with fake gcloud, srun, sbatch and python on PATH that record
their arguments: the commands each script runs, and --dry-run prints them and runs none."""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TRAIN = "python -m multitask_moe.train --config=configs/default.py --workdir=gs://b/run1"

# Records its name, arguments and SLURM_* environment as one JSON line; answers the two
# gcloud questions the scripts ask (the queued resource is ACTIVE, the TPU VM is absent).
FAKE = r"""#!{python}
import json, os, sys
name = os.path.basename(sys.argv[0])
env = {{k: v for k, v in os.environ.items() if k.startswith("SLURM_")}}
with open({log!r}, "a") as f:
    f.write(json.dumps({{"cmd": name, "args": sys.argv[1:], "env": env}}) + "\n")
if name == "gcloud" and "describe" in sys.argv:
    if "queued-resources" in sys.argv:
        print("ACTIVE")
    else:
        sys.exit(1)
if name == "sbatch":  # run the batch script as SLURM would, on node 0 of 2
    env = {{**os.environ, "SLURM_JOB_ID": "7", "SLURM_NTASKS": "16", "SLURM_PROCID": "0",
           "SLURM_LOCALID": "0", "SLURM_STEP_NODELIST": "n[0-1]", "SLURM_SUBMIT_DIR": os.getcwd()}}
    os.execvpe("bash", ["bash", *sys.argv[1:]], env)
"""


@pytest.fixture
def fakes(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.jsonl"
    for name in ("gcloud", "srun", "sbatch", "python"):
        path = bin_dir / name
        path.write_text(FAKE.format(python=sys.executable, log=str(log)))
        path.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PYTHON": str(bin_dir / "python"),
        "WORKDIR": "gs://b/run1",
        "TPU_NAME": "mtm",
        "ZONE": "us-central2-b",
        "ACCELERATOR": "v4-32",
        "QR_NAME": "mtm-qr",
    }

    def run(*argv):
        result = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
        calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        log.unlink(missing_ok=True)
        return calls, result.stdout

    return run


def _remote_command(call) -> str:
    (flag,) = [a for a in call["args"] if a.startswith("--command=")]
    return flag.removeprefix("--command=")


def test_tpu_vm_creates_copies_and_trains_on_every_worker(fakes):
    calls, _ = fakes("bash", "launch/tpu_vm.sh", "--config.num_train_steps=7")
    gcloud = [c["args"] for c in calls if c["cmd"] == "gcloud"]
    assert gcloud[0][:5] == ["compute", "tpus", "tpu-vm", "describe", "mtm"]
    assert gcloud[1][:5] == ["compute", "tpus", "tpu-vm", "create", "mtm"]
    assert "--accelerator-type=v4-32" in gcloud[1]
    assert gcloud[2][3] == "scp" and "--worker=all" in gcloud[2]
    assert gcloud[3][3] == "ssh" and "--worker=all" in gcloud[3]
    remote = _remote_command(calls[3])
    assert remote.rstrip().endswith(f"{TRAIN} --config.num_train_steps=7")
    assert "uv pip install" in remote and "'.[tpu]'" in remote


def test_tpu_queued_resource_waits_then_runs_the_tpu_vm_script(fakes):
    calls, _ = fakes("bash", "launch/tpu_queued_resource.sh", "--spot", "--config.seed=3")
    gcloud = [c["args"] for c in calls if c["cmd"] == "gcloud"]
    assert gcloud[0][:4] == ["compute", "tpus", "queued-resources", "create"]
    assert "--spot" in gcloud[0] and "--node-id=mtm" in gcloud[0]
    assert gcloud[1][:4] == ["compute", "tpus", "queued-resources", "describe"]
    assert gcloud[-1][3] == "ssh"
    assert _remote_command(calls[-1]).rstrip().endswith(f"{TRAIN} --config.seed=3")


def test_multi_gpu_runs_one_process_with_the_arguments(fakes):
    calls, _ = fakes("bash", "launch/multi_gpu.sh", "--config.batch_size=32")
    assert [c["cmd"] for c in calls] == ["python"]
    assert calls[0]["args"] == shlex.split(TRAIN)[1:] + ["--config.batch_size=32"]


def test_slurm_runs_the_train_command_under_srun_with_slurm_variables(fakes):
    calls, _ = fakes("sbatch", "launch/slurm.sbatch", "--config.num_train_steps=9")
    assert [c["cmd"] for c in calls] == ["sbatch", "srun"]
    srun = calls[1]
    assert srun["args"][:3] == ["--kill-on-bad-exit=1", "bash", "-c"]
    assert srun["args"][3].endswith(f"{TRAIN} --config.num_train_steps=9")
    # The environment srun hands every task makes parallel.initialize() take the SLURM path.
    probe = subprocess.run(
        [sys.executable, "-c", "from multitask_moe.parallel import distributed as d; "
         "print(d.detect_cluster())"],
        env={**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")},
             **srun["env"]},
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert probe.stdout.strip() == "slurm", probe.stderr


@pytest.mark.parametrize(
    "script, runner",
    [
        ("launch/tpu_vm.sh", "bash"),
        ("launch/tpu_queued_resource.sh", "bash"),
        ("launch/multi_gpu.sh", "bash"),
        ("launch/slurm.sbatch", "bash"),
    ],
)
def test_dry_run_prints_the_commands_and_runs_none(fakes, script, runner):
    calls, out = fakes(runner, script, "--dry-run", "--config.seed=1")
    assert calls == []  # nothing ran, not even a describe
    lines = [line for line in out.splitlines() if line.startswith("+ ")]
    assert lines, out
    # The last command trains (ssh's remote command is one $'...' word, hence the quote).
    assert lines[-1].rstrip("'").endswith("--config.seed=1"), lines[-1]
    assert "--dry-run" not in lines[-1] and "multitask_moe.train" in lines[-1]
