"""scripts/ptb_benchmark.sh runs its two sweeps and writes the benchmark table and plot (a relaunch resumes each job
through the training loop's own resume, tested in tests/train)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

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
