"""Shared fixtures: PTB is parsed and encoded once per session into a temporary cache."""

from pathlib import Path

import pytest

from lmtool.data import Corpus, load_corpus


@pytest.fixture(scope="session")
def ptb_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ptb-cache")


@pytest.fixture(scope="session")
def ptb(ptb_cache: Path) -> Corpus:
    return load_corpus("ptb", cache_dir=ptb_cache)


@pytest.fixture(scope="session")
def ptb_char(ptb_cache: Path) -> Corpus:
    return load_corpus("ptb_char", cache_dir=ptb_cache)
