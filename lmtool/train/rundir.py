"""What keeps a run directory consistent: one run at a time (a lock), and files replaced whole.

The lock is an exclusive `flock` on ``<run dir>/.lock``, taken by rank 0 of the run before any training work
and held to its end; the file records the holder (host, PID, SLURM or submitit job id, start time) so that a
refused launch can name it. The kernel drops the flock when the holder dies (kill -9, OOM), so a relaunch takes
over at once; a clean end also removes the file. Ranks other than 0 never touch it: they learn rank 0's outcome.

Across machines the flock is as good as the shared file system's locks. NFS (v4, or v3 with lockd) and GPFS
lock cluster-wide; the lock of a crashed node lapses with its lease (NFSv4: about 90 s). Lustre locks
cluster-wide with the `flock` mount option (with `localflock` only within one node). Where `flock` fails
(ENOLCK, ENOSYS, EOPNOTSUPP: a file system without locks) the record decides: a holder on this host whose PID
is alive, or on another host in another job, keeps the directory (the message says to delete ``.lock`` if that
run is gone); a dead PID on this host, or a record of this same job (a SLURM requeue), is taken over.

A requeued job (the same SLURM_JOB_ID or SUBMITIT_LOCAL_JOB_ID as the record) whose predecessor still holds
the lock waits for it, up to REQUEUE_WAIT_S: the old process may still be exiting, or its crashed node's lease
not yet expired.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import os
import re
import secrets
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from lmtool.train import distributed
from lmtool.train.distributed import Topology

LOCK_NAME = ".lock"
REQUEUE_WAIT_S = 120.0
_NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)
_TEMPORARY = re.compile(r".+\.[0-9a-f]{8}\.tmp")

_held: dict[str, tuple[Path, int]] = {}  # absolute run dir -> (lock file, descriptor holding the flock)


class RunDirInUse(RuntimeError):
    """Another live run holds the directory; the message names it and says what to do."""


def _job_id() -> str | None:
    """This process's SLURM job (also inside a submitit_local job, which SLURM does not know)."""
    return os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID")


def _record() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "job": _job_id(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip


def _read_record(path: Path) -> dict:
    try:
        record = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _describe(record: dict) -> str:
    if not record.get("pid"):
        return "another process (which has not recorded itself yet)"
    job = f"job {record['job']}, " if record.get("job") else ""
    return f"PID {record['pid']} on host {record.get('host')} ({job}started {record.get('started')})"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _is_predecessor(record: dict) -> bool:
    """The record is an earlier run of this very job: a SLURM (or submitit) requeue lands here after it."""
    return record.get("job") is not None and record.get("job") == _job_id() and record.get("pid") != os.getpid()


def _holds_without_locks(record: dict) -> bool:
    """On a file system without locks: whether the recorded holder may still be running."""
    if not record.get("pid") or _is_predecessor(record):
        return False
    if record.get("host") == socket.gethostname():
        return record["pid"] != os.getpid() and _pid_alive(int(record["pid"]))
    return True  # another host: its process cannot be checked from here


def _flock(fd: int) -> str:
    """Try the flock: "locked", "busy" (another open file holds it) or "unsupported" (no locks here)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return "busy"
    except OSError as err:
        if err.errno in _NO_LOCKS:
            return "unsupported"
        raise
    return "locked"


def _same_file(fd: int, path: Path) -> bool:
    """Whether `fd` is still the file at `path` (a releasing holder unlinks it; a lock on that is worthless)."""
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _lock(run_dir: Path) -> None:
    """Take the lock of `run_dir` for this process, or raise RunDirInUse naming its holder."""
    key = os.path.abspath(run_dir)
    if key in _held:
        return
    run_dir = Path(key)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    start = time.monotonic()
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        state = _flock(fd)
        if state == "locked" and not _same_file(fd, path):
            os.close(fd)  # locked a file its holder had just removed: try the new one
            continue
        record = {} if state == "locked" else _read_record(path)
        if state == "busy" and _is_predecessor(record) and time.monotonic() - start < REQUEUE_WAIT_S:
            os.close(fd)
            time.sleep(1.0)
            continue
        if state == "busy" or (state == "unsupported" and _holds_without_locks(record)):
            os.close(fd)
            hint = "" if state == "busy" else f" (this file system has no locks: if that run is gone, delete {path})"
            raise RunDirInUse(f"run directory {run_dir} is in use by {_describe(record)}; wait for it to finish "
                              f"or use another hydra.run.dir{hint}")
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(_record()) + "\n").encode(), 0)
        except OSError:
            pass  # a full disk: the flock still holds, only a refused launch could not name us
        _held[key] = (path, fd)
        return


def _unlock(run_dir: str | Path) -> None:
    entry = _held.pop(os.path.abspath(run_dir), None)
    if entry is None:
        return
    path, fd = entry
    try:
        if _same_file(fd, path):
            path.unlink()  # before the flock goes: nobody can lock this file once it is released
    except OSError:
        pass
    finally:
        os.close(fd)


def _unlock_all() -> None:
    for key in list(_held):
        _unlock(key)


atexit.register(_unlock_all)  # an exit that skips `release` (an error before `train`) removes the file too


def acquire(run_dir: str | Path, topology: Topology | None = None) -> None:
    """Rank 0 locks `run_dir` (kept if this process holds it already); on every rank a refusal raises
    RunDirInUse with rank 0's message, so all processes of a run stop together."""
    topology = topology or distributed.current_topology()
    error = None
    if topology.is_main:
        try:
            _lock(Path(run_dir))
        except RunDirInUse as err:
            error = str(err)
    if topology.distributed:
        error = distributed.broadcast(error)
    if error is not None:
        raise RunDirInUse(error)


def release(run_dir: str | Path) -> None:
    """Give up this process's lock of `run_dir`, if it holds one (removes the lock file)."""
    _unlock(run_dir)


@contextmanager
def locked(run_dir: str | Path, topology: Topology | None = None) -> Iterator[None]:
    """Hold the lock of `run_dir` for the body (see `acquire`); released on every way out."""
    acquire(run_dir, topology)
    try:
        yield
    finally:
        release(run_dir)


# -- whole-file replacement ------------------------------------------------------------------------------------


def _fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (a node crash right after it keeps the new file)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # not supported by every file system
    finally:
        os.close(fd)


@contextmanager
def replaced(path: Path, binary: bool = True) -> Iterator[IO]:
    """Write `path` whole or not at all: the body writes a temporary file beside it, which is flushed to disk
    and renamed over `path`; on an error (or a crash) `path` keeps its old content and the temporary goes
    (after a crash, `remove_temporaries` clears it). OSError from a full disk reaches the caller."""
    tmp = path.with_name(f"{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb" if binary else "x") as f:  # "x": a new file, with the usual permissions
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass


def remove_temporaries(directory: Path) -> list[str]:
    """Delete what `replaced` left in `directory` when its process died mid-write; the names removed."""
    names = [p.name for p in directory.glob("*.tmp") if _TEMPORARY.fullmatch(p.name)] if directory.is_dir() else []
    for name in names:
        (directory / name).unlink(missing_ok=True)
    return names
