"""End-to-end training on PTB: console scripts, run directory, exact resume, and failures with a clear message."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmtool.train.checkpoint import CheckpointError, load_checkpoint
from lmtool.train.loop import Trainer, TrainingDiverged
from tests.helpers import SMOKE, compose_config

QUICK = (*SMOKE, "trainer.final_eval=false")


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300, env=os.environ.copy())


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """`lmtool-train debug=smoke` through the console script, from a directory outside the repo."""
    cwd = tmp_path_factory.mktemp("elsewhere")
    proc = run_cli(["lmtool-train", "debug=smoke", "hydra.run.dir=run"], cwd)
    return cwd / "run", proc


def test_console_script_trains_and_reports(smoke_run):
    """debug=smoke trains from any directory and prints valid and test perplexity."""
    run_dir, proc = smoke_run
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "test ppl" in proc.stdout
    for name in (".hydra/config.yaml", "resolved_config.yaml", "train.log", "checkpoints/last.pt",
                 "checkpoints/best.pt"):
        assert (run_dir / name).is_file(), name


def test_metrics_jsonl_records(smoke_run):
    """metrics.jsonl holds train records with step, loss, ppl, lr, tokens/s and the final valid/test ones."""
    records = read_metrics(smoke_run[0])
    train = [r for r in records if r["split"] == "train"]
    assert train and {"step", "loss", "ppl", "lr", "tokens_per_s"} <= set(train[0])
    finals = {r["split"] for r in records if r.get("final")}
    assert finals == {"valid", "test"}
    # progress for lmtool-plot's axes: tokens trained on (batch 4 x 16 tokens per step) and wall time
    during = [r for r in records if not r.get("final")]
    assert all(r["train_tokens"] == r["step"] * 4 * 16 for r in during)
    times = [r["elapsed_s"] for r in during]
    assert times == sorted(times) and times[0] > 0


@pytest.mark.parametrize("x", ["step", "tokens", "time"])
def test_lmtool_plot_draws_a_run(smoke_run, x):
    """lmtool-plot draws train and valid curves of a run directory against steps, tokens or wall time."""
    run_dir, _ = smoke_run
    out = run_dir.parent / f"curves-{x}.png"
    proc = run_cli(["lmtool-plot", str(run_dir), "--x", x, "--out", str(out)], run_dir.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "warn" not in proc.stderr.lower()


def test_lmtool_plot_refuses_a_directory_without_runs(tmp_path):
    """A directory that holds no metrics.jsonl (nor do its sub-directories) is a one-line error."""
    proc = run_cli(["lmtool-plot", str(tmp_path)], tmp_path)
    assert proc.returncode != 0
    expected = f"lmtool-plot: {tmp_path} holds no metrics.jsonl, nor do its sub-directories"
    assert proc.stderr.strip().splitlines()[-1] == expected


def test_python_module_entry_point(tmp_path):
    """`python -m lmtool.train` composes the packaged config from any directory."""
    proc = run_cli([sys.executable, "-m", "lmtool.train", "--cfg", "job", "model=transformer"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "name: transformer" in proc.stdout


def test_misspelled_override_exits_nonzero(tmp_path):
    """A misspelled key fails before any work with Hydra's message and a non-zero exit status."""
    proc = run_cli(["lmtool-train", "trainer.max_step=3"], tmp_path)
    assert proc.returncode != 0
    assert "max_step" in proc.stderr
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("*.pt"))


def test_eval_cli_segment_and_carry(smoke_run, tmp_path):
    """lmtool-eval scores a checkpoint in segment and carry modes and writes JSON beside it."""
    ckpt = smoke_run[0] / "checkpoints" / "best.pt"
    for mode in ("segment", "carry"):
        proc = run_cli(["lmtool-eval", f"checkpoint={ckpt}", "split=valid", f"mode={mode}"], tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        result = json.loads((ckpt.parent / f"best.eval-valid-{mode}.json").read_text())
        assert result["tokens"] > 70000 and result["ppl"] > 1


def test_corrupt_checkpoint_is_reported_not_a_traceback(tmp_path):
    """A run directory whose last.pt is garbage stops with a one-line message, not a traceback."""
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint")
    proc = run_cli(["lmtool-train", *QUICK, "hydra.run.dir=run"], tmp_path)
    assert proc.returncode != 0
    assert "corrupt" in proc.stderr and "Traceback" not in proc.stderr


def interrupt_after(trainer: Trainer, n_steps: int) -> None:
    """Make `trainer` receive a real SIGINT (Ctrl-C) right after its n-th step."""
    original = trainer.train_step

    def step_then_signal(seg):
        loss = original(seg)
        if trainer.step == n_steps:
            os.kill(os.getpid(), signal.SIGINT)
        return loss

    trainer.train_step = step_then_signal


@pytest.mark.parametrize(
    "overrides",
    [
        ("model=transformer", "trainer.varlen=true"),
        ("model=fwm", "model.carry_over=true", "model.pos_emb=false", "feature_map=favor"),
    ],
    ids=["transformer-varlen", "fwm-carry-favor"],
)
def test_interrupted_run_resumes_exactly(tmp_path, overrides):
    """Ctrl-C at step 3 saves a checkpoint; relaunching in the same directory gives bitwise the same losses,
    the train row of step 4 included (its window, steps 3 and 4, spans the interruption)."""
    cfg = compose_config(*QUICK, *overrides, "trainer.max_steps=7", "trainer.log_interval=2",
                         "trainer.eval_interval=5", "model.dropout=0.2")
    Trainer(cfg, tmp_path / "straight").fit()
    interrupted = Trainer(cfg, tmp_path / "resumed")
    interrupt_after(interrupted, 3)
    assert interrupted.fit()["interrupted"]
    assert load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")["step"] == 3
    Trainer(cfg, tmp_path / "resumed").fit()
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert [(r["step"], r["split"], r["loss"], r.get("train_tokens")) for r in straight] == [
        (r["step"], r["split"], r["loss"], r.get("train_tokens")) for r in resumed
    ]
    times = [r["elapsed_s"] for r in resumed if "elapsed_s" in r]  # the wall time continues across the resume
    assert times == sorted(times)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    """A diverging run stops with a message naming the step and leaves the last good checkpoint."""
    cfg = compose_config(*QUICK, "optimizer=sgd", "optimizer.lr=1e30", "scheduler=constant",
                         "trainer.clip=0", "trainer.eval_interval=1", "trainer.max_steps=20")
    with pytest.raises(TrainingDiverged, match=r"at step \d+") as err:
        Trainer(cfg, tmp_path).fit()
    step = int(str(err.value).split("at step ")[1].split(";")[0])
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == step - 1


def test_checkpoint_of_other_vocabulary_or_model_is_refused(tmp_path):
    """Resuming from a checkpoint of another vocabulary or model shape fails with a clear message."""
    Trainer(compose_config(*QUICK, "dataset=ptb_char", "trainer.max_steps=2"), tmp_path / "char").fit()
    ckpt = tmp_path / "char" / "checkpoints" / "last.pt"
    with pytest.raises(CheckpointError, match="another vocabulary"):
        Trainer(compose_config(*QUICK, f"trainer.resume={ckpt}"), tmp_path / "word")
    with pytest.raises(CheckpointError, match="model.d_model"):
        Trainer(compose_config(*QUICK, "dataset=ptb_char", "model.d_model=48", f"trainer.resume={ckpt}"),
                tmp_path / "wide")


def test_gradient_accumulation_matches_full_batch(tmp_path):
    """batch_chunk=2 gives the same step loss and update as the full batch (no dropout)."""
    results = []
    for chunks in (1, 2):
        cfg = compose_config(*QUICK, "model=transformer", "model.dropout=0", f"trainer.batch_chunk={chunks}")
        trainer = Trainer(cfg, tmp_path / str(chunks))
        loss = trainer.train_step(next(trainer.train_iter.iter_train()))
        results.append((loss, torch.cat([p.flatten() for p in trainer.model.parameters()])))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains(tmp_path, precision):
    """bf16 and fp16 autocast run a few finite steps on CPU."""
    cfg = compose_config(*QUICK, f"trainer.precision={precision}", "trainer.max_steps=3")
    Trainer(cfg, tmp_path).fit()
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in read_metrics(tmp_path))


def test_wandb_offline_run_and_resume_keeps_run_id(tmp_path):
    """logger=wandb writes an offline run, stores its id in the checkpoint and reuses it on resume."""
    cfg = compose_config(*QUICK, "logger=wandb", "trainer.max_steps=2")
    Trainer(cfg, tmp_path).fit()
    run_id = load_checkpoint(tmp_path / "checkpoints" / "last.pt")["wandb_run_id"]
    assert run_id and list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    cfg = compose_config(*QUICK, "logger=wandb", "trainer.max_steps=4")
    Trainer(cfg, tmp_path).fit()
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["wandb_run_id"] == run_id


def test_multirun_sweep_writes_summary(tmp_path):
    """`lmtool-train -m` runs one job per combination, each in its own directory, and writes a summary table."""
    proc = run_cli(["lmtool-train", "-m", *QUICK, "trainer.max_steps=2", "model=fwm", "update_rule=sum,delta",
                    "hydra.sweep.dir=sweep"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    sweep = tmp_path / "sweep"
    assert (sweep / "0" / "checkpoints" / "last.pt").is_file() and (sweep / "1" / "checkpoints" / "last.pt").is_file()
    table = (sweep / "summary.md").read_text().splitlines()
    assert len(table) == 4 and "update_rule=sum" in table[2] and "update_rule=delta" in table[3]
    assert (sweep / "summary.png").read_bytes()[:4] == b"\x89PNG"  # the jobs' learning curves
    from lmtool.train.curves import find_runs, load_runs

    runs = load_runs(find_runs([sweep]))  # one line per job, labelled by what sets it apart
    assert [r.label for r in runs] == ["update_rule=sum", "update_rule=delta"]
    assert all(r.curve("valid", "tokens")[0] == [2 * 4 * 16] for r in runs)
