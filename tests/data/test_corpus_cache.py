import dataclasses
import hashlib
import json
import os
import time
import warnings

import pytest
import torch

from lmtool.data import READERS, DatasetNotFoundError, Reader, load_corpus, require_files
from lmtool.data.cache import file_digest

TEXT = {
    "train": "the cat sat\nthe dog sat on the mat\n\nthe end\n",
    "valid": "the cat ran\n",
    "test": "a dog sat\n",
}


class CountingReader:
    """A tiny word-level dataset under data_dir/tiny that records how often it is read."""

    def __init__(self):
        self.reads = 0

    def locate(self, data_dir):
        return require_files("tiny", data_dir, ["train.txt", "valid.txt", "test.txt"])

    def read(self, sources, split):
        self.reads += 1
        path = sources[["train", "valid", "test"].index(split)]
        for line in path.read_text().splitlines():
            if line.split():
                yield line.split() + ["<eos>"]


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """Register the tiny dataset, write its files; yields (reader, data_dir, cache_dir)."""
    data_dir, cache_dir = tmp_path / "data", tmp_path / "cache"
    (data_dir / "tiny").mkdir(parents=True)
    for split, text in TEXT.items():
        (data_dir / "tiny" / f"{split}.txt").write_text(text)
    counting = CountingReader()
    reader = Reader(level="word", locate=counting.locate, read=counting.read, unk="<unk>")
    monkeypatch.setitem(READERS, "tiny", reader)
    return counting, data_dir, cache_dir


def test_tiny_corpus_encodes_the_three_splits(tiny):
    """Splits are encoded with a train vocabulary; unseen valid/test words become <unk>."""
    _, data_dir, cache_dir = tiny
    corpus = load_corpus("tiny", data_dir=data_dir, cache_dir=cache_dir)
    assert corpus.train.numel() == 3 + 6 + 2 + 3
    assert corpus.vocab.decode(corpus.valid) == ["the", "cat", "<unk>", "<eos>"]
    assert corpus.vocab.decode(corpus.test) == ["<unk>", "dog", "sat", "<eos>"]


def test_second_load_does_not_read_the_source(tiny):
    """The second load with the same options comes from the cache: the reader is not called again."""
    counting, data_dir, cache_dir = tiny
    first = load_corpus("tiny", data_dir=data_dir, cache_dir=cache_dir)
    reads = counting.reads
    again = load_corpus("tiny", data_dir=data_dir, cache_dir=cache_dir)
    assert counting.reads == reads
    assert again.vocab == first.vocab and torch.equal(again.train, first.train)
    assert again.train.dtype == first.train.dtype == torch.int16  # the narrowest dtype, both ways


def test_cache_file_is_plain_data(tiny):
    """The cache file loads with weights_only=True and holds only tensors and plain containers."""
    _, data_dir, cache_dir = tiny
    load_corpus("tiny", data_dir=data_dir, cache_dir=cache_dir)
    (path,) = cache_dir.glob("tiny-*.pt")
    payload = torch.load(path, weights_only=True)
    assert isinstance(payload["vocab_json"], str) and isinstance(payload["train"], torch.Tensor)
    assert not list(cache_dir.glob(".*tmp"))  # no temporary file left behind


def test_cache_key_changes_with_vocabulary_options(tiny):
    """Different min_freq/max_size are cached separately and give different vocabularies."""
    counting, data_dir, cache_dir = tiny
    full = load_corpus("tiny", data_dir=data_dir, cache_dir=cache_dir)
    small = load_corpus("tiny", data_dir=data_dir, cache_dir=cache_dir, min_freq=2)
    capped = load_corpus("tiny", data_dir=data_dir, cache_dir=cache_dir, max_size=3)
    assert len(list(cache_dir.glob("tiny-*.pt"))) == 3
    assert len(full.vocab) == 9 and small.vocab.symbols == ["<eos>", "<unk>", "the", "sat"]
    assert capped.vocab.symbols == ["<eos>", "<unk>", "the"]
    assert len({full.vocab.fingerprint, small.vocab.fingerprint, capped.vocab.fingerprint}) == 3


def test_cache_key_changes_with_source_content(tiny):
    """Editing a source file invalidates the cache: the corpus is rebuilt from the new text."""
    counting, data_dir, cache_dir = tiny
    load_corpus("tiny", data_dir=data_dir, cache_dir=cache_dir)
    (data_dir / "tiny" / "test.txt").write_text("the cat sat on the dog\n")
    reads = counting.reads
    corpus = load_corpus("tiny", data_dir=data_dir, cache_dir=cache_dir)
    assert counting.reads > reads
    assert corpus.test.numel() == 7


def test_cache_key_changes_with_reader_version(tiny, monkeypatch):
    """Bumping a reader's version (a tokenisation change) forces a rebuild."""
    counting, data_dir, cache_dir = tiny
    load_corpus("tiny", data_dir=data_dir, cache_dir=cache_dir)
    monkeypatch.setitem(READERS, "tiny", dataclasses.replace(READERS["tiny"], version=2))
    reads = counting.reads
    load_corpus("tiny", data_dir=data_dir, cache_dir=cache_dir)
    assert counting.reads > reads


@pytest.mark.parametrize(
    "garbage", [b"", b"not a torch file", b"PK\x03\x04truncated zip"], ids=["empty", "text", "zip"]
)
def test_corrupt_cache_is_rebuilt_with_a_warning(tiny, garbage):
    """A corrupt cache file triggers a warning and a rebuild, then a valid file replaces it."""
    counting, data_dir, cache_dir = tiny
    first = load_corpus("tiny", data_dir=data_dir, cache_dir=cache_dir)
    (path,) = cache_dir.glob("tiny-*.pt")
    path.write_bytes(garbage)
    with pytest.warns(UserWarning, match="rebuilding"):
        again = load_corpus("tiny", data_dir=data_dir, cache_dir=cache_dir)
    assert torch.equal(again.train, first.train)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_corpus("tiny", data_dir=data_dir, cache_dir=cache_dir)


def test_malformed_cache_payload_is_rebuilt(tiny):
    """A readable cache file with ids outside the vocabulary is rebuilt, not trusted."""
    _, data_dir, cache_dir = tiny
    load_corpus("tiny", data_dir=data_dir, cache_dir=cache_dir)
    (path,) = cache_dir.glob("tiny-*.pt")
    payload = torch.load(path, weights_only=True)
    payload["valid"] = torch.full_like(payload["valid"], 999)
    torch.save(payload, path)
    with pytest.warns(UserWarning, match="rebuilding"):
        corpus = load_corpus("tiny", data_dir=data_dir, cache_dir=cache_dir)
    assert int(corpus.valid.max()) < len(corpus.vocab)


def test_unwritable_cache_warns_and_still_loads(tiny):
    """If the cache directory cannot be created the corpus still loads, with a warning."""
    _, data_dir, cache_dir = tiny
    cache_dir.write_text("a file where the cache directory should be")
    with pytest.warns(UserWarning, match="continuing uncached"):
        corpus = load_corpus("tiny", data_dir=data_dir, cache_dir=cache_dir)
    assert corpus.train.numel() == 14


def test_missing_dataset_names_the_prepare_command(tiny):
    """A missing source file raises a one-line DatasetNotFoundError that says what to run."""
    _, data_dir, cache_dir = tiny
    (data_dir / "tiny" / "valid.txt").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"run `lmtool-prepare dataset=tiny` first") as err:
        load_corpus("tiny", data_dir=data_dir, cache_dir=cache_dir)
    assert "\n" not in str(err.value) and isinstance(err.value, FileNotFoundError)


def test_unknown_dataset_lists_the_available_ones():
    """An unregistered name fails with a ValueError that lists the registered datasets."""
    with pytest.raises(ValueError, match="available: .*ptb"):
        load_corpus("no_such_dataset")


def test_source_digest_is_memoised_by_path_size_and_mtime(tmp_path):
    """Settled files' digests are memoised by stat; changed files are re-hashed; fresh ones are not."""
    cache_dir, src = tmp_path / "cache", tmp_path / "src.txt"
    src.write_text("abc")
    assert file_digest(src, cache_dir) == hashlib.sha256(b"abc").hexdigest()
    assert not (cache_dir / "source-digests.json").exists()  # just written: racy, not memoised
    past = time.time_ns() - 3_600 * 10**9
    os.utime(src, ns=(past, past))
    digest = file_digest(src, cache_dir)
    memo = json.loads((cache_dir / "source-digests.json").read_text())
    assert memo[str(src.resolve())]["sha256"] == digest
    src.write_text("abd")
    assert file_digest(src, cache_dir) == hashlib.sha256(b"abd").hexdigest()
