"""Sweeps and clusters: the SLURM preset's sbatch script, requeue on a submitit timeout, wandb per sweep job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lmtool.train.checkpoint import load_checkpoint
from tests.helpers import SMOKE

QUICK = (*SMOKE, "trainer.final_eval=false", "trainer.num_threads=1")

FAKE_SBATCH = """#!/bin/sh
cp "$1" "$FAKE_SLURM_DIR/sbatch_input.sh"
echo "Submitted batch job 123"
"""
FAKE_SACCT = """#!/bin/sh
echo "JobID|State|NodeList"
echo "123|FAILED|node1"
"""


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_slurm_preset_sbatch_script(tmp_path):
    """hydra/launcher=slurm submits one task per GPU with the time limit, requeue and the USR2 signal."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in {"sbatch": FAKE_SBATCH, "sacct": FAKE_SACCT, "srun": "#!/bin/sh\nexit 1\n",
                       "scancel": "#!/bin/sh\nexit 0\n"}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_SLURM_DIR": str(tmp_path)}
    args = ["lmtool-train", "-m", "hydra/launcher=slurm", "hydra.launcher.gpus_per_node=4",
            "hydra.launcher.timeout_min=90", "hydra.launcher.partition=gpu",
            "+hydra.launcher.additional_parameters.mail-type=END", *SMOKE, "hydra.sweep.dir=sweep"]
    # the fake cluster reports the job FAILED without running it, so the launcher gives up after submitting
    subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    script = (tmp_path / "sbatch_input.sh").read_text()
    for line in ("#SBATCH --gpus-per-node=4", "#SBATCH --ntasks-per-node=4", "#SBATCH --nodes=1",
                 "#SBATCH --time=90", "#SBATCH --partition=gpu", "#SBATCH --requeue", "#SBATCH --signal=USR2@120",
                 "#SBATCH --mail-type=END", "#SBATCH --cpus-per-task=8", "export OMP_NUM_THREADS=8"):
        assert line in script.splitlines(), (line, script)
    assert f"--output {tmp_path}/sweep/.submitit/%j/%j_%t_log.out" in script
    assert "submitit.core._submit" in script.splitlines()[-1]


def wait_for(condition, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{what}: not seen; launcher output:\n{proc.communicate()[0][-3000:]}")
        time.sleep(1)


@pytest.mark.slow
def test_submitit_timeout_requeues_ddp_job_that_resumes(tmp_path):
    """A 2-task DDP job signalled before its time limit saves last.pt, is requeued and resumes in its directory.

    submitit_local signals USR2 30 s before timeout_min=1: both ranks finish the same step, rank 0 saves and
    submitit requeues the job. The requeued job resumes from last.pt with the same wandb run; a SIGTERM then
    stops it cleanly (a finished job, so the launcher and the sweep summary complete).
    """
    args = ["lmtool-train", "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=1",
            "hydra.launcher.tasks_per_node=2", *QUICK, "trainer.max_steps=100000", "trainer.eval_interval=100000",
            "trainer.log_interval=5", "logger=wandb", "hydra.sweep.dir=sweep"]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    job_dir, submitit_dir = tmp_path / "sweep" / "0", tmp_path / "sweep" / ".submitit"
    log = job_dir / "train.log"

    def resumed_step() -> int | None:
        text = log.read_text() if log.exists() else ""
        return int(text.split("resumed from ")[1].split("at step ")[1].split()[0]) if "resumed from" in text else None

    wait_for(lambda: resumed_step() is not None, proc, 240, "a requeued job resuming")
    first = resumed_step()
    wait_for(lambda: read_metrics(job_dir)[-1]["step"] > first, proc, 120, "a training step after resuming")
    controller = next(int(p.name) for p in submitit_dir.iterdir() if p.name.isdigit())
    os.kill(controller, signal.SIGTERM)  # submitit's local controller forwards it to both tasks
    out = proc.communicate(timeout=180)[0]
    assert proc.returncode == 0, out[-3000:]

    logs = "".join(p.read_text() for p in submitit_dir.glob("*/*_0_log.*"))
    assert "Requeued job" in logs
    assert first > 0 and "checkpoint saved at step" in log.read_text()
    steps = [r["step"] for r in read_metrics(job_dir) if r["split"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] > first  # continued, nothing trained twice
    ckpt = load_checkpoint(job_dir / "checkpoints" / "last.pt")
    assert ckpt["step"] > first and len(ckpt["rng_per_rank"]) == 2  # both ranks of one DDP job
    runs = sorted((job_dir / "wandb").glob("offline-run-*"))
    assert len(runs) >= 2 and {p.name.rsplit("-", 1)[1] for p in runs} == {ckpt["wandb_run_id"]}
    assert OmegaConf.load(job_dir / "resolved_config.yaml").logger.group == "sweep"
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir()) == [".submitit", "0"]


@pytest.mark.slow
def test_multirun_jobs_each_get_a_wandb_run_grouped_by_sweep(tmp_path):
    """-m update_rule x feature_map runs four jobs, each in its directory with its own wandb run, and a summary."""
    args = ["lmtool-train", "-m", *QUICK, "trainer.max_steps=2", "update_rule=sum,delta", "feature_map=elu,dpfp",
            "logger=wandb", "hydra.sweep.dir=sweep"]
    proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = tmp_path / "sweep"
    ids = set()
    for job in ("0", "1", "2", "3"):
        ckpt = load_checkpoint(sweep / job / "checkpoints" / "last.pt")
        assert list((sweep / job / "wandb").glob(f"offline-run-*-{ckpt['wandb_run_id']}"))
        assert OmegaConf.load(sweep / job / "resolved_config.yaml").logger.group == "sweep"
        ids.add(ckpt["wandb_run_id"])
    assert len(ids) == 4
    table = (sweep / "summary.md").read_text().splitlines()
    assert len(table) == 6 and "update_rule=delta feature_map=dpfp" in table[-1]
