"""Faults a long run meets, with real `lmtool-train` processes in one run directory.

A second launch, kill -9 at a random step and in the middle of a checkpoint write, a full disk while saving, a
corrupt last.pt, SIGTERM during validation: each relaunch must finish with the metrics and checkpoints of an
uninterrupted run (CPU training with one thread is bitwise deterministic), and every failure must end with one
line that says what to do.
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

from lmtool.train.checkpoint import load_checkpoint
from tests.helpers import SMOKE

# 24 steps, a checkpoint (validation on 50 segments, about half a second) every 8, a train row every 2
RUN = (*SMOKE, "trainer.final_eval=false", "trainer.num_threads=1", "trainer.max_steps=24",
       "trainer.eval_interval=8", "trainer.log_interval=2", "trainer.eval_max_segments=50")
# where the first attempt dies: past the first checkpoint (step 8), so that the relaunch resumes, not restarts
KILL_STEP = random.Random(20240917).randint(9, 21)


def command(run_dir: Path, *overrides: str) -> list[str]:
    return ["lmtool-train", *RUN, f"hydra.run.dir={run_dir}", *overrides]


def run(run_dir: Path, *overrides: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command(run_dir, *overrides), capture_output=True, text=True, timeout=300, **kwargs)


def launch(run_dir: Path, *overrides: str) -> subprocess.Popen:
    """Start a run in the background; its output goes to a file beside the run directory."""
    log = (run_dir.parent / f"{run_dir.name}.{time.monotonic_ns()}.out").open("w")
    return subprocess.Popen(command(run_dir, *overrides), stdout=log, stderr=subprocess.STDOUT, text=True)


def read_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            pass
    return rows


def history(run_dir: Path) -> list[tuple]:
    """(step, split, loss) of every metrics row, in file order."""
    return [(r["step"], r["split"], r["loss"]) for r in read_rows(run_dir)]


def weights(path: Path) -> dict:
    ckpt = load_checkpoint(path)
    return {"step": ckpt["step"], "model": ckpt["model"]}


def assert_same_weights(got: dict, want: dict) -> None:
    assert got["step"] == want["step"]
    assert got["model"].keys() == want["model"].keys()
    for name, tensor in want["model"].items():
        assert torch.equal(got["model"][name], tensor), name


def assert_matches_reference(run_dir: Path, reference: Path) -> None:
    """Same metrics rows (each (step, split) once, same losses), same last.pt and best.pt, no stray files."""
    assert history(run_dir) == history(reference)
    for name in ("last.pt", "best.pt"):
        assert_same_weights(weights(run_dir / "checkpoints" / name), weights(reference / "checkpoints" / name))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    assert not (run_dir / ".lock").exists()


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 120, interval: float = 0.005):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{what}: not seen (exit status {proc.wait()})")
        time.sleep(interval)


def last_step(run_dir: Path) -> int:
    rows = read_rows(run_dir)
    return rows[-1]["step"] if rows else 0


class LoadEveryCheckpoint:
    """Loads checkpoints/last.pt each time it changes: it must never be a partial file."""

    def __init__(self, run_dir: Path) -> None:
        self.path, self.seen, self.loaded = run_dir / "checkpoints" / "last.pt", None, 0

    def __call__(self) -> None:
        try:
            stamp = self.path.stat().st_mtime_ns, self.path.stat().st_ino
        except FileNotFoundError:
            return
        if stamp != self.seen:
            load_checkpoint(self.path)  # raises CheckpointError on a partial file
            self.seen, self.loaded = stamp, self.loaded + 1


def temporary(directory: Path, name: str) -> Path | None:
    """A temporary file of a checkpoint being written (`<name>...tmp`), if there is one now."""
    try:
        return next((directory / n for n in os.listdir(directory) if n.startswith(name) and n.endswith(".tmp")), None)
    except FileNotFoundError:
        return None


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run every faulty one must end up equal to."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    proc = run(run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_second_launch_is_refused_while_the_first_holds_the_directory(tmp_path, reference):
    """A launch in a directory whose run is alive exits at once with one line naming it, and changes nothing."""
    run_dir = tmp_path / "run"
    first = launch(run_dir)
    wait_for(lambda: read_rows(run_dir), first, "a first metrics row")
    first.send_signal(signal.SIGSTOP)  # alive and holding the directory, but no further along while we look
    try:
        config = (run_dir / ".hydra" / "config.yaml").read_text()
        second = run(run_dir, "seed=7")
        assert second.returncode != 0
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr
        assert lines[0].startswith(f"lmtool-train: run directory {run_dir} is in use by PID {first.pid} "
                                   f"on host {socket.gethostname()}"), lines[0]
        assert "hydra.run.dir" in lines[0]
        assert (run_dir / ".hydra" / "config.yaml").read_text() == config  # the refused launch wrote nothing
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0
    assert_matches_reference(run_dir, reference)


@pytest.mark.parametrize("kill_step", [KILL_STEP], ids=[f"kill-after-step-{KILL_STEP}"])
def test_kill9_at_a_random_step_then_relaunch_matches_uninterrupted_run(tmp_path, reference, kill_step):
    """kill -9 once a random step is logged; the relaunch takes over the dead run's lock and finishes equal."""
    run_dir = tmp_path / "run"
    first = launch(run_dir)
    check = LoadEveryCheckpoint(run_dir)

    def reached() -> bool:
        check()
        return last_step(run_dir) >= kill_step

    wait_for(reached, first, f"step {kill_step}")
    first.kill()
    first.wait()
    killed_at = last_step(run_dir)
    check()
    relaunch = run(run_dir)
    assert relaunch.returncode == 0, f"killed after step {killed_at}: {relaunch.stderr[-3000:]}"
    assert_matches_reference(run_dir, reference)


def test_kill9_during_checkpoint_writes_then_relaunch_matches_uninterrupted_run(tmp_path, reference):
    """kill -9 while last.pt, then best.pt, is being written: the old files stay loadable and the run ends equal.

    The second kill comes while best.pt of the last step is written, after last.pt of that step: the relaunch
    resumes at the end and must still leave that step's best.pt, not the one before.
    """
    run_dir, ckpt_dir = tmp_path / "run", tmp_path / "run" / "checkpoints"
    first = launch(run_dir)
    wait_for(lambda: last_step(run_dir) >= 16, first, "the second checkpoint's step")  # its last.pt follows
    wait_for(lambda: temporary(ckpt_dir, "last.pt"), first, "last.pt being written", interval=0)
    first.kill()
    first.wait()
    assert temporary(ckpt_dir, "last.pt") is not None  # killed in the middle of the write
    assert load_checkpoint(ckpt_dir / "last.pt")["step"] == 8  # the previous one, whole

    second = launch(run_dir)
    wait_for(lambda: any(r["step"] == 24 and r["split"] == "valid" for r in read_rows(run_dir)), second,
             "validation of the last step")
    wait_for(lambda: temporary(ckpt_dir, "best.pt"), second, "best.pt being written", interval=0)
    second.kill()
    second.wait()
    assert load_checkpoint(ckpt_dir / "last.pt")["step"] == 24
    assert load_checkpoint(ckpt_dir / "best.pt")["step"] == 16  # the interrupted copy left the old best.pt

    relaunch = run(run_dir)
    assert relaunch.returncode == 0, relaunch.stderr[-3000:]
    assert_matches_reference(run_dir, reference)


def limit_file_size(limit: int):
    """For preexec_fn: files this process writes cannot grow past `limit` bytes (write fails with EFBIG)."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_full_disk_during_checkpoint_keeps_previous_last_pt(tmp_path, reference):
    """A checkpoint write that fails (files limited below its size) keeps the previous last.pt and stops."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    size = (run_dir / "checkpoints" / "last.pt").stat().st_size
    proc = run(run_dir, "trainer.max_steps=32", preexec_fn=limit_file_size(size // 4))
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[0].startswith(f"lmtool-train: could not write checkpoint {run_dir / 'checkpoints' / 'last.pt'}")
    assert "File too large" in lines[0] and "previous last.pt is kept" in lines[0], lines[0]
    assert_same_weights(weights(run_dir / "checkpoints" / "last.pt"), weights(reference / "checkpoints" / "last.pt"))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    assert not (run_dir / ".lock").exists()


def test_corrupt_last_pt_names_the_file_and_the_best_pt_way_out(tmp_path, reference):
    """A truncated last.pt stops the relaunch with one line; the trainer.resume=best.pt it suggests continues."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    last = run_dir / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    proc = run(run_dir, "trainer.max_steps=32")
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    best = run_dir / "checkpoints" / "best.pt"
    assert f"checkpoint {last} is corrupt" in lines[0] and "delete it" in lines[0], lines[0]
    suggestion = f"trainer.resume={best}"
    assert suggestion in lines[0], lines[0]

    proc = run(run_dir, "trainer.max_steps=32", suggestion)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_checkpoint(last)["step"] == 32
    steps = [(r["step"], r["split"]) for r in read_rows(run_dir)]
    assert steps[: len(history(reference))] == [(s, split) for s, split, _ in history(reference)]
    assert len(steps) == len(set(steps)) and steps[-1] == (32, "valid")


def test_sigterm_during_validation_saves_stops_and_resumes_exactly(tmp_path, reference):
    """SIGTERM while a periodic validation runs: it finishes, last.pt of that step is saved, exit status 0;
    the relaunch ends equal to the uninterrupted run."""
    run_dir = tmp_path / "run"
    proc = launch(run_dir)

    def validating() -> int | None:  # the step whose train row is written and whose validation is not
        rows = read_rows(run_dir)
        done = {r["step"] for r in rows if r["split"] == "valid"}
        steps = [r["step"] for r in rows if r["split"] == "train" and r["step"] % 8 == 0 and r["step"] < 24]
        return next((s for s in steps if s not in done), None)

    step = wait_for(validating, proc, "a validation in progress", interval=0.002)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    assert f"during the validation at step {step}" in (run_dir / "train.log").read_text()
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] == step
    assert history(run_dir)[-1][:2] == (step, "valid")
    relaunch = run(run_dir)
    assert relaunch.returncode == 0, relaunch.stderr[-3000:]
    assert_matches_reference(run_dir, reference)
