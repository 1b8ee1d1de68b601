"""Encoded corpora: a vocabulary plus train/valid/test id tensors, built once and cached.

Building streams: one pass over the vocabulary splits counts tokens (a Counter of types, never a list of
tokens), a second pass encodes each split through :meth:`Vocab.encode_stream` into an int32 array sized
by the first pass. Peak memory is about the int32 ids plus the Counter: WikiText-103 (540 MB of text,
103M tokens) needs ~0.45 GB, not the several GB a list of tokens would.

Ids are kept in the narrowest signed dtype that holds the vocabulary (int16 up to 32,768 symbols, else
int32); :class:`LMOrderedIterator` widens each segment to int64. Large caches (WikiText-103, enwik8,
text8, lm1b) are memory-mapped on load, so a training process pays no private memory for the splits,
reads them lazily page by page, and shares the pages with the other processes of the machine.

lm1b: its train split is read shard by shard and never held as text or tokens, but ``lmtool-prepare``
does hold the encoded ids (~0.8G tokens, ~3.2 GB int32, plus ~0.2 GB for the 793k-word vocabulary) in
memory once while it writes the cache; every training process then maps that file instead.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmtool.data.cache import cache_key, default_cache_dir, file_digest, load_payload, save_payload
from lmtool.data.readers import READERS, SPLITS, Reader
from lmtool.data.vocab import Vocab


@dataclass
class Corpus:
    """One dataset, encoded.

    ``train``/``valid``/``test`` are 1-D integer tensors of ids: int16 when the vocabulary fits, else
    int32; memory-mapped (copy-on-write) from the cache file when that is large. Index them or feed
    them to :class:`LMOrderedIterator` (which yields int64 segments); call ``.long()`` for a private copy.
    """

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

    The vocabulary is counted on the reader's ``vocab_splits`` (train, except enwik8/text8) with
    ``min_freq``/``max_size`` as in :meth:`Vocab.build`, or read from lm1b's vocabulary file.
    ``data_dir`` defaults to :func:`default_data_dir`, ``cache_dir`` to ``$LMTOOL_CACHE`` or
    ``~/.cache/lmtool``. Never downloads: raises DatasetNotFoundError (one line, naming
    ``lmtool-prepare dataset=NAME``) when the source is missing; an unreadable cache file is rebuilt
    with a warning. Large corpora come memory-mapped from the cache (see :class:`Corpus`).
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
    # hand out what a later load gives (memory-mapped when large): the freshly built arrays are freed
    payload = load_payload(path)
    mapped = None if payload is None else _from_payload(payload, key, name, reader, path)
    return corpus if mapped is None else mapped


def build_corpus(
    name: str, reader: Reader, sources: list[Path], *, min_freq: int = 1, max_size: int | None = None
) -> Corpus:
    """Read and encode a corpus without the cache: count the vocabulary, then stream-encode the splits."""
    sizes: dict[str, int] = {}
    if reader.fixed_vocab is not None:
        if min_freq != 1 or max_size is not None:
            raise ValueError(
                f"dataset {name!r} has a fixed vocabulary file: leave dataset.min_freq=1 and dataset.max_size=null"
            )
        vocab = reader.fixed_vocab(sources)
    else:
        counts: Counter[str] = Counter()
        for split in reader.vocab_splits:
            sizes[split] = count_tokens(reader.read(sources, split), counts)
        vocab = Vocab.build(counts, specials=reader.specials, unk=reader.unk, min_freq=min_freq, max_size=max_size)
        del counts
    splits = {}
    for split in SPLITS:
        ids = vocab.encode_stream(reader.read(sources, split), size=sizes.get(split))
        splits[split] = _narrow(ids, len(vocab))
        del ids
    return Corpus(name=name, vocab=vocab, level=reader.level, metric=reader.metric, **splits)


def count_tokens(lines: Iterable[Iterable[str]], counts: Counter[str]) -> int:
    """Add the tokens of ``lines`` to ``counts`` one sequence at a time; returns how many there were."""
    n = 0
    for tokens in lines:
        counts.update(tokens)
        n += len(tokens)
    return n


def _narrow(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int16 when every id fits (PTB, characters), else the tensor unchanged (int32)."""
    return ids.to(torch.int16) if vocab_size <= torch.iinfo(torch.int16).max + 1 else ids


def _to_payload(corpus: Corpus, key: str) -> dict[str, Any]:
    return {
        "key": key,
        "name": corpus.name,
        "level": corpus.level,
        "metric": corpus.metric,
        # one JSON string, not a list: the weights-only unpickler costs ~15 us per list item (WT103: 267k)
        "vocab_json": json.dumps(corpus.vocab.state_dict(), ensure_ascii=False),
        **{split: _narrow(corpus.split(split), len(corpus.vocab)) for split in SPLITS},
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
            splits[split] = ids
    except Exception as err:  # noqa: BLE001 - a malformed cache is rebuilt, never a crash
        warnings.warn(f"corpus cache {path} is malformed ({err!s:.200}); rebuilding it", stacklevel=3)
        return None
    return Corpus(name=name, vocab=vocab, level=reader.level, metric=reader.metric, **splits)
