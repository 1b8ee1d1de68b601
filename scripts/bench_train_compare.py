"""Compare the training step of this checkout with another one (e.g. a git worktree of an older commit).

    git worktree add /tmp/base fdc2374
    python scripts/bench_train_compare.py --baseline /tmp/base --rounds 5 -- --steps 5

Runs each checkout's own `scripts/bench_train.py --json` in separate processes, alternating baseline and this
checkout (the order flips every round, so a drift of the machine load hits both alike), and prints per
configuration the median tokens/s of each and the median and quartiles of the per-round ratios (this / baseline),
with the load averages seen. Process-wide settings (thread pools, malloc options) stay each checkout's own.
Arguments after `--` go to both bench_train.py runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def run(checkout: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, str(checkout / "scripts" / "bench_train.py"), "--json", *extra]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=checkout).stdout
    return json.loads(out[out.index("{") :])


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4)
    return q1, statistics.median(values), q3


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", required=True, type=Path, help="the other checkout (its own bench_train.py runs)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("extra", nargs="*", help="bench_train.py arguments (after --)")
    args = p.parse_args(argv)
    base, this, loads = {}, {}, []
    for r in range(args.rounds):
        order = [(args.baseline, base), (HERE, this)]
        for checkout, sink in order if r % 2 == 0 else order[::-1]:
            result = run(checkout, args.extra)
            loads += [result["meta"]["load_avg_before"][0], result["meta"]["load_avg_after"][0]]
            for row in result["rows"]:
                sink.setdefault((row["model"], row["precision"], row["threads"]), []).append(row["tokens_per_s"])
        print(f"# round {r + 1}/{args.rounds} done", file=sys.stderr)
    print(f"# {args.rounds} rounds, 1-minute load average seen: min {min(loads):.2f}, max {max(loads):.2f}")
    head = ("model", "prec", "thr", "base tok/s", "this tok/s", "ratio", "q1", "q3")
    print("{:<12} {:<5} {:>3} {:>10} {:>10} {:>6} {:>6} {:>6}".format(*head))
    for key in base:
        ratios = [t / b for t, b in zip(this[key], base[key], strict=True)]
        q1, med, q3 = quartiles(ratios)
        model, prec, thr = key
        print(f"{model:<12} {prec:<5} {thr:>3} {statistics.median(base[key]):>10.0f} "
              f"{statistics.median(this[key]):>10.0f} {med:>6.2f} {q1:>6.2f} {q3:>6.2f}")


if __name__ == "__main__":
    main()
