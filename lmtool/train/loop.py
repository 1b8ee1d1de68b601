"""The one training loop: steps, periodic evaluation, checkpoints, exact resume, graceful interruption."""

from __future__ import annotations

import logging
import math
import shutil
import signal
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from lmtool.config import validate
from lmtool.data import LMOrderedIterator, load_corpus
from lmtool.models.build import build_model, model_signature
from lmtool.models.lm import CausalLM, detach_state, map_state
from lmtool.train.checkpoint import (
    CheckpointError,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from lmtool.train.metrics import MetricsWriter, perplexity_fields
from lmtool.train.optim import LRSchedule, build_optimizer

log = logging.getLogger("lmtool")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu or auto")
    return torch.device(name)


def autocast(device: torch.device, precision: str):
    """Mixed-precision context for the forward pass; fp32 runs without autocast."""
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def split_state(state: Any, n: int) -> list[Any]:
    """Split a nested carried state along the batch dimension into n equal parts."""
    if state is None:
        return [None] * n
    if isinstance(state, torch.Tensor):
        return list(state.chunk(n, dim=0))
    parts = [split_state(s, n) for s in state]
    return [type(state)(p[i] for p in parts) for i in range(n)]


def merge_state(states: list[Any]) -> Any:
    """Inverse of split_state."""
    first = states[0]
    if first is None:
        return None
    if isinstance(first, torch.Tensor):
        return torch.cat(states, dim=0)
    return type(first)(merge_state([s[i] for s in states]) for i in range(len(first)))


@torch.no_grad()
def evaluate(
    model: CausalLM,
    data: torch.Tensor,
    *,
    batch_size: int,
    tgt_len: int,
    carry: bool,
    device: torch.device,
    precision: str = "fp32",
    max_segments: int | None = None,
) -> tuple[float, int]:
    """Mean NLL (nats/token) over `data` in non-overlapping segments of `tgt_len` over `batch_size` streams.

    carry=True passes each layer's state (fast weights) from one segment to the next; otherwise every
    segment starts from an empty state. Returns (loss, tokens scored).
    """
    was_training = model.training
    model.eval()
    total, count, state = 0.0, 0, None
    iterator = LMOrderedIterator(data, batch_size, tgt_len)
    for i, seg in enumerate(iterator):
        if max_segments is not None and i >= max_segments:
            break
        with autocast(device, precision):
            nll, new_state = model(seg.inp.to(device), seg.tgt.to(device), state if carry else None, carry)
        state = new_state
        total += nll.double().sum().item()
        count += nll.numel()
    model.train(was_training)
    return total / max(count, 1), count


class Trainer:
    """Trains `cfg` in `run_dir`; resumes from `run_dir/checkpoints/last.pt` or `trainer.resume`."""

    def __init__(self, cfg: Any, run_dir: Path) -> None:
        validate(cfg)
        self.cfg, self.t = cfg, cfg.trainer
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.device = resolve_device(self.t.device)
        if self.t.num_threads > 0:
            torch.set_num_threads(self.t.num_threads)
        torch.manual_seed(cfg.seed)
        d = cfg.dataset
        self.corpus = load_corpus(
            d.name, data_dir=d.data_dir, cache_dir=d.cache_dir, min_freq=d.min_freq, max_size=d.max_size
        )
        self.model = build_model(cfg, len(self.corpus.vocab)).to(self.device)
        self.optimizer = build_optimizer(cfg.optimizer, self.model.parameters())
        self.schedule = LRSchedule(self.optimizer, cfg.scheduler, self.t.max_steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.t.precision == "fp16")
        self.train_iter = LMOrderedIterator(
            self.corpus.train, self.t.batch_size, self.t.tgt_len, varlen=self.t.varlen, seed=cfg.seed
        )
        self.step, self.best_valid, self.carried = 0, math.inf, None
        self.stop_requested = False
        wandb_id = self._maybe_resume()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, self.run_dir / "resolved_config.yaml", resolve=True)
        self.writer = MetricsWriter(self.run_dir, cfg, wandb_id)

    # -- checkpoints -------------------------------------------------------------------------------

    def _identity(self) -> dict:
        vocab = self.corpus.vocab
        return {
            "vocab": {"fingerprint": vocab.fingerprint, "size": len(vocab), "dataset": self.corpus.name},
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
            "carried": self.carried,
            "best_valid": self.best_valid,
            "wandb_run_id": self.writer.wandb_run_id,
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "metric": self.corpus.metric,
            **self._identity(),
        }

    def save(self, best: bool = False) -> None:
        last = self.ckpt_dir / "last.pt"
        save_checkpoint(last, self._payload())
        if best:
            tmp = self.ckpt_dir / "best.pt.tmp"
            shutil.copyfile(last, tmp)
            tmp.replace(self.ckpt_dir / "best.pt")

    def _maybe_resume(self) -> str | None:
        path = Path(self.t.resume) if self.t.resume else self.ckpt_dir / "last.pt"
        if not self.t.resume and not path.exists():
            return None
        ckpt = load_checkpoint(path)
        check_compatible(ckpt, self._identity(), path)
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.schedule.load_state_dict(ckpt["schedule"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.train_iter.load_state_dict(ckpt["data"])
        set_rng_state(ckpt["rng"])
        self.step, self.best_valid = ckpt["step"], ckpt["best_valid"]
        self.carried = map_state(lambda t: t.to(self.device), ckpt["carried"])
        log.info("resumed from %s at step %d", path, self.step)
        return ckpt.get("wandb_run_id")

    # -- training ----------------------------------------------------------------------------------

    def train_step(self, seg) -> float:
        """One optimizer step on one segment, split into batch_chunk micro-batches."""
        n = self.t.batch_chunk
        carry = self.cfg.model.carry_over
        if seg.first or not carry:
            self.carried = None
        inputs, targets = seg.inp.to(self.device).chunk(n), seg.tgt.to(self.device).chunk(n)
        states, new_states, total = split_state(self.carried, n), [], 0.0
        for inp, tgt, state in zip(inputs, targets, states, strict=True):
            with autocast(self.device, self.t.precision):
                nll, new_state = self.model(inp, tgt, state, return_state=carry)
            loss = nll.mean() / n
            self.scaler.scale(loss).backward()
            total += loss.item()
            new_states.append(detach_state(new_state))
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

    def validate(self, max_segments: int | None) -> float:
        loss, _ = evaluate(
            self.model,
            self.corpus.valid,
            batch_size=self.t.eval_batch_size,
            tgt_len=self.t.eval_tgt_len or self.t.tgt_len,
            carry=self.cfg.model.carry_over,
            device=self.device,
            precision=self.t.precision,
            max_segments=max_segments,
        )
        return loss

    def _request_stop(self, signum, frame) -> None:
        if self.stop_requested:  # a second signal: stop now
            raise KeyboardInterrupt
        log.warning("signal %d received: finishing step %d, then saving and stopping", signum, self.step + 1)
        self.stop_requested = True

    def _install_signal_handlers(self) -> list:
        if threading.current_thread() is not threading.main_thread():
            return []
        old = [(s, signal.getsignal(s)) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)]
        for s, _ in old:
            signal.signal(s, self._request_stop)
        return old

    def fit(self) -> dict:
        """Train to max_steps (or a stop signal), then evaluate valid and test with the best weights."""
        old_handlers = self._install_signal_handlers()
        try:
            with logging_redirect_tqdm():
                finished = self._loop()
            if not finished:
                return {"step": self.step, "interrupted": True}
            return self.final_evaluation() if self.t.final_eval else {"step": self.step}
        finally:
            for s, h in old_handlers:
                signal.signal(s, h)
            self.writer.close()

    def _loop(self) -> bool:
        t, metric = self.t, self.corpus.metric
        bar = tqdm(total=t.max_steps, initial=self.step, disable=not t.progress, desc="train", dynamic_ncols=True)
        window_loss, window_steps, window_tokens, window_start = 0.0, 0, 0, time.perf_counter()
        segments = self.train_iter.iter_train()
        while self.step < t.max_steps:
            if self.stop_requested:
                self.save()
                log.warning("stopped at step %d; launch again in %s to resume", self.step, self.run_dir)
                bar.close()
                return False
            seg = next(segments)
            window_loss += self.train_step(seg)
            window_steps += 1
            window_tokens += seg.tgt.numel()
            bar.update(1)
            if self.step % t.log_interval == 0 or self.step == t.max_steps:
                elapsed = time.perf_counter() - window_start
                record = {
                    "step": self.step,
                    "split": "train",
                    "loss": window_loss / window_steps,
                    **perplexity_fields(window_loss / window_steps, metric),
                    "lr": self.optimizer.param_groups[0]["lr"],
                    "tokens_per_s": window_tokens / max(elapsed, 1e-9),
                }
                self.writer.write(record)
                bar.set_postfix(
                    loss=f"{record['loss']:.3f}", **{metric: f"{record[metric]:.2f}"},
                    lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}",
                )
                log.debug("step %d %s", self.step, record)
                window_loss, window_steps, window_tokens, window_start = 0.0, 0, 0, time.perf_counter()
            if self.step % t.eval_interval == 0 or self.step == t.max_steps:
                self._periodic_eval()
        bar.close()
        return True

    def _periodic_eval(self) -> None:
        loss = self.validate(self.t.eval_max_segments)
        self.schedule.on_eval(loss)
        improved = loss < self.best_valid
        self.best_valid = min(self.best_valid, loss)
        record = {"step": self.step, "split": "valid", "loss": loss, **perplexity_fields(loss, self.corpus.metric)}
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
            loss, tokens = evaluate(
                self.model,
                getattr(self.corpus, split),
                batch_size=self.t.eval_batch_size,
                tgt_len=self.t.eval_tgt_len or self.t.tgt_len,
                carry=self.cfg.model.carry_over,
                device=self.device,
                precision=self.t.precision,
            )
            record = {"step": self.step, "split": split, "loss": loss, "tokens": tokens,
                      **perplexity_fields(loss, self.corpus.metric), "final": True}
            self.writer.write(record)
            results[split] = record
            metric = self.corpus.metric
            log.info("final %s | loss %.4f | %s %.3f | %d tokens", split, loss, metric, record[metric], tokens)
        return results


def check_compatible(ckpt: dict, identity: dict, path: Path) -> None:
    """Refuse a checkpoint trained with another vocabulary or an incompatible model config."""
    vocab, want = ckpt.get("vocab", {}), identity["vocab"]
    if vocab.get("fingerprint") != want["fingerprint"]:
        raise CheckpointError(
            f"checkpoint {path} was trained on another vocabulary ({vocab.get('dataset')}, "
            f"{vocab.get('size')} symbols) than this run ({want['dataset']}, {want['size']} symbols)"
        )
    if ckpt.get("signature") != identity["signature"]:
        diff = _diff(ckpt.get("signature", {}), identity["signature"])
        raise CheckpointError(f"checkpoint {path} has an incompatible model config: {diff}")


def _diff(old: dict, new: dict, prefix: str = "") -> str:
    keys = sorted(set(old) | set(new))
    for key in keys:
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = _diff(a, b, f"{prefix}{key}.")
            if inner:
                return inner
        elif a != b:
            return f"{prefix}{key} is {a} in the checkpoint, {b} now"
    return ""


def train(cfg: Any, run_dir: str | Path) -> dict:
    """Train (or resume) the run described by `cfg` in `run_dir`; returns the final metrics."""
    return Trainer(cfg, Path(run_dir)).fit()
