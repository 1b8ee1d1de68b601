"""Run outputs: metrics.jsonl (one JSON object per line) and, with logger=wandb, a wandb run.

metrics.jsonl describes one history. A run resumed from its checkpoint at step s first drops the rows that the
interrupted attempt wrote after that checkpoint (`truncate_history`), so every (step, split) appears once, with
the values of the history that continued. Readers (the sweep summary) go through `read_history`, which also
makes one history of a file written before that rule, or cut mid-line by a crash.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from lmtool.ops.registry import used_impls
from lmtool.train.rundir import replaced

log = logging.getLogger(__name__)


def perplexity_fields(loss: float, metric: str) -> dict:
    """`ppl` for word-level corpora, `bpc` (bits per character) for character-level ones."""
    if metric == "bpc":
        return {"bpc": loss / math.log(2)}
    return {"ppl": math.exp(min(loss, 50.0))}


def position(record: dict) -> tuple[int, int]:
    """Where a row falls in a run's history: its step, then within the step the training row, the periodic
    validation (written before that step's checkpoint), and last the final evaluation (after it)."""
    phase = 2 if record.get("final") else 0 if record.get("split") == "train" else 1
    return record["step"], phase


def _key(record: dict) -> tuple:
    return record["step"], record["split"], bool(record.get("final"))


def _parse(text: str) -> list[tuple[dict, str]]:
    """(row, line) of every readable line; a line cut short by a crash, or foreign, is skipped."""
    rows = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and "split" in record:
            rows.append((record, line))
    return rows


def _one_history(rows: list[tuple[dict, str]]) -> list[tuple[dict, str]]:
    """A row that repeats a kept (step, split) or comes before the last kept row starts a later attempt, which
    resumed before it: the kept rows from its position on belong to the attempt it replaced."""
    kept: list[tuple[dict, str]] = []
    keys: set[tuple] = set()
    for record, line in rows:
        if _key(record) in keys or (kept and position(record) < position(kept[-1][0])):
            kept = [(r, text) for r, text in kept if position(r) < position(record)]
            keys = {_key(r) for r, _ in kept}
        kept.append((record, line))
        keys.add(_key(record))
    return kept


def read_history(path: Path) -> list[dict]:
    """The rows of metrics.jsonl that describe one history (see the module docstring)."""
    text = path.read_text() if path.exists() else ""
    return [record for record, _ in _one_history(_parse(text))]


def truncate_history(path: Path, step: int) -> None:
    """Keep the rows of the history up to the checkpoint at `step` (0: none) and drop the rest: rows of later
    steps, and the final evaluation of `step` itself (it comes after the checkpoint and is done again). The file
    is replaced whole, and only if that changes it."""
    if not path.exists():
        return
    text = path.read_text()
    kept = "".join(line + "\n" for record, line in _one_history(_parse(text)) if position(record) <= (step, 1))
    if kept != text:
        with replaced(path, binary=False) as f:
            f.write(kept)


class MetricsWriter:
    """Appends records to <run dir>/metrics.jsonl and mirrors them to wandb (logger=wandb).

    The file first loses the rows after `resume_step`, the step the run starts from (`truncate_history`).
    `enabled=False` (ranks other than 0 of a distributed run) writes nothing and starts no wandb run. One
    wandb run per training job: `close` finishes it, so the jobs of a sweep run in one process each get theirs.
    A resumed wandb run is continued, not rewound: wandb takes only steps beyond those it has seen.
    """

    def __init__(self, run_dir: Path, cfg: Any, wandb_run_id: str | None = None, enabled: bool = True,
                 resume_step: int = 0) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.wandb = None
        self.wandb_run_id = wandb_run_id
        self.impls_recorded = False  # the first training row records the ops' forms that actually ran
        if enabled:
            truncate_history(self.path, resume_step)
        if enabled and cfg.logger.name == "wandb":
            self._start_wandb(run_dir, cfg)

    def _start_wandb(self, run_dir: Path, cfg: Any) -> None:
        import wandb  # only with logger=wandb: importing it costs seconds

        # never wait on a network that may not be there: no service start-up checks, no code upload
        os.environ.setdefault("WANDB_SILENT", "true")
        self.wandb_run_id = self.wandb_run_id or secrets.token_hex(4)
        self.wandb = wandb.init(
            project=cfg.logger.project,
            entity=cfg.logger.entity,
            group=cfg.logger.group,
            tags=list(cfg.logger.tags),
            mode=cfg.logger.mode,
            dir=str(run_dir),
            id=self.wandb_run_id,
            resume="allow",
            config=OmegaConf.to_container(cfg, resolve=True),
            settings=wandb.Settings(save_code=False, _disable_stats=True),
        )

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        if not self.impls_recorded and record.get("split") == "train" and used_impls():
            self.impls_recorded = True  # e.g. {"delta_rule": ["cuda"]}; ["chunk"] after a fallback
            record = {**record, "impls": used_impls()}
            log.info("fast-weight op forms in use: %s", record["impls"])
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            split = record.get("split", "train")
            values = {f"{split}/{k}": v for k, v in record.items() if k not in ("step", "split", "impls")}
            self.wandb.log(values, step=record["step"])

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
