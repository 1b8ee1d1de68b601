"""Encoded corpora: a vocabulary plus train/valid/test id tensors, built once and cached."""

from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmtool.data.cache import cache_key, default_cache_dir, file_digest, load_payload, save_payload
from lmtool.data.readers import READERS, SPLITS, Reader
from lmtool.data.vocab import Vocab


@dataclass
class Corpus:
    """One dataset, encoded. ``train``/``valid``/``test`` are 1-D ``torch.long`` tensors of ids."""

    name: str
    vocab: Vocab
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    level: str  # "word" | "char"
    metric: str  # "ppl" (word) | "bpc" (char)

    def split(self, split: str) -> torch.Tensor:
        """The ids of ``split`` ("train", "valid" or "test")."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        return getattr(self, split)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={getattr(self, s).numel():,}" for s in SPLITS)
        return f"Corpus({self.name!r}, level={self.level}, vocab={len(self.vocab):,}, {sizes})"


def default_data_dir() -> Path:
    """``$LMTOOL_DATA`` or ``~/.cache/lmtool/data``: where ``lmtool-prepare`` puts downloaded sources."""
    env = os.environ.get("LMTOOL_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lmtool" / "data"


def load_corpus(
    name: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    min_freq: int = 1,
    max_size: int | None = None,
) -> Corpus:
    """Load dataset ``name`` (a key of ``READERS``), encoding and caching it on first use.

    The vocabulary is built from the train split (``min_freq``/``max_size`` as in :meth:`Vocab.build`).
    ``data_dir`` defaults to :func:`default_data_dir`, ``cache_dir`` to ``$LMTOOL_CACHE`` or
    ``~/.cache/lmtool``. Raises DatasetNotFoundError (one line, with the command to run) when the source
    is missing; an unreadable cache file is rebuilt with a warning.
    """
    reader = READERS.get(name)
    if reader is None:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(sorted(READERS))}")
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    sources = reader.locate(data_dir)
    options = {"min_freq": min_freq, "max_size": max_size}
    key = cache_key(name, reader.version, [file_digest(p, cache_dir) for p in sources], options)
    path = cache_dir / f"{name}-{key[:24]}.pt"

    payload = load_payload(path)
    if payload is not None:
        corpus = _from_payload(payload, key, name, reader, path)
        if corpus is not None:
            return corpus

    corpus = build_corpus(name, reader, sources, min_freq=min_freq, max_size=max_size)
    try:
        save_payload(path, _to_payload(corpus, key))
    except OSError as err:
        warnings.warn(f"could not write the corpus cache {path} ({err}); continuing uncached", stacklevel=2)
    return corpus


def build_corpus(
    name: str, reader: Reader, sources: list[Path], *, min_freq: int = 1, max_size: int | None = None
) -> Corpus:
    """Read and encode a corpus without the cache: vocabulary from train, then the three splits."""
    counts: Counter[str] = Counter()
    for tokens in reader.read(sources, "train"):
        counts.update(tokens)
    options = {"min_freq": min_freq, "max_size": max_size}
    vocab = Vocab.build(counts, specials=reader.specials, unk=reader.unk, **options)
    splits = {split: vocab.encode_lines(reader.read(sources, split)) for split in SPLITS}
    return Corpus(name=name, vocab=vocab, level=reader.level, metric=reader.metric, **splits)


def _to_payload(corpus: Corpus, key: str) -> dict[str, Any]:
    # ids are stored in the narrowest signed dtype that holds them and widened on load (PTB: int16)
    dtype = torch.int16 if len(corpus.vocab) <= torch.iinfo(torch.int16).max + 1 else torch.int32
    return {
        "key": key,
        "name": corpus.name,
        "level": corpus.level,
        "metric": corpus.metric,
        # one JSON string, not a list: the weights-only unpickler costs ~15 us per list item (WT103: 267k)
        "vocab_json": json.dumps(corpus.vocab.state_dict(), ensure_ascii=False),
        **{split: corpus.split(split).to(dtype) for split in SPLITS},
    }


def _from_payload(payload: dict[str, Any], key: str, name: str, reader: Reader, path: Path) -> Corpus | None:
    try:
        if payload.get("key") != key:
            raise ValueError("its key does not match its file name")
        vocab = Vocab.from_state_dict(json.loads(payload["vocab_json"]))
        splits = {}
        for split in SPLITS:
            ids = payload[split]
            if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.dtype.is_floating_point:
                raise ValueError(f"{split!r} is not a 1-D integer tensor")
            lo, hi = ids.aminmax() if ids.numel() else (0, 0)
            if not 0 <= int(lo) <= int(hi) < len(vocab):
                raise ValueError(f"{split!r} holds ids outside the vocabulary")
            splits[split] = ids.long()
    except Exception as err:  # noqa: BLE001 - a malformed cache is rebuilt, never a crash
        warnings.warn(f"corpus cache {path} is malformed ({err!s:.200}); rebuilding it", stacklevel=3)
        return None
    return Corpus(name=name, vocab=vocab, level=reader.level, metric=reader.metric, **splits)
