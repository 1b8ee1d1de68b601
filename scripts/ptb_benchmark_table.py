"""The table of `scripts/ptb_benchmark.sh`: one row per model family, from the run directories of its sweeps.

    python scripts/ptb_benchmark_table.py SWEEP_DIR > SWEEP_DIR/benchmark.md

Per family (the overrides of its jobs other than the seed, `trainer.*` and those that all jobs share):
parameters (the model built on the meta device with PTB's 10,000-word vocabulary), full valid and test
perplexity of the final evaluation (mean over seeds, ± half the range where there are several), training
tokens/s (median of the logged 50-step means of all its jobs) and wall time per job (median; training and its
periodic evaluations up to the last step, as `elapsed_s` records it; the final evaluation is not included).
Jobs that have not finished are counted in a last column and left out of the numbers.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lmtool.models.build import build_model  # noqa: E402
from lmtool.train.curves import job_order  # noqa: E402
from lmtool.train.metrics import read_history  # noqa: E402
from lmtool.train.sweep import job_summary  # noqa: E402

PTB_VOCAB = 10_000


def job_dirs(sweep_dir: Path) -> list[Path]:
    """Every job directory (one with .hydra/overrides.yaml) at most two levels below `sweep_dir`, each sweep's
    jobs in Hydra's numeric order."""
    found = [p.parent.parent for p in sweep_dir.glob("*/.hydra/overrides.yaml")]
    found += [p.parent.parent for p in sweep_dir.glob("*/*/.hydra/overrides.yaml")]
    return sorted(found, key=lambda p: (str(p.parent), job_order(p)))


def parameters(run_dir: Path) -> int:
    with torch.device("meta"):
        model = build_model(OmegaConf.load(run_dir / "resolved_config.yaml"), PTB_VOCAB)
    return sum(p.numel() for p in model.parameters())


def job_result(run_dir: Path) -> dict:
    """The job's family, seed, and (if its final evaluation is there) valid/test ppl, tokens/s and wall time."""
    summary = job_summary(run_dir)  # the sweep summary's row: overrides and final (or last) metrics
    overrides = summary["overrides"].split()
    seed = next((o.split("=", 1)[1] for o in overrides if o.startswith("seed=")), "default")
    family = tuple(o for o in overrides if not o.startswith(("seed=", "trainer.", "hydra.")))
    history = read_history(run_dir / "metrics.jsonl")
    speeds = [r["tokens_per_s"] for r in history if r["split"] == "train" and "tokens_per_s" in r]
    elapsed = [r["elapsed_s"] for r in history if "elapsed_s" in r]
    done = "test_ppl" in summary  # test is scored only by the final evaluation, after the final valid
    return {
        "family": family, "seed": seed, "done": done,
        "valid": summary["valid_ppl"] if done else None, "test": summary["test_ppl"] if done else None,
        "tokens_per_s": statistics.median(speeds) if speeds else None, "wall_s": max(elapsed) if elapsed else None,
        "run_dir": run_dir,
    }


def mean_and_spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.1f}" if len(values) == 1 else f"{mean:.1f} ± {(max(values) - min(values)) / 2:.1f}"


def median_of(jobs: list[dict], key: str) -> float | None:
    values = [r[key] for r in jobs if r[key] is not None]
    return statistics.median(values) if values else None


def label_families(results: list[dict]) -> None:
    """Name each job's family by its own overrides, without those every job shares (the launch's extra ones)."""
    shared = set.intersection(*(set(r["family"]) for r in results)) if results else set()
    for r in results:
        own = [o.removeprefix("experiment=") for o in r["family"] if o not in shared]
        r["family"] = " ".join(own) or "default run"


def table(results: list[dict]) -> str:
    label_families(results)
    families = list(dict.fromkeys(r["family"] for r in results))
    lines = ["| model (overrides) | parameters | seeds | valid ppl | test ppl | tokens/s | wall per job | "
             "unfinished |", "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for family in families:
        jobs = [r for r in results if r["family"] == family]
        done = [r for r in jobs if r["done"]]
        if not done:
            lines.append(f"| `{family}` | | | | | | | {len(jobs)} |")
            continue
        speed, wall = median_of(done, "tokens_per_s"), median_of(done, "wall_s")
        lines.append(
            f"| `{family}` | {parameters(done[0]['run_dir']) / 1e6:.2f}M | {', '.join(r['seed'] for r in done)} | "
            f"{mean_and_spread([r['valid'] for r in done])} | {mean_and_spread([r['test'] for r in done])} | "
            f"{'' if speed is None else f'{speed:,.0f}'} | {'' if wall is None else f'{wall / 60:.1f} min'} | "
            f"{len(jobs) - len(done)} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not Path(args[0]).is_dir():
        sys.exit("usage: ptb_benchmark_table.py SWEEP_DIR (the directory scripts/ptb_benchmark.sh wrote)")
    sys.stdout.write(table([job_result(d) for d in job_dirs(Path(args[0]))]))


if __name__ == "__main__":
    main()
