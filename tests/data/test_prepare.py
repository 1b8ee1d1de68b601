"""lmtool-prepare: download from a mirror, verify, extract, cache; clear one-line failures; streaming encode."""

import dataclasses
import sys
import time
import tracemalloc
import urllib.request
import zipfile

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import lmtool.prepare
from lmtool.config import DatasetConfig
from lmtool.data import READERS, DatasetNotFoundError, build_corpus, cache, download, load_corpus
from lmtool.data.download import ChecksumError, DownloadError
from lmtool.prepare import prepare
from tests.data import archives
from tests.helpers import compose_config

UNREACHABLE = "http://127.0.0.1:9/"  # the discard port: connection refused at once, never a real host


def dataset_cfg(name, tmp_path, url):
    return OmegaConf.structured(
        DatasetConfig(name=name, data_dir=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"), url=url)
    )


@pytest.fixture
def wt2_mirror(tmp_path, monkeypatch):
    """A mirror directory holding a tiny wikitext-2-v1.zip, pinned as the expected download."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    archives.build_wikitext(mirror, "wt2")
    archives.pin(monkeypatch, "wt2", mirror)
    return mirror


@pytest.fixture
def no_network(monkeypatch):
    """Fail the test if anything tries to open a URL."""

    def refuse(*args, **kwargs):
        raise AssertionError("a URL was opened although nothing should be downloaded")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def quiet(msg):
    pass


def test_prepare_downloads_from_a_file_url_verifies_extracts_and_caches(tmp_path, wt2_mirror):
    """With dataset.url=file://..., the archive is downloaded, kept, extracted, and the corpus cached."""
    messages = []
    corpus = prepare(dataset_cfg("wt2", tmp_path, wt2_mirror.as_uri()), log=messages.append)
    target = tmp_path / "data" / "wt2"
    assert (target / "wikitext-2-v1.zip").read_bytes() == (wt2_mirror / "wikitext-2-v1.zip").read_bytes()
    assert sorted(p.name for p in (target / "wikitext-2").iterdir()) == [
        "wiki.test.tokens",
        "wiki.train.tokens",
        "wiki.valid.tokens",
    ]
    assert not list(target.rglob(".*part"))  # no temporary file left behind
    assert len(list((tmp_path / "cache").glob("wt2-*.pt"))) == 1
    assert any(m.startswith("wt2: downloading file://") for m in messages)
    assert corpus.train.numel() == 65


def test_second_prepare_neither_downloads_nor_reencodes(tmp_path, wt2_mirror, monkeypatch):
    """Once prepared, prepare and load_corpus use the extracted files and the cache: no URL, no reading."""
    first = prepare(dataset_cfg("wt2", tmp_path, str(wt2_mirror)), log=quiet)  # a plain directory works too

    def refuse(*args, **kwargs):
        raise AssertionError("the source was read although the cache should have hit")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setitem(READERS, "wt2", dataclasses.replace(READERS["wt2"], read=refuse))
    again = prepare(dataset_cfg("wt2", tmp_path, UNREACHABLE), log=quiet)
    loaded = load_corpus("wt2", data_dir=tmp_path / "data", cache_dir=tmp_path / "cache")
    assert torch.equal(again.train, first.train) and torch.equal(loaded.test, first.test)


def test_a_checksum_mismatch_is_refused_and_nothing_is_kept(tmp_path, wt2_mirror, monkeypatch):
    """A download whose sha256 differs from the published one raises ChecksumError and leaves no file."""
    wrong = tuple(dataclasses.replace(r, sha256="0" * 64) for r in download.SOURCES["wt2"])
    monkeypatch.setitem(download.SOURCES, "wt2", wrong)
    with pytest.raises(ChecksumError, match=r"sha256 [0-9a-f]{64}, expected 0{64}: delete .*dataset=wt2") as err:
        prepare(dataset_cfg("wt2", tmp_path, wt2_mirror.as_uri()), log=quiet)
    assert "\n" not in str(err.value)
    target = tmp_path / "data" / "wt2"
    assert not any(p.is_file() for p in target.rglob("*"))  # neither the archive nor a temporary file


def test_a_wrong_size_is_refused(tmp_path, wt2_mirror):
    """The published sizes are checked: the tiny fixture is not the 4,475,746-byte release."""
    remote = download.SOURCES["wt2"][0]
    real = dataclasses.replace(remote, size=4_475_746)
    with pytest.raises(ChecksumError, match=r"expected 4,475,746"):
        download.download((wt2_mirror / remote.filename).as_uri(), tmp_path / "x.zip", real, "wt2")
    assert not (tmp_path / "x.zip").exists()


def test_an_archive_put_there_by_hand_is_verified(tmp_path, wt2_mirror, no_network):
    """A wrong archive already in the data directory is refused with a message to delete it; no download."""
    target = tmp_path / "data" / "wt2"
    target.mkdir(parents=True)
    (target / "wikitext-2-v1.zip").write_bytes(b"<html>Access denied</html>")
    with pytest.raises(ChecksumError, match=r"delete .*wikitext-2-v1\.zip and run `lmtool-prepare dataset=wt2`"):
        prepare(dataset_cfg("wt2", tmp_path, UNREACHABLE), log=quiet)


def test_a_correct_archive_put_there_by_hand_is_used(tmp_path, wt2_mirror, no_network):
    """The manual route of the no-network message works: an archive copied into place is extracted."""
    target = tmp_path / "data" / "wt2"
    target.mkdir(parents=True)
    (target / "wikitext-2-v1.zip").write_bytes((wt2_mirror / "wikitext-2-v1.zip").read_bytes())
    assert prepare(dataset_cfg("wt2", tmp_path, UNREACHABLE), log=quiet).train.numel() == 65


def test_an_unknown_digest_still_checks_the_archive(tmp_path, monkeypatch):
    """text8 has no published sha256: a damaged zip (bad CRC) is caught by reading it through."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    archives.build_text8(mirror, 1_000)
    path = mirror / "text8.zip"
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("text8")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    raw[start + 10] ^= 0xFF  # flip a byte of the compressed data
    path.write_bytes(bytes(raw))
    assert download.SOURCES["text8"][0].sha256 is None
    unpinned = download.Remote(download.SOURCES["text8"][0].url, members=("text8",))
    monkeypatch.setitem(download.SOURCES, "text8", (unpinned,))
    with pytest.raises(ChecksumError, match="text8.zip is not a readable archive"):
        prepare(dataset_cfg("text8", tmp_path, str(mirror)), log=quiet)


def test_an_archive_without_the_expected_member_is_refused(tmp_path, monkeypatch):
    """A zip of the right name but another layout is refused, naming the missing member."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    with zipfile.ZipFile(mirror / "enwik8.zip", "w") as zf:
        zf.writestr("enwik9", b"x" * 100)
    archives.pin(monkeypatch, "enwik8", mirror)
    with pytest.raises(ChecksumError, match="has no member enwik8"):
        prepare(dataset_cfg("enwik8", tmp_path, str(mirror)), log=quiet)


def test_unreachable_network_says_what_to_do_in_one_line(tmp_path):
    """Connection refused: DownloadError naming the URL, where to put the file by hand and dataset.url."""
    start = time.perf_counter()
    with pytest.raises(DownloadError) as err:
        prepare(dataset_cfg("wt103", tmp_path, UNREACHABLE), log=quiet)
    message = str(err.value)
    assert time.perf_counter() - start < 10
    assert "\n" not in message
    dest = tmp_path / "data" / "wt103" / "wikitext-103-v1.zip"
    assert f"could not download {UNREACHABLE}wikitext-103-v1.zip" in message
    assert f"download it by hand to {dest}" in message and "dataset.url" in message
    assert not any(p.is_file() for p in (tmp_path / "data").rglob("*"))


def test_command_line_exits_with_the_one_line_message(tmp_path, monkeypatch, capsys):
    """`lmtool-prepare` (its Hydra main, in process) without network exits with one line naming the fix."""
    argv = ["lmtool-prepare", "dataset=text8", f"dataset.data_dir={tmp_path / 'data'}", f"dataset.url={UNREACHABLE}"]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        lmtool.prepare.main()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no log file in the working directory
    message = str(exit_info.value.code)
    assert message.startswith("lmtool-prepare: could not download http://127.0.0.1:9/text8.zip")
    assert "\n" not in message and "dataset.url" in message
    assert compose_config("dataset=lm1b", config_name="prepare").dataset.url is None  # Hydra state left clean


def test_load_corpus_never_downloads(tmp_path, no_network):
    """Training's load_corpus on a missing dataset names the prepare command and opens no URL."""
    for name in ("wt2", "wt103", "enwik8", "text8", "lm1b"):
        with pytest.raises(DatasetNotFoundError, match=rf"run `lmtool-prepare dataset={name}` first"):
            load_corpus(name, data_dir=tmp_path / "data", cache_dir=tmp_path / "cache")


def test_mirror_urls():
    """dataset.url may be an http(s)/file URL (with or without a slash) or a local directory."""
    remote = download.SOURCES["enwik8"][0]
    assert download.source_url(remote, None) == "http://mattmahoney.net/dc/enwik8.zip"
    assert download.source_url(remote, "https://mirror.example/dc") == "https://mirror.example/dc/enwik8.zip"
    assert download.source_url(remote, "file:///srv/data/") == "file:///srv/data/enwik8.zip"
    assert download.source_url(remote, "/srv/data") == "file:///srv/data/enwik8.zip"


def test_word_corpus_encoding_streams_in_small_memory(tmp_path):
    """Encoding a 1.5 MB WikiText-like file peaks near its int32 ids (tracemalloc), not at per-token objects."""
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(1_000)]
    folder = tmp_path / "wt103" / "wikitext-103"
    folder.mkdir(parents=True)
    for split, n_lines in [("train", 8_000), ("valid", 500), ("test", 500)]:
        ids = rng.zipf(1.3, size=(n_lines, 40)) % len(words)
        text = "".join(" " + " ".join(words[i] for i in row) + " \n" for row in ids.tolist())
        (folder / f"wiki.{split}.tokens").write_text(text)
    reader = READERS["wt103"]
    sources = reader.locate(tmp_path)
    tracemalloc.start()
    try:
        corpus = build_corpus("wt103", reader, sources)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    n_tokens = sum(corpus.split(s).numel() for s in ("train", "valid", "test"))
    assert n_tokens == 9_000 * 41
    # 1.5 MB of ids; measured 1.23x. The token list alone would be 2x (8-byte pointers), the former
    # array('q') encoder peaked at 2.05x
    int32_bytes = 4 * n_tokens
    assert peak < 1.5 * int32_bytes, f"peak {peak / 1e6:.1f} MB for {int32_bytes / 1e6:.1f} MB of int32 ids"


def test_large_caches_are_memory_mapped_and_survive_a_rebuild(tmp_path, wt2_mirror, monkeypatch):
    """Caches above the threshold load with mmap=True; replacing the file leaves a mapped corpus intact."""
    prepare(dataset_cfg("wt2", tmp_path, str(wt2_mirror)), log=quiet)
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("mmap"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(cache.torch, "load", spy)
    monkeypatch.setattr(cache, "MMAP_MIN_BYTES", 0)
    mapped = load_corpus("wt2", data_dir=tmp_path / "data", cache_dir=tmp_path / "cache")
    assert calls == [True]
    expected = mapped.train.clone()
    (path,) = (tmp_path / "cache").glob("wt2-*.pt")
    cache.save_payload(path, {"replaced": torch.zeros(3)})  # atomic replace: a new inode
    assert torch.equal(mapped.train, expected)
    monkeypatch.setattr(cache, "MMAP_MIN_BYTES", 1 << 40)
    calls.clear()
    with pytest.warns(UserWarning, match="rebuilding"):
        load_corpus("wt2", data_dir=tmp_path / "data", cache_dir=tmp_path / "cache")
    assert calls[0] is False
