"""Vocabulary: an ordered list of symbols and the inverse index.

A symbol's id is its position in the list, so the list alone defines the mapping a model was trained
with; :attr:`Vocab.fingerprint` hashes it so that a checkpoint can be checked against the data.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from itertools import repeat
from typing import Any

import numpy as np
import torch

DEFAULT_UNK = "<unk>"
DEFAULT_EOL = "<eos>"


class Vocab:
    """Ordered symbols; ``id = position``.

    ``unk`` names the symbol that unknown tokens map to. It is only used when it is one of the symbols;
    a vocabulary without it (a character vocabulary, say) refuses unknown tokens with a ValueError.
    """

    def __init__(self, symbols: Iterable[str], *, unk: str | None = DEFAULT_UNK) -> None:
        self._symbols: list[str] = list(symbols)
        self._index: dict[str, int] = {}
        for i, sym in enumerate(self._symbols):
            if not isinstance(sym, str):
                raise TypeError(f"vocabulary symbols must be str, got {type(sym).__name__} at position {i}")
            if sym in self._index:
                raise ValueError(f"duplicate symbol {sym!r} at positions {self._index[sym]} and {i}")
            self._index[sym] = i
        self._unk = unk if unk in self._index else None
        self._fingerprint: str | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(
        cls,
        counts: Mapping[str, int] | Iterable[str],
        *,
        specials: Sequence[str] = (),
        min_freq: int = 1,
        max_size: int | None = None,
        unk: str | None = DEFAULT_UNK,
    ) -> Vocab:
        """Build a vocabulary from token counts (a Counter/mapping) or from an iterable of tokens.

        Order: ``specials`` as given, then ``unk`` if it is not kept otherwise, then the other symbols by
        descending count, ties broken by the symbol (so the result does not depend on input order).
        Symbols seen fewer than ``min_freq`` times are dropped. ``max_size`` caps the total size,
        specials and ``unk`` included. ``unk=None`` builds a vocabulary without an unknown symbol.
        """
        if min_freq < 1:
            raise ValueError(f"min_freq must be >= 1, got {min_freq}")
        counter = counts if isinstance(counts, Mapping) else Counter(counts)
        head = list(dict.fromkeys(specials))
        taken = set(head)
        ranked = sorted(
            (item for item in counter.items() if item[0] not in taken and item[1] >= min_freq),
            key=lambda item: (-item[1], item[0]),
        )
        kept = [sym for sym, _ in ranked]
        limit = len(head) + len(kept) + 1 if max_size is None else max_size
        if unk is not None and unk not in taken and unk not in kept[: limit - len(head)]:
            # unk was never seen or was cut by min_freq/max_size: it takes a reserved slot after specials
            head.append(unk)
            kept = [sym for sym in kept if sym != unk]
        budget = limit - len(head)
        if budget < 0:
            raise ValueError(f"max_size={max_size} is smaller than the {len(head)} reserved symbols {head}")
        return cls(head + kept[:budget], unk=unk)

    @classmethod
    def build_chars(
        cls,
        lines: Iterable[str],
        *,
        eol: str = DEFAULT_EOL,
        min_freq: int = 1,
        max_size: int | None = None,
        unk: str | None = None,
    ) -> Vocab:
        """Character vocabulary: one symbol per character seen in ``lines``, plus ``eol`` first.

        ``eol`` is the end-of-line symbol appended to each line when encoding (see :func:`char_tokens`).
        No unknown symbol by default: a character corpus is closed.
        """
        counter: Counter[str] = Counter()
        for line in lines:
            counter.update(line)
        return cls.build(counter, specials=(eol,), min_freq=min_freq, max_size=max_size, unk=unk)

    # ------------------------------------------------------------------ lookup
    @property
    def symbols(self) -> list[str]:
        """The symbols in id order (a copy)."""
        return list(self._symbols)

    @property
    def unk(self) -> str | None:
        """The unknown symbol, or None when unknown tokens are an error."""
        return self._unk

    @property
    def unk_id(self) -> int | None:
        """Id of the unknown symbol, or None."""
        return None if self._unk is None else self._index[self._unk]

    @property
    def fingerprint(self) -> str:
        """sha256 hex digest of the symbol list: equal fingerprints mean equal symbol -> id mappings."""
        if self._fingerprint is None:
            blob = json.dumps(self._symbols, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
            self._fingerprint = hashlib.sha256(blob).hexdigest()
        return self._fingerprint

    def __len__(self) -> int:
        return len(self._symbols)

    def __contains__(self, sym: object) -> bool:
        return sym in self._index

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Vocab):
            return NotImplemented
        return self._symbols == other._symbols and self._unk == other._unk

    def __repr__(self) -> str:
        head = ", ".join(repr(s) for s in self._symbols[:5])
        more = ", ..." if len(self) > 5 else ""
        return f"Vocab(size={len(self)}, unk={self._unk!r}, symbols=[{head}{more}])"

    def index(self, sym: str) -> int:
        """Exact id of ``sym``; ValueError if it is not a symbol (no unk fallback, unlike :meth:`encode`)."""
        try:
            return self._index[sym]
        except KeyError:
            raise ValueError(f"{sym!r} is not in the vocabulary") from None

    def encode(self, tokens: Iterable[str]) -> list[int]:
        """Ids of ``tokens``; unknown tokens map to :attr:`unk_id`, or raise ValueError without one."""
        try:
            return list(self._ids(tokens))
        except KeyError as err:
            raise self._unknown(err) from None

    def encode_lines(self, lines: Iterable[Iterable[str]]) -> torch.Tensor:
        """Encode many token sequences into one concatenated 1-D long tensor (fast path for corpora)."""
        ids = array("q")
        try:
            for tokens in lines:
                ids.extend(self._ids(tokens))
        except KeyError as err:
            raise self._unknown(err) from None
        if not ids:
            return torch.zeros(0, dtype=torch.long)
        return torch.frombuffer(ids, dtype=torch.long).clone()

    def encode_stream(self, lines: Iterable[Iterable[str]], *, size: int | None = None) -> torch.Tensor:
        """Encode token sequences into one 1-D int32 tensor, streaming: no token list is ever held.

        Ids go through a small ``array`` block into a numpy buffer preallocated to ``size`` tokens (the
        count from the vocabulary pass) or grown by realloc when it is unknown or exceeded, then trimmed.
        Peak memory is the int32 output plus one block, whatever the corpus size. A sequence may be a
        list of tokens or, for character corpora, a ``str`` whose characters are the tokens.
        """
        out = _Int32Buffer(size)
        block = array(_INT32)
        try:
            for tokens in lines:
                block.extend(self._ids(tokens))
                if len(block) >= _BLOCK:
                    out.append(block)
                    del block[:]
        except KeyError as err:
            raise self._unknown(err) from None
        out.append(block)
        return torch.from_numpy(out.finish())

    def decode(self, ids: Iterable[int] | torch.Tensor) -> list[str]:
        """Symbols of ``ids`` (ints or a tensor of any shape, flattened)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        symbols = self._symbols
        out = []
        for i in ids:
            if not 0 <= i < len(symbols):
                raise ValueError(f"id {i} is out of range for a vocabulary of {len(symbols)} symbols")
            out.append(symbols[i])
        return out

    def _ids(self, tokens: Iterable[str]) -> Iterable[int]:
        # map() over dict methods runs at C speed: this is the hot loop of corpus encoding
        if self._unk is not None:
            return map(self._index.get, tokens, repeat(self._index[self._unk]))
        return map(self._index.__getitem__, tokens)

    def _unknown(self, err: KeyError) -> ValueError:
        tok = err.args[0] if err.args else "?"
        return ValueError(f"token {tok!r} is not in the vocabulary and the vocabulary has no unknown symbol")

    # ------------------------------------------------------------------ serialisation
    def state_dict(self) -> dict[str, Any]:
        """Plain data (a list of str and the unk symbol) that round-trips through ``torch.save``."""
        return {"symbols": list(self._symbols), "unk": self._unk}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> Vocab:
        """Inverse of :meth:`state_dict`."""
        symbols = state["symbols"]
        if not isinstance(symbols, list):
            raise ValueError("vocabulary state: 'symbols' must be a list of str")
        return cls(symbols, unk=state.get("unk"))


_INT32 = "i"  # array typecode of a C int: 32 bits on every platform torch supports
_BLOCK = 1 << 16  # ids buffered per copy into the output
if array(_INT32).itemsize != 4:  # pragma: no cover - no such platform in practice
    raise ImportError("lmtool needs a 32-bit C int (array typecode 'i')")


class _Int32Buffer:
    """A numpy int32 array filled from the front, grown by 1.5x with ``ndarray.resize``: a realloc, which
    glibc serves for large blocks with mremap (no copy, no second buffer) and trims at the end."""

    def __init__(self, capacity: int | None) -> None:
        self.data = np.empty(max(int(capacity or 0), _BLOCK), dtype=np.int32)
        self.n = 0

    def append(self, block: array) -> None:
        k = len(block)
        if k == 0:
            return
        if self.n + k > len(self.data):
            self.data.resize(max(self.n + k, len(self.data) * 3 // 2), refcheck=False)
        self.data[self.n : self.n + k] = np.frombuffer(block, dtype=np.int32, count=k)
        self.n += k

    def finish(self) -> np.ndarray:
        self.data.resize(self.n, refcheck=False)
        return self.data


def char_tokens(words: Sequence[str], *, sep: str = "_", eol: str | None = DEFAULT_EOL) -> list[str]:
    """Character tokens of one line: the words joined by ``sep``, one token per character, then ``eol``."""
    chars = list(sep.join(words))
    if eol is not None:
        chars.append(eol)
    return chars
