"""Learning curves of run directories, for `lmtool-plot` and the sweep summary's summary.png.

A directory with a ``metrics.jsonl`` is a run; any other directory is searched one level down for runs (a sweep).
Each line is labelled by the run's command-line overrides (``.hydra/overrides.yaml``; the directory name when it
has none or they do not tell the runs apart). The y axis is perplexity (word-level corpora, log scale) or bits
per character (character-level ones); the x axis is the training step, the tokens trained on (``train_tokens``,
or step x batch x tgt_len for older runs), or the run's wall time (``elapsed_s``; older runs have none and are
left out of that plot, and `lmtool-plot` names them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from lmtool.train.metrics import read_history

X_AXES = {"step": "training step", "tokens": "training tokens", "time": "wall time (minutes)"}
SPLITS = ("train", "valid")
LEGEND_INSIDE_MAX = 8  # runs whose legend still fits inside a panel without hiding the curves
LINE_STYLES = ("-", "--", ":", "-.")


def job_order(job_dir: Path) -> str:
    """Sort key of a sweep's job directories: Hydra numbers them 0, 1, ..., 10, so by number, not as text."""
    return job_dir.name.zfill(8)


@dataclass
class Run:
    """One run directory: its label and its history (one row per step and split, see `read_history`)."""

    path: Path
    label: str
    history: list[dict] = field(default_factory=list)
    tokens_per_step: int | None = None  # batch x tgt_len, for histories without train_tokens

    @property
    def metric(self) -> str:
        return "bpc" if any("bpc" in r for r in self.history) else "ppl"

    def curve(self, split: str, x: str) -> tuple[list[float], list[float]]:
        """(x, y) of the split's rows during training (final evaluations excluded); empty where x is unknown."""
        xs, ys, metric = [], [], self.metric
        for r in self.history:
            if r["split"] != split or r.get("final") or metric not in r:
                continue
            value = self._x(r, x)
            if value is not None:
                xs.append(value)
                ys.append(r[metric])
        return xs, ys

    def _x(self, record: dict, x: str) -> float | None:
        if x == "step":
            return record["step"]
        if x == "tokens":
            if "train_tokens" in record:
                return record["train_tokens"]
            return None if self.tokens_per_step is None else record["step"] * self.tokens_per_step
        return record["elapsed_s"] / 60 if "elapsed_s" in record else None


def find_runs(paths: list[Path]) -> list[Path]:
    """Run directories named by `paths`: each path itself if it holds metrics.jsonl, else its sub-directories that
    do (a sweep, in job order)."""
    runs = []
    for path in paths:
        if not path.is_dir():
            raise SystemExit(f"lmtool-plot: {path} is not a directory; give run or sweep directories")
        if (path / "metrics.jsonl").is_file():
            runs.append(path)
            continue
        jobs = [p for p in path.iterdir() if (p / "metrics.jsonl").is_file()]
        if not jobs:
            raise SystemExit(f"lmtool-plot: {path} holds no metrics.jsonl, nor do its sub-directories")
        runs += sorted(jobs, key=job_order)
    return runs


def load_runs(paths: list[Path]) -> list[Run]:
    """The runs with their histories, each labelled by the overrides that set it apart from the others (all of
    them for a single run; the directory name where that leaves nothing or two runs share a label)."""
    runs, overrides = [], []
    for path in paths:
        overrides_file = path / ".hydra" / "overrides.yaml"
        given = [str(o) for o in OmegaConf.load(overrides_file)] if overrides_file.is_file() else []
        overrides.append([o for o in given if not o.startswith("hydra.")])
        run = Run(path, "", read_history(path / "metrics.jsonl"))
        config = path / "resolved_config.yaml"
        if config.is_file():
            trainer = OmegaConf.load(config).get("trainer", {})
            if "batch_size" in trainer and "tgt_len" in trainer:
                run.tokens_per_step = int(trainer.batch_size) * int(trainer.tgt_len)
        runs.append(run)
    shared = set.intersection(*(set(o) for o in overrides)) if len(runs) > 1 else set()
    for run, given in zip(runs, overrides, strict=True):
        run.label = " ".join(o for o in given if o not in shared) or run.path.name
    labels = [r.label for r in runs]
    for run in runs:
        if labels.count(run.label) > 1:
            run.label = f"{run.path.name}: {run.label}"
    return runs


def line_look(i: int) -> dict:
    """Colour and line style of the i-th run: matplotlib's 10 colours, then the same colours with the next line
    style for each further ten runs, so that 40 runs look all different."""
    return {"color": f"C{i % 10}", "linestyle": LINE_STYLES[i // 10 % len(LINE_STYLES)]}


def plot_runs(runs: list[Run], out: Path, *, x: str = "step", splits: tuple[str, ...] = SPLITS) -> list[str]:
    """Draw one panel per split with one line per run into `out` (PNG); returns the labels of the runs left out
    because their history has no such x axis (runs from before lmtool logged it)."""
    import matplotlib  # only plotting needs it, and importing it costs about a second

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = {r.metric for r in runs}
    metric = metrics.pop() if len(metrics) == 1 else "ppl"
    many = len(runs) > LEGEND_INSIDE_MAX  # a long legend goes beside the panel instead of over the curves
    fig, axes = plt.subplots(1, len(splits), figsize=((6 + 3 * many) * len(splits), 4.2), squeeze=False)
    skipped = set()
    for ax, split in zip(axes[0], splits, strict=True):
        for i, run in enumerate(runs):
            xs, ys = run.curve(split, x)
            if not xs:
                if run.curve(split, "step")[0]:  # rows, but without this axis (a run from before it was logged)
                    skipped.add(run.label)
                continue
            ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=run.label, **line_look(i))
        ax.set_xlabel(X_AXES[x])
        ax.set_ylabel("perplexity" if metric == "ppl" else "bits per character")
        if metric == "ppl":
            ax.set_yscale("log")
        ax.set_title(split)
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7, **({"loc": "upper left", "bbox_to_anchor": (1.01, 1.0)} if many else {}))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return sorted(skipped)
