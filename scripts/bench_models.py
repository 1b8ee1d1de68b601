"""LM training speed of every fast weight programmer against the Delta Network, side by side in one process.

    python scripts/bench_models.py                                  # all models, 2 CPU threads
    python scripts/bench_models.py --models fwm,delta_rnn --repeats 3 --steps 4 --json

One training step is what `lmtool-train` does per segment: forward of the whole CausalLM (dropout on) with the
targets, backward of the mean NLL, gradient clipping at the run's `trainer.clip`, the run's optimizer step.
Every model is built by `lmtool.models.build.build_model` from the composed config `model=<name>` with its
YAML's sizes (the default run's: 4 layers, d_model 128, 4 heads of 32, d_inner 512) and trained on random
token batches of the default run's shape (batch 32, tgt_len 64) from a 10,000-word vocabulary (PTB's size);
speed does not depend on the data. After `--warmup` untimed steps per model, each of `--repeats` rounds runs
`--steps` timed steps of every model in turn (the order rotates every round), so that load from other jobs on
a shared machine hits every model alike. The table gives the median step time over all timed steps, tokens/s
(batch * tgt_len / median) and the ratio of tokens/s to the Delta Network (`fwm`: delta rule, ELU+1) of the
same run; the 1-minute load average is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_train, also when loaded by file path

from bench_train import Case  # noqa: E402  (one training step of a composed model on random tokens)

MODELS = ["fwm", "delta_mlp", "delta_delta", "delta_rnn", "delta_lstm", "rec_delta", "srwm", "lstm"]
LABELS = {
    "fwm": "Delta Network",
    "delta_mlp": "Delta MLP",
    "delta_delta": "Delta-Delta Net",
    "delta_rnn": "Delta RNN",
    "delta_lstm": "Delta LSTM",
    "rec_delta": "Recurrent Delta Net",
    "srwm": "SRWM",
    "lstm": "LSTM",
}
BASELINE = "fwm"
VOCAB = 10_000  # PTB's word vocabulary


def trainee(name: str, args: argparse.Namespace) -> Case:
    """The model `name` (the Delta Network for `fwm`) with its optimizer and a random batch of the given shape."""
    overrides = [f"model={name}"] + (["update_rule=delta", "feature_map=elu"] if name == "fwm" else [])
    return Case(name, overrides, "fp32", args.threads, seed=args.seed, vocab=args.vocab,
                batch_size=args.batch_size, tgt_len=args.tgt_len)  # fmt: skip


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    names = args.models
    load_before = os.getloadavg()
    trainees = [trainee(n, args) for n in names]
    for t in trainees:
        for _ in range(args.warmup):
            t.step()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.repeats):
        k = r % len(trainees)
        for t in trainees[k:] + trainees[:k]:  # rotate the order so that no model always runs first
            times[t.name] += [t.step() for _ in range(args.steps)]
    load_after = os.getloadavg()
    tokens = args.batch_size * args.tgt_len
    rows = []
    for t in trainees:
        median = statistics.median(times[t.name])
        rows.append({"model": t.name, "label": LABELS[t.name], "params": t.params, "ms_median": 1e3 * median,
                     "tokens_per_s": tokens / median, "steps": len(times[t.name])})  # fmt: skip
    base = next((r["tokens_per_s"] for r in rows if r["model"] == BASELINE), None)
    for row in rows:
        row["ratio_to_delta_net"] = row["tokens_per_s"] / base if base else None
    return {
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "threads": args.threads,
        "batch_size": args.batch_size,
        "tgt_len": args.tgt_len,
        "vocab": args.vocab,
        "warmup": args.warmup,
        "steps": args.steps,
        "repeats": args.repeats,
        "load_before": list(load_before),
        "load_after": list(load_after),
        "rows": rows,
    }


def print_table(result: dict) -> None:
    r = result
    print(f"torch {r['torch']}, {r['threads']} threads, batch {r['batch_size']} x tgt_len {r['tgt_len']}, "
          f"vocab {r['vocab']}, {r['repeats']} rounds of {r['steps']} steps")  # fmt: skip
    print("load average before: {:.2f} {:.2f} {:.2f}".format(*result["load_before"]))
    print(f"{'model':<34}{'params':>11}{'ms/step':>10}{'tokens/s':>10}{'x Delta Net':>13}")
    for r in result["rows"]:
        ratio = f"{r['ratio_to_delta_net']:.2f}" if r["ratio_to_delta_net"] is not None else "-"
        print(f"{r['label'] + ' (' + r['model'] + ')':<34}{r['params']:>11,}{r['ms_median']:>10.1f}"
              f"{r['tokens_per_s']:>10.0f}{ratio:>13}")  # fmt: skip
    print("load average after: {:.2f} {:.2f} {:.2f}".format(*result["load_after"]))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {','.join(MODELS)}")
    p.add_argument("--steps", type=int, default=5, help="timed steps per model and round")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds over the models")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model before the first round")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--tgt-len", type=int, default=64)
    p.add_argument("--vocab", type=int, default=VOCAB)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    args = p.parse_args(argv)
    args.models = list(dict.fromkeys(m for m in args.models.split(",") if m))  # in order, once each
    unknown = [m for m in args.models if m not in MODELS]
    if unknown or not args.models:
        p.error(f"--models: unknown {','.join(unknown) or '(none given)'}; choose from {','.join(MODELS)}")
    if min(args.steps, args.repeats, args.threads, args.batch_size, args.tgt_len) < 1 or args.warmup < 0:
        p.error("--steps, --repeats, --threads, --batch-size and --tgt-len must be at least 1, --warmup at least 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = run(args)
    if BASELINE not in args.models:
        print(f"(no {BASELINE} in --models: no ratios)", file=sys.stderr)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print_table(result)


if __name__ == "__main__":
    main()
