"""Distributed training on CPU (gloo): topology detection, the batch split, torchrun equivalence and resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmtool.config import ConfigError
from lmtool.train.checkpoint import load_checkpoint
from lmtool.train.distributed import Topology, check_batch_split, detect_topology, refuse_multirun
from lmtool.train.loop import Trainer
from tests.helpers import SMOKE, compose_config

QUICK = (*SMOKE, "trainer.final_eval=false")

# fast weights carried across segments with FAVOR+ features redrawn at every forward from the global RNG,
# gradient accumulation, and an evaluation batch (3 streams) that two ranks split unevenly
DDP_CASE = (
    *QUICK, "model.carry_over=true", "model.pos_emb=false", "feature_map=favor", "model.dropout=0",
    "scheduler=constant", "trainer.batch_chunk=2", "trainer.eval_batch_size=3", "trainer.eval_interval=2",
    "trainer.log_interval=1", "trainer.num_threads=1",
)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def torchrun(args: list[str], cwd: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --standalone` (a free port) with `nproc` processes of `python -m lmtool.train`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "lmtool.train", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=os.environ.copy())


def test_detect_topology_from_torchrun_variables():
    """RANK/WORLD_SIZE/LOCAL_RANK describe a torchrun process; without them it is a single process."""
    assert detect_topology({}) == Topology(0, 1, 0, "single")
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "node0", "MASTER_PORT": "29500"}
    topology = detect_topology(env)
    assert topology == Topology(3, 4, 1, "torchrun")
    assert topology.distributed and not topology.is_main


def test_detect_topology_in_a_submitit_job(monkeypatch):
    """Inside a submitit job (here: a local one) rank, world size and local rank come from submitit."""
    for key, value in {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "77", "SUBMITIT_LOCAL_NTASKS": "2",
                       "SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_LOCALID": "1", "SUBMITIT_LOCAL_NODEID": "0",
                       "SUBMITIT_LOCAL_JOB_NUM_NODES": "1"}.items():
        monkeypatch.setenv(key, value)
    assert detect_topology() == Topology(1, 2, 1, "submitit")


def test_ranks_read_contiguous_slices_of_the_streams():
    """The streams of a global batch are cut into contiguous, disjoint slices in rank order."""
    assert [Topology(r, 4).stream_range(8) for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert [Topology(r, 2).stream_range(3) for r in range(2)] == [(0, 1), (1, 3)]  # evaluation may be uneven


@pytest.mark.parametrize(
    "override,message",
    [("trainer.batch_size=6", "divisible by the 4 processes"), ("trainer.batch_chunk=2", "batch_chunk=2"),
     ("trainer.eval_batch_size=2", "eval_batch_size=2")],
    ids=["global-batch", "chunks", "eval-batch"],
)
def test_batch_that_ranks_cannot_share_is_refused(tmp_path, override, message):
    """A global batch the processes cannot split equally fails with a one-line message before any work."""
    cfg = compose_config(*QUICK, "trainer.batch_size=4", override)
    with pytest.raises(ConfigError, match=message):
        check_batch_split(cfg.trainer, Topology(0, 4))
    with pytest.raises(ConfigError, match=message):
        Trainer(cfg, tmp_path / "run", Topology(0, 4))
    assert not (tmp_path / "run").exists()


def test_multirun_under_torchrun_is_refused(tmp_path):
    """`-m` under torchrun stops before any work with a message that points to the submitit launcher."""
    with pytest.raises(SystemExit, match="hydra/launcher=slurm"):
        refuse_multirun(["-m", "update_rule=sum,delta"])
    refuse_multirun(["update_rule=sum"])  # a single run is fine
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "9"}  # nothing listens there: the refusal must come before any rendezvous
    proc = subprocess.run(["lmtool-train", "-m", "update_rule=sum,delta"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "submitit" in proc.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_torchrun_two_processes_match_one_and_resume_exactly(tmp_path):
    """2 gloo processes splitting the global batch give one process's losses, in one shared run directory.

    The first torchrun launch trains 2 steps in Hydra's default (timestamped) run directory, which both ranks
    must share; the second resumes both ranks from its last.pt to step 4. Losses, validation included, match
    an uninterrupted single-process run: FAVOR+ redraws agree across ranks, the carried fast weights are saved
    for the whole batch and split again, and every rank's RNG state is restored.
    """
    single = tmp_path / "single"
    Trainer(compose_config(*DDP_CASE, "trainer.max_steps=4"), single).fit()

    cwd = tmp_path / "ddp"
    cwd.mkdir()
    first = torchrun([*DDP_CASE, "trainer.max_steps=2"], cwd)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dirs = [p for p in (cwd / "outputs").glob("*/*") if p.is_dir()]
    assert len(run_dirs) == 1, run_dirs  # one directory for both ranks, nothing stray
    assert sorted(p.name for p in cwd.iterdir()) == ["outputs"]
    run_dir = run_dirs[0]
    second = torchrun([*DDP_CASE, "trainer.max_steps=4", f"hydra.run.dir={run_dir}"], cwd)
    assert second.returncode == 0, second.stderr[-3000:]

    log = (run_dir / "train.log").read_text()
    assert log.count("resumed from") == 1  # rank 0 alone writes train.log
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert ckpt["step"] == 4 and len(ckpt["rng_per_rank"]) == 2
    assert all(s.shape[0] == 4 for s in ckpt["carried"]["layers"][0] if s is not None)  # the whole batch's fast weights
    expected, got = read_metrics(single), read_metrics(run_dir)
    assert [(r["step"], r["split"]) for r in got] == [(r["step"], r["split"]) for r in expected]
    for want, have in zip(expected, got, strict=True):
        assert have["loss"] == pytest.approx(want["loss"], rel=1e-5), (want, have)
