"""Retrieval training end to end, and the lmtool-retrieval sweep with its CSV, figure and resume."""

from __future__ import annotations

import csv
import os
import subprocess
from pathlib import Path

import pytest
import torch

from lmtool.config import RetrievalRunConfig
from lmtool.train.retrieval import train_memory


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one thread is several times faster than two on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_small_capacity_task_is_solved():
    """A DPFP sum-rule memory stores 8 associations (well under d_dot = 32) to the paper's 0.001 loss."""
    row = train_memory("capacity", 8, "sum/dpfp1", RetrievalRunConfig(d_key=16, max_steps=3000))
    assert row["stop"] == "solved" and row["best_loss"] <= 1e-3 and row["d_dot"] == 32


def test_sum_rule_cannot_update_but_delta_rule_can():
    """Setting 2 with repeated keys: in the same budget the delta rule gets far below the sum rule."""
    run = RetrievalRunConfig(d_key=16, max_steps=400, eval_interval=100)
    sum_row = train_memory("update", 6, "sum/dpfp1", run)
    delta_row = train_memory("update", 6, "delta/dpfp1", run)
    assert delta_row["best_loss"] < 0.3 * sum_row["best_loss"]


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["lmtool-retrieval", *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=os.environ.copy()
    )


def test_sweep_writes_csv_and_png_and_resumes(tmp_path):
    """Two workers fill one CSV row per (memory, S) and draw the figure; a rerun finds nothing left to do."""
    args = [
        "setting=update", "setting.sizes=[4,6]", "setting.memories=[sum/elu,delta/dpfp1]", "workers=2",
        "run.d_key=8", "run.max_steps=200", f"out_dir={tmp_path / 'out'}",
    ]
    proc = run_cli(args, tmp_path)
    assert proc.returncode == 0, proc.stderr
    with (tmp_path / "out" / "retrieval_update.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["memory"], int(r["n_symbols"])) for r in rows) == [
        ("delta/dpfp1", 4), ("delta/dpfp1", 6), ("sum/elu", 4), ("sum/elu", 6)
    ]
    assert all(0.0 <= float(r["best_loss"]) <= 0.5 + 1e-6 for r in rows)
    assert (tmp_path / "out" / "retrieval_update.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = run_cli(args, tmp_path)
    assert again.returncode == 0 and "0 runs to do, 4 already" in again.stdout + again.stderr


def test_bad_memory_name_fails_before_any_run(tmp_path):
    """A misspelled memory ends with one line naming the accepted forms, and no CSV is written."""
    proc = run_cli(["setting.memories=[sum/dpfb1]", f"out_dir={tmp_path}"], tmp_path)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("lmtool-retrieval: unknown retrieval memory")
    assert not list(tmp_path.glob("*.csv"))
