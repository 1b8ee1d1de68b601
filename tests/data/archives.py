"""Tiny stand-ins for the real dataset archives: same file names and internal layout, a few KB of text.

Each ``build_*`` writes its archive(s) into a mirror directory and returns the text it packed, so tests
can compute the expected splits independently of the readers. :func:`pin` makes ``lmtool.data.download``
expect these files (their real size and sha256) instead of the published ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import tarfile
import zipfile
from pathlib import Path

from lmtool.data import download, readers

# WikiText-like: titles with " = ... = ", blank " " lines, <unk>, @-@ and a non-ASCII word
WIKITEXT = {
    "train": (
        " \n = Valkyria Chronicles III = \n \n"
        " Senjō no Valkyria 3 : <unk> Chronicles is a tactical role @-@ playing video game . \n"
        " The game began development in 2010 , carrying over a large portion of the work . \n \n"
        " = = Gameplay = = \n \n"
        " As with previous games , the game is a tactical role playing game . \n"
    ),
    "valid": " \n = Homarus gammarus = \n \n Homarus gammarus is a large crustacean . \n",
    "test": " \n = Robert Boulter = \n \n Robert Boulter is an English film actor . \n",
}


def wikitext_lines(text: str) -> list[list[str]]:
    """What Transformer-XL's encode_file yields: every line's whitespace tokens plus <eos>."""
    return [line.split() + ["<eos>"] for line in text.splitlines()]


def build_wikitext(mirror: Path, name: str) -> dict[str, str]:
    folder = readers.WIKITEXT_DIRS[name]
    with zipfile.ZipFile(mirror / f"{folder}-v1.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{folder}/", "")  # the real zips hold a directory entry too
        for split in ("train", "valid", "test"):
            zf.writestr(f"{folder}/wiki.{split}.tokens", WIKITEXT[split].encode("utf-8"))
    return WIKITEXT


def enwik8_bytes(size: int) -> bytes:
    """XML-ish UTF-8 text with newlines and multi-byte characters, cut to exactly ``size`` bytes."""
    page = "<page>\n  <title>Zürich</title>\n  <text>'''Zürich''' is a city — [[Switzerland]].</text>\n</page>\n"
    data = page.encode("utf-8") * (size // len(page) + 1)
    return data[:size]


def build_enwik8(mirror: Path, size: int) -> bytes:
    data = enwik8_bytes(size)
    with zipfile.ZipFile(mirror / "enwik8.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("enwik8", data)
    return data


def text8_bytes(size: int) -> bytes:
    words = " anarchism originated as a term of abuse first used against early working class radicals"
    data = (words * (size // len(words) + 1)).encode("ascii")
    return data[:size]


def build_text8(mirror: Path, size: int) -> bytes:
    data = text8_bytes(size)
    with zipfile.ZipFile(mirror / "text8.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("text8", data)
    return data


LM1B_VOCAB = ["<S>", "</S>", "<UNK>", "the", ",", ".", "to", "of", "a", "said", "year"]


def build_lm1b(mirror: Path) -> tuple[list[str], str]:
    """The tarball (99 one-or-two-sentence training shards, 3 held-out shards, a README) and the vocabulary.

    Returns (training shard texts in shard order, the text of held-out shard 00000).
    """
    root = readers.LM1B_ROOT
    shards = [f"the year {i} , said a man .\n" + ("to the year .\n" if i % 2 else "") for i in range(1, 100)]
    heldout = ["the aardvark said .\nof a year ,\n", "never read 1\n", "never read 2\n"]
    files = {f"{root}/README": "One Billion Word benchmark\n"}
    for i, text in enumerate(shards, 1):
        files[f"{root}/training-monolingual.tokenized.shuffled/news.en-{i:05d}-of-00100"] = text
    for i, text in enumerate(heldout):
        files[f"{root}/heldout-monolingual.tokenized.shuffled/news.en.heldout-{i:05d}-of-00050"] = text
    files[f"{root}/heldout-monolingual.tokenized.shuffled/news.en-00000-of-00100"] = "never read\n"
    with tarfile.open(mirror / f"{root}.tar.gz", "w:gz") as tf:
        for path, text in files.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(path)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    counts = "\n".join(f"{w} {1000 - i}" for i, w in enumerate(LM1B_VOCAB)) + "\n"
    (mirror / "1b_word_vocab.txt").write_text(counts, encoding="utf-8")
    return shards, heldout[0]


def pin(monkeypatch, name: str, mirror: Path) -> None:
    """Make the download check expect the fixture files in ``mirror`` (their size and sha256)."""
    remotes = []
    for remote in download.SOURCES[name]:
        data = (mirror / remote.filename).read_bytes()
        remotes.append(dataclasses.replace(remote, size=len(data), sha256=hashlib.sha256(data).hexdigest()))
    monkeypatch.setitem(download.SOURCES, name, tuple(remotes))
