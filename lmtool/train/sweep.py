"""Sweep summary: after `lmtool-train -m ...`, one table of every job's overrides and final metrics."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf


def job_summary(job_dir: Path) -> dict[str, Any]:
    """Overrides, last step, training time and final (or last) valid/test metrics of one run directory."""
    overrides_file = job_dir / ".hydra" / "overrides.yaml"
    overrides = OmegaConf.load(overrides_file) if overrides_file.exists() else []
    row: dict[str, Any] = {"job": job_dir.name, "overrides": " ".join(overrides)}
    metrics = job_dir / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    for record in records:
        split = record["split"]
        if split == "train":
            row["step"] = record["step"]
        elif split in ("valid", "test") and (record.get("final") or f"{split}_loss" not in row):
            row[f"{split}_loss"] = round(record["loss"], 4)
            for metric in ("ppl", "bpc"):
                if metric in record:
                    row[f"{split}_{metric}"] = round(record[metric], 3)
    return row


def write_summary(sweep_dir: Path) -> list[dict[str, Any]]:
    """Write summary.csv and summary.md into `sweep_dir`, one row per job directory, and return the rows."""
    jobs = sorted((p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir()), key=lambda p: p.name.zfill(8))
    rows = [job_summary(p) for p in jobs]
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with (sweep_dir / "summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    (sweep_dir / "summary.md").write_text("\n".join(lines) + "\n")
    return rows


class SweepSummary(Callback):
    """Hydra callback: writes the sweep summary when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if sweep_dir.is_dir():
            rows = write_summary(sweep_dir)
            print(f"sweep summary of {len(rows)} jobs: {sweep_dir / 'summary.md'}")
