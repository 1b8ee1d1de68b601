"""The recurrent fast weight programmers, the SRWM and the LSTM train from the CLI with carried state and evaluate
in carry mode."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.helpers import SMOKE
from tests.train.test_train import read_metrics, run_cli

MODELS = ("delta_mlp", "delta_delta", "delta_rnn", "delta_lstm", "rec_delta", "srwm", "lstm")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """One `lmtool-train -m debug=smoke` sweep over the seven models, each carrying its state across segments."""
    cwd = tmp_path_factory.mktemp("recurrent_fwp")
    proc = run_cli(["lmtool-train", "-m", *SMOKE, "trainer.final_eval=false", "model.carry_over=true",
                    "model.pos_emb=false", f"model={','.join(MODELS)}", "hydra.sweep.dir=sweep"], cwd)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return cwd / "sweep"


@pytest.mark.parametrize("job,model", list(enumerate(MODELS)), ids=MODELS)
def test_debug_smoke_trains_with_carried_state(sweep, job, model):
    """Each model trains its eight smoke steps with the state carried, logs finite losses and saves a checkpoint."""
    run_dir = sweep / str(job)
    assert f"name: {model}" in (run_dir / ".hydra" / "config.yaml").read_text()
    records = read_metrics(run_dir)
    train = [r for r in records if r["split"] == "train"]
    assert train and train[-1]["step"] == 8 and all(math.isfinite(r["loss"]) for r in records)
    assert (run_dir / "checkpoints" / "best.pt").is_file()


@pytest.mark.parametrize("model", ["delta_lstm", "lstm"])
def test_eval_in_carry_mode(sweep, model, tmp_path):
    """`lmtool-eval mode=carry` carries the fast matrices, recurrent output and cell over the whole valid split."""
    ckpt = sweep / str(MODELS.index(model)) / "checkpoints" / "best.pt"
    proc = run_cli(["lmtool-eval", f"checkpoint={ckpt}", "split=valid", "mode=carry", "batch_size=32"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((ckpt.parent / "best.eval-valid-carry.json").read_text())
    assert result["tokens"] > 70000 and math.isfinite(result["ppl"]) and result["ppl"] > 1
