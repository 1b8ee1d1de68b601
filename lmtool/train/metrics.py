"""Run outputs: metrics.jsonl (one JSON object per line) and, with logger=wandb, a wandb run."""

from __future__ import annotations

import json
import math
import os
import secrets
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf


def perplexity_fields(loss: float, metric: str) -> dict:
    """`ppl` for word-level corpora, `bpc` (bits per character) for character-level ones."""
    if metric == "bpc":
        return {"bpc": loss / math.log(2)}
    return {"ppl": math.exp(min(loss, 50.0))}


class MetricsWriter:
    """Appends records to <run dir>/metrics.jsonl and mirrors them to wandb (logger=wandb).

    `enabled=False` (ranks other than 0 of a distributed run) writes nothing and starts no wandb run. One
    wandb run per training job: `close` finishes it, so the jobs of a sweep run in one process each get theirs.
    """

    def __init__(self, run_dir: Path, cfg: Any, wandb_run_id: str | None = None, enabled: bool = True) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.wandb = None
        self.wandb_run_id = wandb_run_id
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
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            split = record.get("split", "train")
            values = {f"{split}/{k}": v for k, v in record.items() if k not in ("step", "split")}
            self.wandb.log(values, step=record["step"])

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
