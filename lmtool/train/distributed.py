"""One distributed bootstrap: a single process, torchrun and SLURM/submitit jobs all go through here.

`detect_topology` reads the process layout from the environment, in this order:

  submitit   a job started by submitit (``SUBMITIT_EXECUTOR`` set; `hydra/launcher=slurm|submitit_local`):
             rank, world size and local rank from ``submitit.JobEnvironment``; `init_distributed` exports
             MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK with ``TorchDistributedEnvironment().export()``;
  torchrun   ``RANK`` and ``WORLD_SIZE`` in the environment (torchrun, ``torch.distributed.run`` or any
             launcher that sets them with MASTER_ADDR/PORT);
  single     neither: one process, no process group.

`init_distributed` starts the default process group (once) when there is more than one process, with gloo
on CPU-only machines and ``cpu:gloo,cuda:nccl`` when CUDA is available (tensors on GPUs go through nccl,
CPU-side control messages through gloo), one process per GPU (``cuda:<local rank>``). The same code path
runs in CPU tests. The helpers below are no-ops in a single process.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict, read_write

from lmtool.config import ConfigError

log = logging.getLogger("lmtool")

MULTIRUN_FLAGS = ("-m", "--multirun")


@dataclass(frozen=True)
class Topology:
    """Where this process sits: its global rank among `world_size` processes and its rank on the node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "single"  # single | torchrun | submitit

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes logs, metrics, checkpoints and the wandb run."""
        return self.rank == 0

    def stream_range(self, batch_size: int) -> tuple[int, int]:
        """This rank's contiguous slice ``(start, stop)`` of the ``batch_size`` streams of a global batch."""
        return self.rank * batch_size // self.world_size, (self.rank + 1) * batch_size // self.world_size


def detect_topology(environ: dict[str, str] | None = None) -> Topology:
    """The process topology that the environment describes: submitit job, torchrun, or a single process."""
    env = os.environ if environ is None else environ
    if env.get("SUBMITIT_EXECUTOR"):
        import submitit  # only inside submitit jobs

        if environ is not None:  # submitit reads os.environ; a given mapping is for tests of the torchrun path
            raise ValueError("detect_topology(environ) cannot describe a submitit job; use os.environ")
        job = submitit.JobEnvironment()
        return Topology(job.global_rank, job.num_tasks, job.local_rank, "submitit")
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
        return Topology(rank, world_size, int(env.get("LOCAL_RANK", rank)), "torchrun")
    return Topology()


_topology: Topology | None = None


def init_distributed() -> Topology:
    """Detect the topology and, for several processes, start the process group; idempotent."""
    global _topology
    if _topology is not None:
        return _topology
    topology = detect_topology()
    if topology.distributed and not dist.is_initialized():
        if topology.launcher == "submitit":
            from submitit.helpers import TorchDistributedEnvironment  # only inside submitit jobs

            # every task of the job gets the same MASTER_ADDR (first node) and MASTER_PORT (from the job id);
            # GPUs are picked with set_device below, not by narrowing CUDA_VISIBLE_DEVICES
            TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        if torch.cuda.is_available():
            torch.cuda.set_device(topology.local_rank % torch.cuda.device_count())
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend, rank=topology.rank, world_size=topology.world_size)
        log.debug("process group %s: rank %d of %d", backend, topology.rank, topology.world_size)
    elif torch.cuda.is_available() and torch.cuda.device_count() > 1:
        log.warning(
            "%d GPUs are visible but this is a single process, which uses one of them: start one process per GPU "
            "(torchrun --nproc_per_node=%d -m lmtool.train ..., or hydra/launcher=slurm, whose tasks_per_node "
            "follows gpus_per_node)", torch.cuda.device_count(), torch.cuda.device_count(),
        )
    _topology = topology
    return topology


def current_topology() -> Topology:
    """The topology `init_distributed` set up, or a single process if it was not called."""
    return _topology if _topology is not None else Topology()


def shutdown_distributed() -> None:
    """Destroy the process group that `init_distributed` started (end of a job)."""
    global _topology
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _topology = None


def check_batch_split(trainer: Any, topology: Topology) -> None:
    """Refuse batch sizes that the processes cannot share equally (trainer.batch_size is the global batch)."""
    n = topology.world_size
    if trainer.batch_size % n:
        raise ConfigError(
            f"trainer.batch_size={trainer.batch_size} is the global batch and must be divisible by the {n} "
            f"processes: use a multiple of {n}"
        )
    local = trainer.batch_size // n
    if local % trainer.batch_chunk:
        raise ConfigError(
            f"each of the {n} processes reads {local} streams, which trainer.batch_chunk={trainer.batch_chunk} "
            "does not divide: lower trainer.batch_chunk or raise trainer.batch_size"
        )
    if trainer.eval_batch_size < n:
        raise ConfigError(
            f"trainer.eval_batch_size={trainer.eval_batch_size} gives some of the {n} processes no stream to "
            f"evaluate: use at least {n}"
        )


# -- collectives (no-ops in a single process) -----------------------------------------------------------


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Sum each value over all ranks (float64, on the CPU side of the group)."""
    if not _active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is true on any rank (e.g. one of them received a stop signal)."""
    return all_reduce_sum([float(flag)])[0] > 0 if _active() else flag


def all_gather(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable; tensors should be on the CPU), in rank order."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if _active():
        dist.barrier()


@contextmanager
def main_first() -> Iterator[None]:
    """Run the body on rank 0 first, then on the others (e.g. building a corpus cache once)."""
    topology = current_topology()
    if topology.distributed and not topology.is_main:
        barrier()
    yield
    if topology.distributed and topology.is_main:
        barrier()


# -- signals, logging and the Hydra run directory ----------------------------------------------------------


def requeue_signal() -> signal.Signals | None:
    """The signal submitit sends before a time limit or preemption (USR2 by default), inside a submitit job."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    from submitit import JobEnvironment  # only inside submitit jobs

    return JobEnvironment._usr_sig()


def quiet_logging() -> None:
    """On ranks other than 0: no log file (rank 0 writes train.log) and only warnings on the console."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()
    for logger in (root, log):
        logger.setLevel(logging.WARNING)


def refuse_multirun(argv: Sequence[str]) -> None:
    """`-m` under torchrun would start the whole sweep in every process: stop with what to do instead."""
    if any(arg in MULTIRUN_FLAGS for arg in argv) or "hydra.mode=MULTIRUN" in argv:
        sys.exit(
            "lmtool-train: -m/--multirun cannot run under torchrun (every process would launch the whole "
            "sweep); launch the sweep without torchrun through a submitit launcher, which starts one process "
            "per GPU for each job: lmtool-train -m hydra/launcher=slurm hydra.launcher.gpus_per_node=N ... "
            "(on one machine: hydra/launcher=submitit_local hydra.launcher.tasks_per_node=N)"
        )


class SharedRunDir(Callback):
    """Hydra callback: every rank of a torchrun job uses rank 0's run directory, which rank 0 locks.

    Each rank composes its own config, and `${now:...}` in `hydra.run.dir` resolves to the second that rank
    started in, so ranks could create different timestamped directories. Before Hydra creates the directory,
    rank 0 resolves it and broadcasts it (the process group is started in `main`, before Hydra); the other
    ranks take it and skip writing `.hydra/`, which rank 0 writes. The directory is pinned in a single process
    too, and locked (lmtool.train.rundir) before Hydra writes `.hydra/` and `train.log` into it: a launch in a
    directory that a live run holds exits here, on every rank, with one line and without touching it. The run
    keeps the lock until `train` returns (sweep jobs, which do not pass here, lock in `train`).
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from lmtool.train import rundir  # it imports this module

        topology = current_topology()
        run_dir = str(config.hydra.run.dir)
        if topology.distributed:
            run_dir = broadcast(run_dir if topology.is_main else None)
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.run.dir = run_dir
            if not topology.is_main:
                config.hydra.output_subdir = None
        try:
            rundir.acquire(run_dir, topology)
        except rundir.RunDirInUse as err:
            sys.exit(f"lmtool-train: {err}")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if detect_topology().launcher == "torchrun":
            refuse_multirun(["--multirun"])
