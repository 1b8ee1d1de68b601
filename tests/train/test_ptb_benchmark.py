"""scripts/ptb_benchmark.sh runs its two sweeps and writes the benchmark table and plot (a relaunch resumes each job
through the training loop's own resume, tested in tests/train)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from tests.helpers import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "ptb_benchmark.sh"
SUBSET = {"MODELS_2021": "ptb_delta_network", "SEEDS_2021": "1,2", "MODELS_LATER": "ptb_lstm"}  # 3 smoke jobs


def test_benchmark_tables_every_family(tmp_path):
    """Each family is one row (the 2021 ones over two seeds, with a spread) and the plot is written."""
    command = ["bash", str(SCRIPT), "bench", "all", "debug=smoke", "trainer.eval_batch_size=64"]
    proc = subprocess.run(command, cwd=tmp_path, env={**os.environ, **SUBSET}, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bench = tmp_path / "bench"
    table = (bench / "benchmark.md").read_text()
    rows = {m.group(1): line for line in table.splitlines() if (m := re.match(r"\| `([^`]+)` \|", line))}
    assert set(rows) == {"ptb_delta_network", "ptb_lstm"}
    assert "| 1, 2 |" in rows["ptb_delta_network"] and "±" in rows["ptb_delta_network"]
    assert "| 0 |" in rows["ptb_lstm"]  # no unfinished job
    assert (bench / "benchmark.png").stat().st_size > 0
    assert len(list(bench.glob("*/*/metrics.jsonl"))) == 3


def test_table_lists_jobs_in_sweep_order(tmp_path):
    """Job 10 comes after job 9, not after job 1, so families keep the order of the sweep's experiment list."""
    module = load_script("ptb_benchmark_table")
    for part, count in (("2021", 12), ("later", 3)):
        for job in range(count):
            (tmp_path / part / str(job) / ".hydra").mkdir(parents=True)
            (tmp_path / part / str(job) / ".hydra" / "overrides.yaml").write_text("[]\n")
    names = [f"{p.parent.name}/{p.name}" for p in module.job_dirs(tmp_path)]
    assert names == [f"2021/{j}" for j in range(12)] + [f"later/{j}" for j in range(3)]
