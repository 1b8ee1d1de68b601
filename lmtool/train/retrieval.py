"""Training of one retrieval memory (arXiv 2102.11174, section 6.1) until it solves the task or stalls.

Not the LM `Trainer`: this task has no token stream, perplexity, checkpoints or resume to share. A run is
seconds to minutes on one CPU thread and a sweep restarts unfinished runs from scratch (`lmtool.retrieval`).
"""

from __future__ import annotations

import math
import time

import torch

from lmtool.config import RetrievalRunConfig
from lmtool.data.retrieval import last_values, sample_pairs, sample_queries
from lmtool.models.retrieval import RetrievalMemory, retrieval_loss


@torch.no_grad()
def evaluate_memory(model: RetrievalMemory, setting: str, n_symbols: int, n_sequences: int, generator) -> float:
    """Mean loss over every key present in `n_sequences` fresh sequences."""
    model.eval()
    keys, values = sample_pairs(setting, n_symbols, n_sequences, generator)
    queries = torch.arange(n_symbols).expand(n_sequences, -1)
    loss = retrieval_loss(model(keys, values, queries), last_values(keys, values, n_symbols))
    model.train()
    return loss.item()


def train_memory(setting: str, n_symbols: int, memory: str, run: RetrievalRunConfig, log=None) -> dict:
    """Train `memory` on `setting` with `n_symbols` keys; returns the row of the sweep's CSV.

    `run.max_steps` must be set (`lmtool-retrieval` resolves its null to the grid's limit).

    `best_loss` is the lowest evaluation loss seen (what the paper plots), `final_loss` the last one;
    `stop` says why training ended: "solved", "no_progress", "max_steps" or "nan".
    """
    torch.manual_seed(run.seed)
    train_gen = torch.Generator().manual_seed(run.seed)
    eval_gen = torch.Generator().manual_seed(run.seed + 1_000_003)
    model = RetrievalMemory(n_symbols, memory, d_key=run.d_key, embedding_factor=run.embedding_factor)
    optimizer = torch.optim.Adam(model.parameters(), lr=run.lr)
    best, best_step, last, stop, step = math.inf, 0, math.inf, "max_steps", 0
    start = time.perf_counter()
    while step < run.max_steps:
        keys, values = sample_pairs(setting, n_symbols, run.batch_size, train_gen)
        queries, targets = sample_queries(keys, values, n_symbols, train_gen)
        loss = retrieval_loss(model(keys, values, queries), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        if step % run.eval_interval and step < run.max_steps:
            continue
        last = evaluate_memory(model, setting, n_symbols, run.eval_sequences, eval_gen)
        if not math.isfinite(last):
            stop = "nan"
            break
        if last < best:
            best, best_step = last, step
        if log is not None:
            log(f"{memory} S={n_symbols} step {step}: eval loss {last:.5f} (best {best:.5f})")
        if best <= run.target_loss:
            stop = "solved"
            break
        if step - best_step >= run.patience_steps:
            stop = "no_progress"
            break
    return {
        "setting": setting,
        "memory": memory,
        "n_symbols": n_symbols,
        "d_dot": model.d_dot,
        "best_loss": best,
        "final_loss": last,
        "steps": step,
        "best_step": best_step,
        "stop": stop,
        "seconds": round(time.perf_counter() - start, 2),
    }
