"""Sweep summary: after `lmtool-train -m ...`, one table of every job's overrides and final metrics, and a plot
of their learning curves (summary.png, as `lmtool-plot SWEEP_DIR` draws it)."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from lmtool.train.curves import job_order, load_runs, plot_runs
from lmtool.train.metrics import read_history
from lmtool.train.rundir import replaced


def job_summary(job_dir: Path) -> dict[str, Any]:
    """Overrides, last step, and the final (or else the last) valid/test metrics of one run directory.

    The rows come from one history (`read_history`): a job that was interrupted and resumed shows the values of
    the history that continued, not a mix with the attempt it replaced.
    """
    overrides_file = job_dir / ".hydra" / "overrides.yaml"
    overrides = OmegaConf.load(overrides_file) if overrides_file.exists() else []
    row: dict[str, Any] = {"job": job_dir.name, "overrides": " ".join(overrides)}
    final_seen: set[str] = set()
    for record in read_history(job_dir / "metrics.jsonl"):
        split = record["split"]
        if split == "train":
            row["step"] = record["step"]
        elif split in ("valid", "test") and (record.get("final") or split not in final_seen):
            if record.get("final"):
                final_seen.add(split)
            row[f"{split}_loss"] = round(record["loss"], 4)
            for metric in ("ppl", "bpc"):
                if metric in record:
                    row[f"{split}_{metric}"] = round(record[metric], 3)
    return row


def write_summary(sweep_dir: Path) -> list[dict[str, Any]]:
    """Write summary.csv and summary.md into `sweep_dir`, one row per job directory, and summary.png (the jobs'
    learning curves); return the rows.

    Each file is replaced whole, so a reader never sees half a table.
    """
    jobs = sorted((p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir()), key=job_order)
    rows = [job_summary(p) for p in jobs]
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with replaced(sweep_dir / "summary.csv", binary=False) as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    with replaced(sweep_dir / "summary.md", binary=False) as f:
        f.write("\n".join(lines) + "\n")
    with_metrics = [p for p in jobs if (p / "metrics.jsonl").is_file()]
    if with_metrics:
        try:
            plot_runs(load_runs(with_metrics), sweep_dir / "summary.png")
        except Exception as err:  # a figure must never fail the sweep whose runs are done
            warnings.warn(f"sweep summary: summary.png not drawn ({err})", stacklevel=2)
    return rows


class SweepSummary(Callback):
    """Hydra callback: writes the sweep summary when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if sweep_dir.is_dir():
            rows = write_summary(sweep_dir)
            print(f"sweep summary of {len(rows)} jobs: {sweep_dir / 'summary.md'}")
