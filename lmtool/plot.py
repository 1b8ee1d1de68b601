"""lmtool-plot: learning curves of run directories or whole sweeps, drawn to a PNG (no wandb needed).

    lmtool-plot outputs/2026-12-02/10-00-00                     # one run: train and valid perplexity by step
    lmtool-plot multirun/2026-12-02/10-00-00 --x tokens         # every job of a sweep, one line per job
    lmtool-plot RUN_A RUN_B --x time --splits valid --out curves.png

One line per run, labelled by its overrides; perplexity (log scale) or bits per character against the training
step, the tokens trained on or the wall time (`lmtool.train.curves`). The sweep summary writes summary.png the
same way.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lmtool.train.curves import SPLITS, X_AXES, find_runs, load_runs, plot_runs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lmtool-plot", description=__doc__.splitlines()[0])
    p.add_argument("dirs", nargs="+", type=Path, help="run directories and/or sweep directories")
    p.add_argument("--x", choices=sorted(X_AXES), default="step", help="x axis (default: step)")
    p.add_argument("--splits", default="train,valid", help="comma-separated panels: train, valid (default both)")
    p.add_argument("--out", type=Path, help="PNG to write (default: curves_<x>.png in the first directory)")
    args = p.parse_args(argv)
    args.splits = tuple(s for s in args.splits.split(",") if s)
    bad = [s for s in args.splits if s not in SPLITS]
    if bad or not args.splits:
        p.error(f"--splits takes train and/or valid, got {args.splits}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    runs = load_runs(find_runs(args.dirs))
    out = args.out or args.dirs[0] / f"curves_{args.x}.png"
    left_out = plot_runs(runs, out, x=args.x, splits=args.splits)
    if left_out:
        print(f"lmtool-plot: no {args.x} axis recorded for (left out): {', '.join(left_out)}", file=sys.stderr)
    print(f"{len(runs)} run(s) -> {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
