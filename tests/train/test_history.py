"""metrics.jsonl keeps one history across interruptions, and the sweep summary reads that history."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from lmtool.train.metrics import read_history, truncate_history
from lmtool.train.sweep import write_summary


def row(step: int, split: str = "train", loss: float = 1.0, **extra) -> dict:
    return {"step": step, "split": split, "loss": loss, **extra}


def write_rows(path: Path, rows: list[dict], tail: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def keys(rows: list[dict]) -> list[tuple]:
    return [(r["step"], r["split"], r["loss"], bool(r.get("final"))) for r in rows]


# a finished run: train rows every 2 steps, validation (and a checkpoint) every 4, the final evaluation at 8
FINISHED = [row(2), row(4), row(4, "valid"), row(6), row(8), row(8, "valid"), row(8, "valid", final=True),
            row(8, "test", final=True)]


def test_resume_keeps_the_rows_up_to_the_checkpoint(tmp_path):
    """Resuming at step s keeps every row of steps <= s but the final evaluation (it follows the checkpoint and
    is done again), drops later rows and a line cut short by a crash, and replaces the file whole."""
    path = tmp_path / "metrics.jsonl"
    write_rows(path, FINISHED, tail='{"step": 10, "spl')
    truncate_history(path, 8)
    assert keys(read_history(path)) == keys(FINISHED[:6])
    assert path.read_text().endswith("\n") and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
    inode = path.stat().st_ino
    truncate_history(path, 8)
    assert path.stat().st_ino == inode  # nothing to drop: the file is left alone
    truncate_history(path, 4)
    assert keys(read_history(path)) == keys(FINISHED[:3])
    truncate_history(path, 0)  # a fresh start (no checkpoint): the dead attempt's rows go
    assert path.read_text() == ""


def test_reader_makes_one_history_of_several_attempts(tmp_path):
    """A file that holds an interrupted attempt and its continuation (as written before rows were dropped on
    resume) reads as the history that continued; so does a finished run evaluated twice."""
    path = tmp_path / "metrics.jsonl"
    dead = [row(2), row(4), row(4, "valid"), row(6, loss=6.0), row(8, loss=8.0)]  # killed before checkpoint 8
    resumed = [row(6, loss=0.6), row(8, loss=0.8), row(8, "valid", loss=0.8)]
    write_rows(path, dead + resumed)
    assert keys(read_history(path)) == keys(dead[:3] + resumed)
    again = [row(8, "valid", loss=0.5, final=True), row(8, "test", loss=0.5, final=True)]
    write_rows(path, FINISHED + again)
    assert keys(read_history(path)) == keys(FINISHED[:6] + again)


def test_sweep_summary_reads_one_history_and_the_last_validation(tmp_path):
    """A resumed sweep job's summary row shows the continuing history's last step and its latest validation."""
    job = tmp_path / "0"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("- update_rule=sum\n")
    dead = [row(2), row(4), row(4, "valid", loss=4.0), row(6), row(8), row(8, "valid", loss=3.0), row(10)]
    resumed = [row(6), row(8), row(8, "valid", loss=2.0)]
    write_rows(job / "metrics.jsonl", dead + resumed, tail='{"step": 10, "split": "tr')
    (summary,) = write_summary(tmp_path)
    assert summary["step"] == 8 and summary["valid_loss"] == 2.0 and summary["overrides"] == "update_rule=sum"
    with (tmp_path / "summary.csv").open(newline="") as f:
        assert next(csv.DictReader(f))["valid_loss"] == "2.0"
    assert "| 0 | update_rule=sum | 8 | 2.0 |" in (tmp_path / "summary.md").read_text()
