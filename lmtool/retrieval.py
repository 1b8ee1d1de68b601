"""`lmtool-retrieval setting=capacity|update`: the paper's synthetic retrieval sweeps, a CSV and a figure.

For every memory of `setting.memories` and every number of keys S of the grid, train one memory with
`lmtool.train.retrieval.train_memory` (runs in parallel, `workers` processes of one CPU thread each) and
append its row to `<out_dir>/retrieval_<setting>.csv` as soon as it finishes; then plot the best evaluation
loss against S, one line per memory, to `<out_dir>/retrieval_<setting>.png`. Rerunning into the same
`out_dir` skips the (memory, S) pairs already in the CSV with the same run config, so an interrupted sweep
loses at most the runs in flight. docs/retrieval.md shows both settings.
"""

from __future__ import annotations

import csv
import hashlib
import json
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from lmtool.config import ConfigError, RetrievalRunConfig, register_configs, validate
from lmtool.models.retrieval import parse_memory
from lmtool.train.retrieval import train_memory

register_configs()

COLUMNS = (
    "setting", "memory", "n_symbols", "d_dot", "best_loss", "final_loss", "steps", "best_step", "stop", "seconds",
    "run_config",
)


def grid_sizes(cfg: Any) -> list[int]:
    """The numbers of keys S to run: `setting.sizes`, or 20, 40, ... up to `setting.paper_max_size`."""
    if cfg.grid == "paper":
        return list(range(20, cfg.setting.paper_max_size + 1, 20))
    return sorted(set(cfg.setting.sizes))


MAX_STEPS = {"paper": 100_000, "default": 3_000}  # run.max_steps=null: the grid's (see docs/retrieval.md)


def run_config(cfg: Any) -> RetrievalRunConfig:
    """The run config of every run of the sweep, with `max_steps` resolved for the grid."""
    run = RetrievalRunConfig(**OmegaConf.to_container(cfg.run)) if isinstance(cfg.run, DictConfig) else cfg.run
    if run.max_steps is None:
        run = replace(run, max_steps=MAX_STEPS[cfg.grid])
    return run


def check_options(cfg: Any) -> None:
    """Refuse a bad sweep before any run starts, with a one-line ConfigError."""
    validate(cfg)
    for memory in cfg.setting.memories:
        try:
            parse_memory(memory)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    sizes = grid_sizes(cfg)
    if not sizes or min(sizes) < 2:
        raise ConfigError(f"the grid of S must hold numbers of keys >= 2, got {sizes}")
    if not cfg.setting.memories:
        raise ConfigError("setting.memories is empty: name at least one memory, e.g. [sum/dpfp1,softmax]")
    if cfg.workers < 1:
        raise ConfigError(f"workers must be at least 1, got {cfg.workers}")


def run_fingerprint(run: RetrievalRunConfig) -> str:
    """Short hash of the run config: CSV rows count as done only for the same config."""
    return hashlib.sha256(json.dumps(asdict(run), sort_keys=True).encode()).hexdigest()[:12]


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def append_row(path: Path, row: dict) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow({key: row[key] for key in COLUMNS})


def _one_thread() -> None:
    torch.set_num_threads(1)


def run_sweep(cfg: Any, out_dir: Path, log=print) -> Path:
    """Run the missing (memory, S) pairs of the sweep, append their rows, plot; returns the CSV path."""
    setting = cfg.setting.name
    run = run_config(cfg)
    fingerprint = run_fingerprint(run)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / f"retrieval_{setting}.csv"
    rows = [r for r in read_rows(csv_path) if r["run_config"] == fingerprint]
    done = {(r["memory"], int(r["n_symbols"])) for r in rows}
    jobs = [
        (setting, s, memory, run)
        for memory in cfg.setting.memories
        for s in grid_sizes(cfg)
        if (memory, s) not in done
    ]
    jobs.sort(key=lambda job: -job[1])  # longest first, so the pool does not end on one long run
    log(f"retrieval {setting}: {len(jobs)} runs to do, {len(done)} already in {csv_path}")
    for row in _run_all(jobs, cfg.workers):
        row["run_config"] = fingerprint
        append_row(csv_path, row)
        rows.append(row)
        log(
            f"{row['memory']:>12} S={row['n_symbols']:<4} best loss {row['best_loss']:.5f} after "
            f"{row['steps']} steps ({row['stop']}, {row['seconds']:.0f} s)"
        )
    png = plot_losses(rows, out_dir / f"retrieval_{setting}.png", setting, cfg.setting.log_y, cfg.setting.memories)
    log(f"wrote {csv_path} and {png}")
    return csv_path


def _run_all(jobs: list, workers: int):
    if workers == 1:
        _one_thread()
        yield from (train_memory(*job) for job in jobs)
        return
    context = multiprocessing.get_context("spawn")  # no fork of a process that already runs torch threads
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_one_thread) as pool:
        futures = [pool.submit(train_memory, *job) for job in jobs]
        for future in as_completed(futures):
            yield future.result()


def plot_losses(rows: list[dict], path: Path, setting: str, log_y: bool, memories=()) -> Path:
    """Best evaluation loss against the number of keys S, one line per memory (the paper's Figures 2 and 5),
    in the order of `memories`, then any other memory of the CSV."""
    import matplotlib  # only the figures need it, and importing it costs about a second

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    in_csv = [r["memory"] for r in rows]
    for memory in dict.fromkeys([*(m for m in memories if m in in_csv), *in_csv]):
        points = sorted((int(r["n_symbols"]), float(r["best_loss"])) for r in rows if r["memory"] == memory)
        d_dot = next(r["d_dot"] for r in rows if r["memory"] == memory)
        label = memory if memory == "softmax" else f"{memory} (d_dot {d_dot})"
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, label=label)
    ax.set_xlabel("number of unique keys S")
    ax.set_ylabel("best evaluation loss")
    ax.set_title(f"associative retrieval, setting {'1 (capacity)' if setting == 'capacity' else '2 (update)'}")
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@hydra.main(config_path="pkg://lmtool.conf", config_name="retrieval", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        check_options(cfg)
    except ConfigError as err:
        sys.exit(f"lmtool-retrieval: {err}")
    out_dir = Path(cfg.out_dir) if cfg.out_dir is not None else Path(HydraConfig.get().runtime.output_dir)
    run_sweep(cfg, out_dir)


def main() -> None:
    """Console script `lmtool-retrieval`."""
    _hydra_main()


if __name__ == "__main__":
    main()
