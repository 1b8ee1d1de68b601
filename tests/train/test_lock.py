"""The run-directory lock (lmtool.train.rundir), held and contested by real processes."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmtool.train import rundir
from lmtool.train.rundir import RunDirInUse
from tests.helpers import SMOKE

# a process that takes the lock of argv[1], says so, and keeps it for argv[2] seconds (or until killed)
HOLDER = ("import sys, time; from lmtool.train import rundir; rundir.acquire(sys.argv[1]); "
          "print('locked', flush=True); time.sleep(float(sys.argv[2]))")


def hold(run_dir: Path, seconds: float = 300, **env: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir), str(seconds)], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, **env})
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.fixture
def holders():
    """Holder processes started by a test; killed at its end."""
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        proc.kill()
        proc.wait()


def record(run_dir: Path) -> dict:
    return json.loads((run_dir / ".lock").read_text())


def test_lock_records_its_holder_and_goes_with_release(tmp_path, monkeypatch):
    """The lock file names host, PID, job and start time; taking it twice in one process is one lock; the
    release removes the file."""
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    run_dir = tmp_path / "run"
    with rundir.locked(run_dir):
        rundir.acquire(run_dir)  # as train() does after lmtool-train's start took it
        held = record(run_dir)
        assert held["host"] == socket.gethostname() and held["pid"] == os.getpid() and held["job"] == "4242"
        assert held["started"]
    assert not (run_dir / ".lock").exists()
    rundir.release(run_dir)  # a second release is harmless


def test_exit_without_release_removes_the_lock_file(tmp_path):
    """A process that ends without releasing (say, an error before training starts) leaves no lock file."""
    run_dir = tmp_path / "run"
    proc = hold(run_dir, seconds=0)
    assert proc.wait(timeout=60) == 0
    assert sorted(p.name for p in run_dir.iterdir()) == []


def test_live_holder_is_named_in_one_line(tmp_path, holders):
    """A directory held by a live process is refused at once, with one line naming that process."""
    run_dir = tmp_path / "run"
    holders.append(proc := hold(run_dir))
    start = time.monotonic()
    with pytest.raises(RunDirInUse) as err:
        rundir.acquire(run_dir)
    assert time.monotonic() - start < 5
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"run directory {run_dir} is in use by PID {proc.pid} on host {socket.gethostname()}")
    assert message.endswith("wait for it to finish or use another hydra.run.dir")


def test_lock_of_a_killed_process_is_taken_over(tmp_path, holders):
    """kill -9 leaves the lock file behind but not the lock: the next run takes it over and records itself."""
    run_dir = tmp_path / "run"
    holders.append(proc := hold(run_dir))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert record(run_dir)["pid"] == proc.pid
    with rundir.locked(run_dir):
        assert record(run_dir)["pid"] == os.getpid()


def test_requeued_job_waits_for_its_predecessor(tmp_path, holders, monkeypatch):
    """A run of the same SLURM job as the holder (a requeue) waits for that holder to exit instead of failing."""
    run_dir = tmp_path / "run"
    holders.append(hold(run_dir, seconds=2, SLURM_JOB_ID="4242"))
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    start = time.monotonic()
    with rundir.locked(run_dir):
        assert time.monotonic() - start > 0.5 and record(run_dir)["pid"] == os.getpid()


def test_file_system_without_locks_decides_by_the_record(tmp_path, holders, monkeypatch):
    """Where flock fails (ENOLCK): a live PID on this host or a run on another host keeps the directory; a dead
    PID, or a record of this same job (a requeue), is taken over."""

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(rundir.fcntl, "flock", no_locks)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SUBMITIT_LOCAL_JOB_ID", raising=False)
    run_dir = tmp_path / "run"
    holders.append(proc := hold(run_dir))  # a real flock in its process; its record is what counts here
    with pytest.raises(RunDirInUse, match=f"PID {proc.pid} on host {socket.gethostname()}.*delete {run_dir}/.lock"):
        rundir.acquire(run_dir)
    proc.kill()
    proc.wait()
    with rundir.locked(run_dir):
        pass

    lock = run_dir / ".lock"
    lock.write_text(json.dumps({"host": "node7", "pid": 99, "job": "17", "started": "yesterday"}))
    with pytest.raises(RunDirInUse, match="PID 99 on host node7 .job 17, started yesterday"):
        rundir.acquire(run_dir)
    monkeypatch.setenv("SLURM_JOB_ID", "17")
    with rundir.locked(run_dir):
        assert record(run_dir)["host"] == socket.gethostname()


def test_second_torchrun_launch_stops_on_every_rank(tmp_path, holders):
    """Under torchrun, rank 0's refusal reaches rank 1 (no hang): both exit with the line, nothing is written."""
    run_dir = tmp_path / "run"
    holders.append(proc := hold(run_dir))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lmtool.train",
           *SMOKE, "trainer.num_threads=1", f"hydra.run.dir={run_dir}"]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    line = f"lmtool-train: run directory {run_dir} is in use by PID {proc.pid}"
    assert out.stderr.count(line) == 2, out.stderr[-3000:]
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]
