"""The one training loop: steps, periodic evaluation, checkpoints, exact resume, graceful interruption."""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from lmtool.config import validate
from lmtool.data import LMOrderedIterator, load_corpus
from lmtool.layers.compile import set_compile
from lmtool.models.build import build_model, model_signature
from lmtool.models.state import LMState, detach_state, map_state, merge_state, split_state
from lmtool.train import distributed, rundir
from lmtool.train.checkpoint import (
    CheckpointError,
    CheckpointWriteError,
    check_compatible,
    checkpoint_step,
    copy_checkpoint,
    load_checkpoint,
    load_weights,
    rng_state,
    save_checkpoint,
    set_rng_state,
    vocab_record,
)
from lmtool.train.device import autocast, resolve_device
from lmtool.train.distributed import Topology
from lmtool.train.evaluation import evaluate
from lmtool.train.memory import keep_freed_memory
from lmtool.train.metrics import MetricsWriter, perplexity_fields
from lmtool.train.optim import LRSchedule, build_optimizer

log = logging.getLogger("lmtool")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class Trainer:
    """Trains `cfg` in `run_dir`; resumes from `run_dir/checkpoints/last.pt` or `trainer.resume`.

    Under several processes (`topology`, default: the one `distributed.init_distributed` set up) the model is
    wrapped in DistributedDataParallel and each rank reads its contiguous slice of the global batch's streams
    (trainer.batch_size is the global batch); carried states stay per rank. Every rank is seeded alike, so
    FAVOR+ redraws from the global RNG agree. Rank 0 alone writes the run directory and the wandb run; the
    checkpoint holds every rank's RNG state and the carried states of the whole batch, so all ranks resume
    from the same last.pt exactly. A Trainer does not lock `run_dir`: `train` does (lmtool.train.rundir).
    """

    def __init__(self, cfg: Any, run_dir: Path, topology: Topology | None = None) -> None:
        validate(cfg)
        self.cfg, self.t = cfg, cfg.trainer
        self.topology = topology or distributed.current_topology()
        distributed.check_batch_split(self.t, self.topology)
        self.is_main = self.topology.is_main
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.device = resolve_device(self.t.device)
        if self.device.type == "cuda" and self.topology.distributed:
            self.device = torch.device("cuda", torch.cuda.current_device())  # one GPU per process
        if self.t.num_threads > 0:
            torch.set_num_threads(self.t.num_threads)
        if self.device.type == "cpu":
            keep_freed_memory()  # a step's large tensors reuse mapped pages instead of faulting in new ones
        set_compile(self.t.compile)
        torch.manual_seed(cfg.seed)
        d = cfg.dataset
        with distributed.main_first():  # rank 0 builds the corpus cache, the others read it
            self.corpus = load_corpus(
                d.name, data_dir=d.data_dir, cache_dir=d.cache_dir, min_freq=d.min_freq, max_size=d.max_size
            )
        self.model = build_model(cfg, len(self.corpus.vocab)).to(self.device)
        self.optimizer = build_optimizer(cfg.optimizer, self.model.parameters())
        self.schedule = LRSchedule(self.optimizer, cfg.scheduler, self.t.max_steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.t.precision == "fp16")
        self.train_iter = LMOrderedIterator(
            self.corpus.train, self.t.batch_size, self.t.tgt_len, varlen=self.t.varlen, seed=cfg.seed,
            stream_range=self.topology.stream_range(self.t.batch_size),
        )
        self.step, self.best_valid, self.best_step, self.carried = 0, math.inf, None, None
        self.window_loss, self.window_steps = 0.0, 0  # training loss summed since the last train row
        # tokens trained on (all ranks) and wall time of the run's attempts so far, for lmtool-plot's x axes
        self.train_tokens, self.elapsed_before, self.attempt_start = 0, 0.0, time.perf_counter()
        self.saved_step, self.resumed_from = None, None
        self.phase = None  # what runs now besides training steps: "validation", "final evaluation"
        self.stop_requested, self.stop_signals = False, []
        wandb_id = self._maybe_resume()
        self._on_main(self._tidy_run_dir)  # before any rank reads best.pt
        self.ddp = self.model  # what the training forward calls: the DDP wrapper under several processes
        if self.topology.distributed:
            device_ids = [self.device] if self.device.type == "cuda" else None
            self.ddp = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(cfg, self.run_dir / "resolved_config.yaml", resolve=True)
        self.writer = MetricsWriter(self.run_dir, cfg, wandb_id, enabled=self.is_main, resume_step=self.step)

    # -- checkpoints -------------------------------------------------------------------------------

    def _progress(self) -> dict:
        """Tokens trained on so far and the run's wall time: the attempts before the last resume plus this one."""
        elapsed = self.elapsed_before + time.perf_counter() - self.attempt_start
        return {"train_tokens": self.train_tokens, "elapsed_s": round(elapsed, 3)}

    def _identity(self) -> dict:
        return {
            "vocab": vocab_record(self.corpus.vocab, self.corpus.name, self.corpus.level),
            "signature": model_signature(self.cfg),
        }

    def _payload(self) -> dict:
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "data": self.train_iter.state_dict(),
            "carried": None if self.carried is None else self.carried.to_payload(),
            "best_valid": self.best_valid,
            "best_step": self.best_step,
            "train_window": {"loss": self.window_loss, "steps": self.window_steps},
            "progress": self._progress(),
            "wandb_run_id": self.writer.wandb_run_id,
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "metric": self.corpus.metric,
            **self._identity(),
        }

    def save(self, best: bool = False) -> None:
        """Write last.pt (and best.pt) on rank 0; every rank calls it, and returns once the file is there.

        last.pt goes first and names the step best.pt holds, so that a crash between the two writes is repaired
        on resume (`_tidy_run_dir`). A write that fails (a full disk) keeps the previous file and raises
        CheckpointWriteError on every rank.
        """
        extra = {}
        if self.topology.distributed:
            # every rank's RNG state, and the carried states of the whole batch (rank order = stream order)
            gathered = distributed.all_gather((rng_state(), map_state(lambda t: t.cpu(), self.carried)))
            carried = merge_state([carried for _, carried in gathered])
            extra = {"rng_per_rank": [rng for rng, _ in gathered],
                     "carried": None if carried is None else carried.to_payload()}

        def write() -> None:
            last = path = self.ckpt_dir / "last.pt"
            try:
                save_checkpoint(last, {**self._payload(), **extra})
                if best:
                    path = self.ckpt_dir / "best.pt"
                    copy_checkpoint(last, path)
            except OSError as err:
                kept = f"the previous {path.name} is kept"
                if path != last:
                    kept += f", last.pt of step {self.step} is saved"
                raise CheckpointWriteError(f"could not write checkpoint {path} ({err.strerror or err}); {kept}: make "
                                           f"room and launch again in {self.run_dir} to resume") from None

        self._on_main(write)
        self.saved_step = self.step

    def _on_main(self, work: Callable[[], None]) -> None:
        """`work()` on rank 0 while the other ranks wait; a CheckpointWriteError it raises is raised on all."""
        error = None
        if self.is_main:
            try:
                work()
            except CheckpointWriteError as err:
                error = str(err)
        if self.topology.distributed:
            error = distributed.broadcast(error)
        if error is not None:
            raise CheckpointWriteError(error)

    def _maybe_resume(self) -> str | None:
        path = Path(self.t.resume) if self.t.resume else self.ckpt_dir / "last.pt"
        if not self.t.resume and not path.exists():
            return None
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as err:
            if self.t.resume:
                raise
            best = self.ckpt_dir / "best.pt"
            way_out = f", or continue from the best checkpoint with trainer.resume={best}" if best.is_file() else ""
            raise CheckpointError(f"{err}; delete it to start this run from scratch{way_out}") from None
        check_compatible(ckpt, self._identity(), path)
        load_weights(self.model, ckpt, path)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.schedule.load_state_dict(ckpt["schedule"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.train_iter.load_state_dict(ckpt["data"])
        per_rank = ckpt.get("rng_per_rank")
        same_layout = per_rank is not None and len(per_rank) == self.topology.world_size
        # another process count: rank 0's RNG for all, which keeps the ranks' RNGs identical
        set_rng_state(per_rank[self.topology.rank] if same_layout else ckpt["rng"])
        self.step, self.best_valid, self.best_step = ckpt["step"], ckpt["best_valid"], ckpt.get("best_step")
        window = ckpt.get("train_window") or {}  # a stop between two train rows: the next row covers the window
        self.window_loss, self.window_steps = window.get("loss", 0.0), window.get("steps", 0)
        # checkpoints from before "progress" existed: fixed-length segments give the tokens, the time is unknown
        progress = ckpt.get("progress") or {"train_tokens": self.step * self.t.batch_size * self.t.tgt_len}
        self.train_tokens, self.elapsed_before = progress["train_tokens"], progress.get("elapsed_s", 0.0)
        self.saved_step, self.resumed_from = self.step, path
        carried = LMState.from_payload(ckpt["carried"])
        if self.topology.distributed:  # the checkpoint holds the whole batch's state: take this rank's streams
            carried = split_state(carried, self.topology.world_size)[self.topology.rank]
        self.carried = map_state(lambda t: t.to(self.device), carried)
        log.info("resumed from %s at step %d", path, self.step)
        return ckpt.get("wandb_run_id")

    def _tidy_run_dir(self) -> None:
        """Rank 0, before training: clear what a crash left behind.

        Temporary files of interrupted writes (checkpoints, metrics.jsonl) go. If the checkpoint resumed from
        holds the best weights (its step is `best_step`) but best.pt holds another step, the crash came between
        the last.pt and best.pt writes of that step: best.pt is copied again, as the interrupted save would have.
        """
        for directory in (self.ckpt_dir, self.run_dir):
            for name in rundir.remove_temporaries(directory):
                log.info("removed %s, a write cut short", directory / name)
        source, best = self.resumed_from, self.ckpt_dir / "best.pt"
        if source is None or self.best_step != self.step or source.resolve() == best.resolve():
            return
        if checkpoint_step(best) != self.step:
            try:
                copy_checkpoint(source, best)
            except OSError as err:
                raise CheckpointWriteError(f"could not write checkpoint {best} ({err.strerror or err}): make room "
                                           f"and launch again in {self.run_dir}") from None
            log.info("best.pt of step %d copied again from %s (a crash cut its write short)", self.step, source)

    # -- training ----------------------------------------------------------------------------------

    def train_step(self, seg) -> float:
        """One optimizer step on one segment, split into batch_chunk micro-batches; returns the global loss.

        Under DDP the gradients are averaged over ranks once, after the last micro-batch (`no_sync` before).
        """
        n = self.t.batch_chunk
        carry = self.model.carries_state  # carried fast weights or a segment memory; reset every epoch
        if seg.first or not carry:
            self.carried = None
        inputs, targets = seg.inp.to(self.device).chunk(n), seg.tgt.to(self.device).chunk(n)
        states, new_states, total = split_state(self.carried, n), [], 0.0
        for i, (inp, tgt, state) in enumerate(zip(inputs, targets, states, strict=True)):
            accumulate = self.topology.distributed and i < n - 1
            with self.ddp.no_sync() if accumulate else nullcontext():
                with autocast(self.device, self.t.precision):
                    nll, new_state = self.ddp(inp, tgt, state, return_state=carry)
                loss = nll.mean() / n
                self.scaler.scale(loss).backward()
            total += loss.item()
            new_states.append(detach_state(new_state))
        if self.topology.distributed:  # the mean over ranks (equal local batches); all ranks agree on NaN
            total = distributed.all_reduce_sum([total])[0] / self.topology.world_size
        if not math.isfinite(total):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(
                f"loss is {total} at step {self.step + 1}; stopped, the last good checkpoint is kept in "
                f"{self.ckpt_dir} (lower optimizer.lr or use trainer.precision=fp32)"
            )
        self.carried = merge_state(new_states) if carry else None
        self.schedule.set_step(self.step + 1)
        self.scaler.unscale_(self.optimizer)
        if self.t.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.t.clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return total

    def evaluate_split(self, split: str, max_segments: int | None = None) -> tuple[float, int]:
        """(loss, tokens) of the current weights on `split`, with the run's evaluation settings."""
        return evaluate(
            self.model,
            getattr(self.corpus, split),
            batch_size=self.t.eval_batch_size,
            tgt_len=self.t.eval_tgt_len or self.t.tgt_len,
            carry=self.cfg.model.carry_over,
            device=self.device,
            precision=self.t.precision,
            max_segments=max_segments,
            topology=self.topology,
        )

    def _request_stop(self, signum, frame) -> None:
        # Ctrl-C twice stops a single process at once; launchers (torchrun, SLURM, submitit) follow their
        # first signal with more of them while shutting down, which must not cut the checkpoint short
        if signum == signal.SIGINT and signum in self.stop_signals and self.topology.launcher == "single":
            raise KeyboardInterrupt
        if not self.stop_signals:
            if self.phase == "validation":
                log.warning("signal %d received during the validation at step %d: finishing it, then saving and "
                            "stopping", signum, self.step)
            elif self.phase is not None:
                log.warning("signal %d received during the %s: finishing it", signum, self.phase)
            else:
                log.warning("signal %d received: finishing step %d, then saving and stopping", signum, self.step + 1)
        self.stop_signals.append(signum)
        self.stop_requested = True

    def _install_signal_handlers(self) -> list:
        if threading.current_thread() is not threading.main_thread():
            return []
        signals = [signal.SIGINT, signal.SIGTERM, signal.SIGUSR1]
        requeue = distributed.requeue_signal()  # submitit's timeout/preemption signal, USR2 by default
        if requeue is not None and requeue not in signals:
            signals.append(requeue)
        old = [(s, signal.getsignal(s)) for s in signals]
        for s, _ in old:
            signal.signal(s, self._request_stop)
        return old

    def fit(self) -> dict:
        """Train to max_steps (or a stop signal), then evaluate valid and test with the best weights."""
        old_handlers = self._install_signal_handlers()
        try:
            with logging_redirect_tqdm():
                finished = self._loop()
            if finished:
                return self.final_evaluation() if self.t.final_eval else {"step": self.step}
        finally:
            for s, h in old_handlers:
                signal.signal(s, h)
            self.writer.close()
        self._pass_on_requeue_signal(dict(old_handlers))
        return {"step": self.step, "interrupted": True}

    def _pass_on_requeue_signal(self, previous: dict) -> None:
        """Once last.pt is saved on submitit's timeout/preemption signal, hand the signal to submitit.

        Its handler (rank 0) resubmits the job (the Hydra submitit launcher's `checkpoint`) and exits; the
        requeued job runs in the same run directory and resumes from last.pt.
        """
        requeue = distributed.requeue_signal()
        handler = previous.get(requeue)
        if requeue in self.stop_signals and callable(handler):
            log.warning("checkpoint saved at step %d; asking submitit to requeue the job", self.step)
            handler(requeue, None)

    def _stop_agreed(self) -> bool:
        """Whether to save and stop before the next step: a signal reached this process or, under DDP, any rank."""
        if self.topology.distributed:  # all ranks must stop after the same step
            return distributed.any_rank(self.stop_requested)
        return self.stop_requested

    def _loop(self) -> bool:
        t, metric = self.t, self.corpus.metric
        bar = tqdm(total=t.max_steps, initial=self.step, disable=not (t.progress and self.is_main), desc="train",
                   dynamic_ncols=True)
        window_tokens, window_start = 0, time.perf_counter()  # throughput: of this process's steps only
        segments = self.train_iter.iter_train()
        while self.step < t.max_steps:
            if self._stop_agreed():
                if self.saved_step != self.step:  # a signal during validation: that step is saved already
                    self.save()
                log.warning("stopped at step %d; launch again in %s to resume", self.step, self.run_dir)
                bar.close()
                return False
            seg = next(segments)
            self.window_loss += self.train_step(seg)
            self.window_steps += 1
            window_tokens += seg.tgt.numel() * self.topology.world_size
            self.train_tokens += seg.tgt.numel() * self.topology.world_size
            bar.update(1)
            if self.step % t.log_interval == 0 or self.step == t.max_steps:
                elapsed = time.perf_counter() - window_start
                record = {
                    "step": self.step,
                    "split": "train",
                    "loss": self.window_loss / self.window_steps,
                    **perplexity_fields(self.window_loss / self.window_steps, metric),
                    "lr": self.optimizer.param_groups[0]["lr"],
                    "tokens_per_s": window_tokens / max(elapsed, 1e-9),
                    **self._progress(),
                }
                self.writer.write(record)
                bar.set_postfix(
                    loss=f"{record['loss']:.3f}", **{metric: f"{record[metric]:.2f}"},
                    lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}",
                )
                log.debug("step %d %s", self.step, record)
                self.window_loss, self.window_steps = 0.0, 0
                window_tokens, window_start = 0, time.perf_counter()
            if self.step % t.eval_interval == 0 or self.step == t.max_steps:
                self._periodic_eval()
        bar.close()
        return True

    @contextmanager
    def _during(self, phase: str) -> Iterator[None]:
        """Mark what runs besides training steps, for the message of a stop signal."""
        self.phase = phase
        try:
            yield
        finally:
            self.phase = None

    def _periodic_eval(self) -> None:
        """Validate, then save last.pt (and best.pt): a stop signal meanwhile waits for both."""
        with self._during("validation"):
            loss, _ = self.evaluate_split("valid", self.t.eval_max_segments)
        self.schedule.on_eval(loss)
        improved = loss < self.best_valid
        self.best_valid = min(self.best_valid, loss)
        if improved:
            self.best_step = self.step
        record = {"step": self.step, "split": "valid", "loss": loss, **perplexity_fields(loss, self.corpus.metric),
                  **self._progress()}  # fmt: skip
        self.writer.write(record)
        metric = self.corpus.metric
        log.info("step %d | valid loss %.4f | valid %s %.3f", self.step, loss, metric, record[metric])
        self.save(best=improved)

    def final_evaluation(self) -> dict:
        """Full valid and test evaluation with the best checkpoint's weights."""
        best = self.ckpt_dir / "best.pt"
        if best.exists():
            self.model.load_state_dict(load_checkpoint(best)["model"])
        results = {"step": self.step}
        for split in ("valid", "test"):
            with self._during("final evaluation"):
                loss, tokens = self.evaluate_split(split)
            record = {"step": self.step, "split": split, "loss": loss, "tokens": tokens,
                      **perplexity_fields(loss, self.corpus.metric), "final": True}
            self.writer.write(record)
            results[split] = record
            metric = self.corpus.metric
            log.info("final %s | loss %.4f | %s %.3f | %d tokens", split, loss, metric, record[metric], tokens)
        return results


def train(cfg: Any, run_dir: str | Path, topology: Topology | None = None) -> dict:
    """Train (or resume) the run described by `cfg` in `run_dir`; returns the final metrics.

    Holds the run directory's lock throughout (taken here, or kept from `lmtool-train`'s start): a directory
    in use by a live run raises RunDirInUse on every rank before any work.
    """
    with rundir.locked(run_dir, topology):
        return Trainer(cfg, Path(run_dir), topology).fit()
