"""`lmtool-prepare dataset=NAME`: build the encoded, cached corpus once, before any training run."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from lmtool.config import register_configs

register_configs()


@hydra.main(config_path="pkg://lmtool.conf", config_name="prepare", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    from lmtool.data import DatasetNotFoundError, load_corpus

    d = cfg.dataset
    try:
        corpus = load_corpus(
            d.name, data_dir=d.data_dir, cache_dir=d.cache_dir, min_freq=d.min_freq, max_size=d.max_size
        )
    except DatasetNotFoundError as err:
        sys.exit(f"lmtool-prepare: {err}")
    sizes = " / ".join(f"{len(getattr(corpus, s)):,}" for s in ("train", "valid", "test"))
    print(f"{corpus.name}: {len(corpus.vocab):,} symbols ({corpus.level} level), train / valid / test {sizes}")


def main() -> None:
    """Console script `lmtool-prepare`."""
    _hydra_main()


if __name__ == "__main__":
    main()
