"""Benchmark one LM training step (forward, backward, clipping, Adam) of the default run's models on this machine.

    python scripts/bench_train.py          # the three models below, fp32 and bf16, 1 and 2 threads
    python scripts/bench_train.py --models fwm --precisions fp32 --threads 2 --steps 10 --json

Each configuration is the model of `lmtool-train` with its overrides: `default` (the default run's model, the
gated delta rule in Gated DeltaNet's layer), `fwm` (the paper's Delta Network, `model=fwm`; the default model
until commit 0f0c49f, so `--models fwm` compares like with like against older checkouts) and `transformer` (the
softmax Transformer of the same size), each trained on random tokens of PTB's vocabulary size (10,000) with the
default batch (32 x 64 tokens), each step a fresh segment (no carried state); no corpus is read. Configurations
are interleaved across repeats so that a change of machine load hits all of them alike, and each row reports the
median step time, tokens/s and the *useful* model FLOP rate as a fraction of a 2048 x 2048 fp32 `torch.mm`
timed in the same process with the same thread count. Useful FLOPs per token: 6 x (weights of every linear map,
the output layer included) for forward and backward, plus the token mixer's own work: 18 Dk Dv per head for the
delta rule (12 for the sum rule), and for softmax attention 3 x 2 x 2 x (L + 1) / 2 x d_head per head (QK^T and PV
over the causal half, forward and backward).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lmtool.config import compose_config  # noqa: E402
from lmtool.layers.compile import set_compile  # noqa: E402
from lmtool.models.build import build_model  # noqa: E402
from lmtool.train.device import autocast  # noqa: E402
from lmtool.train.memory import keep_freed_memory  # noqa: E402
from lmtool.train.optim import build_optimizer  # noqa: E402

VOCAB = 10_000  # PTB's vocabulary (with <eos>)
MODELS = {"default": [], "fwm": ["model=fwm"], "transformer": ["model=transformer"]}


def useful_flops_per_token(model: torch.nn.Module, cfg) -> float:
    """6 x linear weights + the mixer's own FLOPs (module docstring), per training token."""
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    m, L = cfg.model, cfg.trainer.tgt_len
    if m.name == "fwm":
        per_head = (18 if cfg.update_rule.name != "sum" else 12) * m.d_head * m.d_head
    elif m.name in ("transformer", "transformer_xl"):
        per_head = 3 * 2 * 2 * (L + 1) / 2 * m.d_head
    else:  # recurrent mixers: their matmuls are counted through their linear maps only
        per_head = 0
    return 6 * linear + m.n_layer * m.n_head * per_head


class Case:
    """One model x precision x thread count, with its model, optimizer and a fixed random batch (the run's
    batch_size x tgt_len unless given) from a `vocab`-word vocabulary. Also used by scripts/bench_models.py."""

    def __init__(self, name: str, overrides: list[str], precision: str, threads: int, *, seed: int = 0,
                 vocab: int = VOCAB, batch_size: int | None = None, tgt_len: int | None = None):  # fmt: skip
        self.name, self.precision, self.threads = name, precision, threads
        keep_freed_memory()  # as the Trainer does on CPU
        self.cfg = compose_config(*overrides)
        torch.manual_seed(seed)
        self.model = build_model(self.cfg, vocab).train()
        self.params = sum(p.numel() for p in self.model.parameters())
        self.optimizer = build_optimizer(self.cfg.optimizer, self.model.parameters())
        t = self.cfg.trainer
        g = torch.Generator().manual_seed(seed)
        tokens = torch.randint(vocab, (batch_size or t.batch_size, (tgt_len or t.tgt_len) + 1), generator=g)
        self.inp, self.tgt = tokens[:, :-1], tokens[:, 1:]
        self.flops = useful_flops_per_token(self.model, self.cfg) * self.inp.numel()

    def step(self) -> float:
        """Seconds of one training step (the loop's train_step without the data and the checks)."""
        torch.set_num_threads(self.threads)
        start = time.perf_counter()
        with autocast(torch.device("cpu"), self.precision):
            nll, _ = self.model(self.inp, self.tgt)
        nll.mean().backward()
        if self.cfg.trainer.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.trainer.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def mm_rate(threads: int) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    torch.mm(a, b)
    start = time.perf_counter()
    torch.mm(a, b)
    return 2 * 2048**3 / (time.perf_counter() - start)


def profile(cases: list[Case], steps: int) -> None:
    """Print each configuration's operators by self time over `steps` steps (after a warm-up step), with the load."""
    from torch.profiler import profile as torch_profile

    for case in cases:
        case.step()
        with torch_profile() as prof:
            for _ in range(steps):
                case.step()
        print(f"# {case.name} {case.precision} {case.threads} threads, {steps} steps, load {os.getloadavg()}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=40))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="default,fwm,transformer", help=f"comma-separated, from {', '.join(MODELS)}")
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated fp32, bf16")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    p.add_argument("--steps", type=int, default=7, help="timed steps per configuration (after one warm-up)")
    p.add_argument("--override", action="append", default=[], help="an lmtool-train override for every model")
    p.add_argument("--compile", action="store_true", help="as trainer.compile=true (layers' elementwise functions)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="instead: profile N steps of each configuration and print torch.profiler's top operators")
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    set_compile(args.compile)
    cases = [
        Case(name, [*MODELS[name], *args.override], precision, int(threads))
        for name in args.models.split(",")
        for precision in args.precisions.split(",")
        for threads in args.threads.split(",")
    ]
    load_before = os.getloadavg()
    for case in cases:
        case.step()  # warm-up
    if args.profile:
        return profile(cases, args.profile)
    times: dict[int, list[float]] = {i: [] for i in range(len(cases))}
    peaks: dict[int, list[float]] = {}
    for _ in range(args.steps):
        for i, case in enumerate(cases):
            peaks.setdefault(case.threads, []).append(mm_rate(case.threads))
            times[i].append(case.step())
    rows = []
    for i, case in enumerate(cases):
        seconds = statistics.median(times[i])
        peak = statistics.median(peaks[case.threads])
        rows.append({
            "model": case.name, "precision": case.precision, "threads": case.threads,
            "ms_median": 1e3 * seconds, "tokens_per_s": case.inp.numel() / seconds,
            "useful_gflops": case.flops / seconds / 1e9, "mm_peak_gflops": peak / 1e9,
            "pct_of_mm_peak": 100 * case.flops / seconds / peak,
        })  # fmt: skip
    meta = {"torch": torch.__version__, "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
            "steps": args.steps, "overrides": args.override, "compile": args.compile}  # fmt: skip
    if args.json:
        print(json.dumps({"meta": meta, "rows": rows}, indent=1))
        return
    print(f"# torch {meta['torch']}, median of {args.steps} steps, load average before {load_before}")
    head = ("model", "prec", "thr", "ms/step", "tokens/s", "GFLOP/s", "mm peak", "% peak")
    print("{:<12} {:<5} {:>3} {:>9} {:>9} {:>8} {:>8} {:>7}".format(*head))
    for r in rows:
        print(f"{r['model']:<12} {r['precision']:<5} {r['threads']:>3} {r['ms_median']:>9.1f} "
              f"{r['tokens_per_s']:>9.0f} {r['useful_gflops']:>8.2f} {r['mm_peak_gflops']:>8.1f} "
              f"{r['pct_of_mm_peak']:>6.1f}%")
    print(f"# load average after {meta['load_avg_after']}")


if __name__ == "__main__":
    main()
