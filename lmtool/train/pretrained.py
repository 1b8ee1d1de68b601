"""A trained checkpoint as a ready model: its config, the model with the weights, and its vocabulary."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from lmtool.data import Corpus, Vocab, load_corpus
from lmtool.models.build import build_model
from lmtool.models.lm import CausalLM
from lmtool.train.checkpoint import CheckpointError, load_checkpoint, load_weights
from lmtool.train.device import resolve_device


@dataclass
class Pretrained:
    """`model` (evaluation mode, on `device`), its `vocab`, the corpus `level` (word | char), the training
    segment length `tgt_len`, the run's config `run_cfg` and the checkpoint's `step`."""

    model: CausalLM
    vocab: Vocab
    level: str
    tgt_len: int
    run_cfg: Any
    step: int


def checkpoint_corpus(ckpt: dict, run_cfg: Any, path: Path) -> Corpus:
    """The corpus of the run's dataset on this machine, refused unless its vocabulary is the checkpoint's."""
    d = run_cfg.dataset
    corpus = load_corpus(d.name, data_dir=d.data_dir, cache_dir=d.cache_dir, min_freq=d.min_freq, max_size=d.max_size)
    if corpus.vocab.fingerprint != ckpt.get("vocab", {}).get("fingerprint"):
        raise CheckpointError(f"checkpoint {path} does not match the vocabulary of dataset {d.name} on this machine")
    return corpus


def checkpoint_vocab(ckpt: dict, run_cfg: Any, path: Path) -> tuple[Vocab, str]:
    """The vocabulary and corpus level of a checkpoint: stored in it, or (older checkpoints) from the corpus
    of its dataset."""
    record = ckpt.get("vocab", {})
    if "symbols" in record:
        return Vocab(record["symbols"], unk=record["unk"]), record["level"]
    corpus = checkpoint_corpus(ckpt, run_cfg, path)
    return corpus.vocab, corpus.level


def load_pretrained(path: str | Path, device: str | torch.device = "auto") -> Pretrained:
    """Load `path` (an lmtool checkpoint) for inference; CheckpointError with one line if it cannot be used."""
    path = Path(path)
    ckpt = load_checkpoint(path)
    run_cfg = OmegaConf.create(ckpt["config"])
    vocab, level = checkpoint_vocab(ckpt, run_cfg, path)
    device = resolve_device(device) if isinstance(device, str) else device
    model = build_model(run_cfg, len(vocab))
    load_weights(model, ckpt, path)
    t = run_cfg.trainer
    return Pretrained(model.to(device).eval(), vocab, level, t.tgt_len, run_cfg, ckpt["step"])
