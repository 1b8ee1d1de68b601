"""Shared fixtures: one corpus cache per test session."""

from __future__ import annotations

import os

import pytest

import lmtool.train  # noqa: F401  (registers the config schemas)


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory):
    """Point the corpus cache at one directory per session so PTB is parsed once, never in ~/.cache."""
    cache = tmp_path_factory.mktemp("lmtool-cache")
    old = os.environ.get("LMTOOL_CACHE")
    os.environ["LMTOOL_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("LMTOOL_CACHE", None)
    else:
        os.environ["LMTOOL_CACHE"] = old
