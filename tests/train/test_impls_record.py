"""metrics.jsonl's first training row and the training log record which form each fast-weight op ran."""

from __future__ import annotations

import json
import logging

import torch
from omegaconf import OmegaConf

from lmtool.ops import delta_rule
from lmtool.train.metrics import MetricsWriter


def test_first_train_row_records_the_forms_that_ran(tmp_path, monkeypatch, caplog):
    """The first training row carries {"impls": {op: [forms]}} (and the log says so); later rows do not."""
    monkeypatch.setattr("lmtool.ops.registry._USED", {})
    writer = MetricsWriter(tmp_path, OmegaConf.create({"logger": {"name": "none"}}))
    writer.write({"step": 0, "split": "valid", "loss": 1.0})  # nothing ran yet, and not a training row
    x = torch.randn(1, 1, 4, 2)
    delta_rule(x, x, x, torch.rand(1, 1, 4))
    with caplog.at_level(logging.INFO, logger="lmtool.train.metrics"):
        for step in (1, 2):
            writer.write({"step": step, "split": "train", "loss": 1.0})
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "impls" not in rows[0] and "impls" not in rows[2]
    assert rows[1]["impls"] == {"delta_rule": ["chunk"]}
    assert "fast-weight op forms in use: {'delta_rule': ['chunk']}" in caplog.text
