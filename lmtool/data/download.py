"""Fetch a dataset's source files for `lmtool-prepare`: download, verify, extract. Training never calls this.

Each dataset is a few :class:`Remote` files (the canonical URLs of Transformer-XL's ``getdata.sh``).
:func:`fetch` puts them under ``<data_dir>/<name>/``:

1. a file already there (a previous run, or a copy put there by hand) is verified, not downloaded;
2. otherwise it is downloaded with ``urllib`` (30 s connect/read timeout, so nothing hangs) to a
   temporary file in the same directory, hashed while it streams, checked, then renamed into place;
3. it is verified: byte size and sha256 where known (constants below, from the HuggingFace ``datasets``
   checksum records of the same URLs); where the digest is unknown, only that the archive opens and
   every member reads (zip CRCs, the gzip trailer);
4. the members the reader needs are extracted, each to a temporary file then renamed, so an
   interrupted run never leaves a truncated file under a name ``load_corpus`` would trust. Archives
   are kept (delete them by hand to save space; the extracted files are all training needs).

``base_url`` (``dataset.url``) replaces the canonical location with a mirror: an ``http(s)://`` or
``file://`` URL, or a local directory, that holds the files under their canonical names.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tqdm import tqdm

from lmtool.data.readers import (
    LM1B_HELDOUT,
    LM1B_TRAIN,
    LM1B_VOCAB,
    DatasetNotFoundError,
    wikitext_files,
)

TIMEOUT_S = 30  # per connection attempt and per blocking read
_CHUNK = 1 << 20
_USER_AGENT = "lmtool-prepare/0.1 (python-urllib)"


class PrepareError(RuntimeError):
    """Fetching a dataset failed; the one-line message says what to do."""


class DownloadError(PrepareError):
    """The file could not be downloaded (network, HTTP error, truncated transfer)."""


class ChecksumError(PrepareError):
    """A file's size or sha256 is not the published one, or an archive is unreadable or incomplete."""


@dataclass(frozen=True)
class Remote:
    """One downloadable file: its canonical URL, what it must look like, and what to extract from it.

    ``size``/``sha256`` are None where not published (then only the archive's integrity is checked).
    ``members`` are paths inside the archive, extracted to the same relative path under
    ``<data_dir>/<name>/``; none means the file itself is a source (lm1b's vocabulary).
    """

    url: str
    size: int | None = None
    sha256: str | None = None
    members: tuple[str, ...] = ()

    @property
    def filename(self) -> str:
        return urllib.parse.urlsplit(self.url).path.rsplit("/", 1)[-1]


_WIKITEXT = "https://s3.amazonaws.com/research.metamind.io/wikitext/"
SOURCES: dict[str, tuple[Remote, ...]] = {
    "wt2": (
        Remote(
            _WIKITEXT + "wikitext-2-v1.zip",
            size=4_475_746,
            sha256="92675f1d63015c1c8b51f1656a52d5bdbc33aafa60cc47a218a66e7ee817488c",
            members=tuple(wikitext_files("wt2")),
        ),
    ),
    "wt103": (
        Remote(
            _WIKITEXT + "wikitext-103-v1.zip",
            size=190_229_076,
            sha256="242ba0f20b329cfdf1ccc61e9e9e5b59becf189db7f7a81cd2a0e2fc31539590",
            members=tuple(wikitext_files("wt103")),
        ),
    ),
    "enwik8": (
        Remote(
            "http://mattmahoney.net/dc/enwik8.zip",
            size=36_445_475,
            sha256="547994d9980ebed1288380d652999f38a14fe291a6247c157c3d33d4932534bc",
            members=("enwik8",),
        ),
    ),
    # size from TensorFlow's word2vec tutorial (maybe_download('text8.zip', 31344016)); no published
    # sha256 found: the zip's CRCs are checked instead
    "text8": (Remote("http://mattmahoney.net/dc/text8.zip", size=31_344_016, members=("text8",)),),
    "lm1b": (
        # the vocabulary Transformer-XL uses (Jozefowicz et al. 2016), first: a small file fails fast.
        # Size and digest not published: read_lm1b_vocab checks that it parses and holds <S> and <UNK>
        Remote(f"https://github.com/rafaljozefowicz/lm/raw/master/{LM1B_VOCAB}"),
        Remote(
            "https://www.statmt.org/lm-benchmark/1-billion-word-language-modeling-benchmark-r13output.tar.gz",
            size=1_792_209_805,
            sha256="01ba60381110baf7f189dfd2b8374de371e8c9a340835793f190bdae9e90a34e",
            members=(*LM1B_TRAIN, LM1B_HELDOUT),
        ),
    ),
}


def fetch(
    name: str, data_dir: str | os.PathLike[str], *, base_url: str | None = None, log: Callable[[str], None] = print
) -> None:
    """Make ``<data_dir>/<name>/`` hold dataset ``name``'s source files (see the module docstring)."""
    remotes = SOURCES.get(name)
    if remotes is None:
        raise DatasetNotFoundError(f"dataset {name!r} has nothing to download; available: {', '.join(SOURCES)}")
    target = Path(data_dir) / name
    for remote in remotes:
        if remote.members and all((target / m).is_file() for m in remote.members):
            continue
        path = target / remote.filename
        if path.is_file():
            log(f"{name}: verifying {path}")
            verify(path, remote, name)
        else:
            url = source_url(remote, base_url)
            log(f"{name}: downloading {url}")
            download(url, path, remote, name)
        if remote.members:
            log(f"{name}: extracting {len(remote.members)} file(s) from {path.name}")
            extract(path, remote.members, target, name)


def source_url(remote: Remote, base_url: str | None) -> str:
    """The canonical URL, or ``base_url/<file name>`` (a local directory becomes a ``file://`` URL)."""
    if not base_url:
        return remote.url
    if "://" in base_url:
        return base_url.rstrip("/") + "/" + remote.filename
    return (Path(base_url).expanduser().resolve() / remote.filename).as_uri()


def download(url: str, dest: Path, remote: Remote, name: str) -> None:
    """Stream ``url`` into a temporary file next to ``dest``, check size and sha256, rename it to ``dest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            digest, size = _copy_url(url, out, dest, name)
        _check(Path(tmp), remote, name, size=size, sha256=digest, shown=dest)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _copy_url(url: str, out, dest: Path, name: str) -> tuple[str, int]:
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    h, n = hashlib.sha256(), 0
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=None, leave=False) as bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    h.update(chunk)
                    n += len(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, ValueError) as err:
        reason = " ".join(str(getattr(err, "reason", None) or err).split())  # one line, whatever the cause
        raise DownloadError(
            f"could not download {url} ({reason}): download it by hand to {dest}, or set dataset.url to a "
            f"mirror (http(s):// or file:// URL, or a directory) holding {dest.name}; then run "
            f"`lmtool-prepare dataset={name}` again"
        ) from None
    if total is not None and n != total:
        raise DownloadError(
            f"download of {url} stopped after {n:,} of {total:,} bytes: run `lmtool-prepare dataset={name}` again"
        )
    return h.hexdigest(), n


def verify(path: Path, remote: Remote, name: str) -> None:
    """Check a file that is already on disk: size and sha256 where known, else that the archive reads."""
    digest = file_sha256(path) if remote.sha256 else None
    _check(path, remote, name, size=path.stat().st_size, sha256=digest, shown=path)


def _check(path: Path, remote: Remote, name: str, *, size: int, sha256: str | None, shown: Path) -> None:
    fix = f"delete {shown} and run `lmtool-prepare dataset={name}` again (or check dataset.url)"
    if remote.size is not None and size != remote.size:
        raise ChecksumError(f"{shown} has {size:,} bytes, expected {remote.size:,}: {fix}")
    if remote.sha256 is not None:
        if sha256 != remote.sha256:
            raise ChecksumError(f"{shown} has sha256 {sha256}, expected {remote.sha256}: {fix}")
    elif remote.members:
        try:
            _test_archive(path)
        except _ARCHIVE_ERRORS as err:
            raise ChecksumError(f"{shown} is not a readable archive ({err}): {fix}") from None


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _test_archive(path: Path) -> None:
    """Read every member once: zip CRCs, or the whole gzip stream and its trailer for a tarball."""
    for _, stream in _members(path, None, lambda err: err):
        while stream.read(_CHUNK):
            pass


def extract(archive: Path, members: tuple[str, ...], target: Path, name: str) -> None:
    """Extract ``members`` of a zip or tar archive to ``target/<member>``, each via a temporary file.

    Destinations come from ``members`` (our constants), never from names stored in the archive. A
    damaged archive raises ChecksumError; a local write failure (disk full) propagates as OSError.
    """
    fix = f"delete {archive} and run `lmtool-prepare dataset={name}` again"

    def fail(err: BaseException) -> ChecksumError:
        return ChecksumError(f"{archive} could not be extracted ({err}): {fix}")

    wanted = {m: target / m for m in members if not (target / m).is_file()}
    for member, stream in _members(archive, set(wanted), fail):
        _write_atomic(stream, wanted.pop(member))
    if wanted:
        raise ChecksumError(f"{archive} has no member {next(iter(wanted))}: it is not the expected archive; {fix}")


_ARCHIVE_ERRORS = (OSError, EOFError, zlib.error, zipfile.BadZipFile, tarfile.TarError)


def _members(
    archive: Path, wanted: set[str] | None, fail: Callable[[BaseException], BaseException]
) -> Iterator[tuple[str, _GuardedStream]]:
    """``(name, stream)`` of each regular file of a zip or tar archive (only ``wanted`` names if given).

    Any failure to read the archive raises ``fail(err)``; a tarball is read in one sequential pass.
    """
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    if not info.is_dir() and (wanted is None or info.filename in wanted):
                        with zf.open(info) as src:
                            yield info.filename, _GuardedStream(src, fail)
        else:
            with tarfile.open(archive, "r|*") as tf:
                for info in tf:
                    member = info.name.removeprefix("./")
                    if info.isfile() and (wanted is None or member in wanted):
                        src = tf.extractfile(info)
                        if src is not None:
                            yield member, _GuardedStream(src, fail)
    except _ARCHIVE_ERRORS as err:
        raise fail(err) from None


class _GuardedStream:
    """A member's byte stream whose read errors (CRC, truncation) become ``fail(err)``."""

    def __init__(self, stream: IO[bytes], fail: Callable[[BaseException], BaseException]) -> None:
        self.stream, self.fail = stream, fail

    def read(self, n: int = -1) -> bytes:
        try:
            return self.stream.read(n)
        except _ARCHIVE_ERRORS as err:
            raise self.fail(err) from None


def _write_atomic(src: _GuardedStream, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(src, out, _CHUNK)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
