"""Per-token decoding latency and state memory against context length, fast weights vs softmax Transformer.

    python scripts/bench_generate.py                        # contexts 256 .. 16384, 1 CPU thread
    python scripts/bench_generate.py --contexts 256,1024 --steps 16 --out /tmp/bench

Both models have the default run's size (4 layers, d_model 128, 4 heads of 32, d_inner 512, the 10,000-word
PTB vocabulary; random weights: timing does not depend on training) and decode with unbounded context: the
fast-weight model (delta rule, ELU+1, carried state, no positions) carries its fixed-size (S, z) per layer,
the Transformer a key/value cache. For each context length T the prompt of T tokens is fed in chunks of 1,024
tokens (through the cache); then `--steps` single tokens per case are timed one by one, in interleaved rounds
over all cases; the table gives the median time per token, and the state's size (every tensor of the
model's state at the end, decoded tokens included). Writes
generation.csv and generation.png to --out.
"""

from __future__ import annotations

import argparse
import csv
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lmtool.models.build import build_model  # noqa: E402
from lmtool.models.generation import CachedDecoder, Context  # noqa: E402
from tests.helpers import compose_config  # noqa: E402

MODELS = {
    "fast weights (delta, ELU+1)": ("model=fwm", "update_rule=delta", "feature_map=elu", "model.carry_over=true",
                                    "model.pos_emb=false", "update_rule.attn_norm=false"),  # fmt: skip
    "softmax Transformer (KV cache)": ("model=transformer",),
}
VOCAB = 10_000
PREFILL_CHUNK = 1024


def state_bytes(state) -> int:
    total = 0
    for layer in state.layers:
        for t in layer if isinstance(layer, (tuple, list)) else [layer]:
            total += t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0
    return total


@torch.no_grad()
def prefilled(overrides: tuple[str, ...], context_len: int) -> CachedDecoder:
    """A decoder whose model has read a random prompt of `context_len` tokens."""
    torch.manual_seed(0)
    model = build_model(compose_config(*overrides), VOCAB).eval()
    decoder = CachedDecoder(model, Context("unbounded"), batch_size=1)
    for chunk in torch.randint(0, VOCAB, (1, context_len)).split(PREFILL_CHUNK, dim=1):
        decoder.feed(chunk)
    return decoder


@torch.no_grad()
def time_tokens(decoder: CachedDecoder, n: int) -> list[float]:
    token = torch.randint(0, VOCAB, (1, 1))
    times = []
    for _ in range(n):
        start = time.perf_counter()
        decoder.feed(token)
        times.append(time.perf_counter() - start)
    return times


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(10, 4))
    for name in MODELS:
        mine = [r for r in rows if r["model"] == name]
        ctx = [r["context"] for r in mine]
        ax_time.plot(ctx, [r["ms_per_token"] for r in mine], marker="o", label=name)
        ax_mem.plot(ctx, [r["state_mb"] for r in mine], marker="o", label=name)
    for ax, label in ((ax_time, "median time per token (ms)"), (ax_mem, "state size (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks([r["context"] for r in rows if r["model"] == next(iter(MODELS))])
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(ScalarFormatter())
            axis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    ax_time.legend()
    fig.suptitle("One-token decoding, 1 CPU thread, fp32, batch 1")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="256,1024,4096,16384")
    parser.add_argument("--steps", type=int, default=64, help="timed tokens per case")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds the timed tokens are split into")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("docs/generation"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} thread(s)")
    cases = [(name, int(c)) for name in MODELS for c in args.contexts.split(",")]
    decoders = {case: prefilled(MODELS[case[0]], case[1]) for case in cases}
    times: dict = {case: [] for case in cases}
    for decoder in decoders.values():
        time_tokens(decoder, 2)  # warm-up
    # rounds of a few tokens per case, interleaved, so that a busy spell of a shared machine hits every case
    for _ in range(args.rounds):
        for case, decoder in decoders.items():
            times[case] += time_tokens(decoder, args.steps // args.rounds)
    rows = []
    for (name, context_len), case_times in times.items():
        seconds, size = statistics.median(case_times), state_bytes(decoders[name, context_len].state)
        rows.append({"model": name, "context": context_len, "ms_per_token": 1e3 * seconds,
                     "state_mb": size / 2**20})  # fmt: skip
        print(f"{name:32s} context {context_len:6d}: {1e3 * seconds:7.2f} ms/token, state {size / 2**20:8.2f} MB")
    with open(args.out / "generation.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, args.out / "generation.png")
    for name in MODELS:
        mine = [r for r in rows if r["model"] == name]
        print(f"{name}: time at {mine[-1]['context']} / time at {mine[0]['context']} = "
              f"{mine[-1]['ms_per_token'] / mine[0]['ms_per_token']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
