"""What each training-step change buys: the default model's step with one change undone at a time, in one process.

    python scripts/bench_train_ablation.py --baseline /tmp/base --threads 2 --steps 15

Cases, each with its own model and optimizer, stepped in turn (A B C D A B C D ...): `all` (this checkout),
`old output` (the baseline checkout's `linear_cross_entropy`, loaded from its file), `nn dropout` (PyTorch's
`F.dropout` instead of lmtool's CPU mask) and `loop adam` (Adam without the fused kernel). Prints each case's
median step time and the median and quartiles of its per-round ratio to `all`. The malloc setting
(`keep_freed_memory`) is process-wide and cannot be undone in the same process: `--no-keep-freed-memory` runs
all cases without it, so that two such runs in alternating processes give its share.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lmtool.layers.dropout as lm_dropout  # noqa: E402
import lmtool.models.lm as lm  # noqa: E402
from lmtool.layers.output import linear_cross_entropy  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train  # noqa: E402


def load_output(checkout: Path):
    spec = importlib.util.spec_from_file_location("baseline_output", checkout / "lmtool" / "layers" / "output.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.linear_cross_entropy


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", required=True, type=Path, help="checkout whose lmtool/layers/output.py is 'old'")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--no-keep-freed-memory", action="store_true")
    p.add_argument("--override", action="append", default=[], help="an lmtool-train override")
    args = p.parse_args(argv)
    if args.no_keep_freed_memory:
        bench_train.keep_freed_memory = lambda: False
    old_output, new_dropout = load_output(args.baseline), lm_dropout.dropout
    cases = {name: bench_train.Case("fwm", args.override, "fp32", args.threads) for name in
             ("all", "old output", "nn dropout", "loop adam")}  # fmt: skip
    loop = cases["loop adam"]
    loop.optimizer = torch.optim.Adam(loop.model.parameters(), lr=loop.cfg.optimizer.lr, foreach=False)
    patches = {"old output": (old_output, new_dropout), "nn dropout": (linear_cross_entropy, F.dropout)}
    times = {name: [] for name in cases}
    load_before = os.getloadavg()
    try:
        for r in range(args.steps + 1):
            for name, case in cases.items():
                lm.linear_cross_entropy, lm_dropout.dropout = patches.get(name, (linear_cross_entropy, new_dropout))
                seconds = case.step()
                if r > 0:  # the first round warms up
                    times[name].append(seconds)
    finally:
        lm.linear_cross_entropy, lm_dropout.dropout = linear_cross_entropy, new_dropout
    print(f"# {args.threads} threads, {args.steps} rounds, keep_freed_memory={not args.no_keep_freed_memory}, "
          f"load before {load_before}, after {os.getloadavg()}")  # fmt: skip
    for name, t in times.items():
        ratios = [a / b for a, b in zip(t, times["all"], strict=True)]
        q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        print(f"{name:<12} {1e3 * statistics.median(t):8.1f} ms  time / all: {statistics.median(ratios):.3f} "
              f"[{q1:.3f}, {q3:.3f}]")


if __name__ == "__main__":
    main()
