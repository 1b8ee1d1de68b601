"""One checkpoint format: a dict of state_dicts and plain values, written atomically."""

from __future__ import annotations

import pickle
import random
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch

from lmtool.data import Vocab
from lmtool.train.rundir import replaced

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says which file and why."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (a full disk, a quota); the previous file is kept."""


class _KeepWriteError:
    """A file for torch.save that keeps the OSError of a failed write: torch reports it as a RuntimeError
    ("unexpected pos ...") without the reason, and the reason (a full disk) is what a user must read."""

    def __init__(self, f) -> None:
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.f.flush()


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write `payload` to `path` whole or not at all (a temporary file, synced to disk, renamed over `path`).

    A crash or a failed write (OSError: no space left, file too large) leaves the previous `path` as it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with replaced(path) as f:
        sink = _KeepWriteError(f)
        try:
            torch.save({"format_version": FORMAT_VERSION, **payload}, sink)
        except RuntimeError:
            if sink.error is not None:
                raise sink.error from None
            raise


def copy_checkpoint(source: Path, path: Path) -> None:
    """Copy a checkpoint file to `path` whole or not at all, like `save_checkpoint`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with source.open("rb") as src, replaced(path) as dst:
        shutil.copyfileobj(src, dst, 1 << 24)


_LOAD_ERRORS = (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile)


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint saved by `save_checkpoint`, refusing missing, corrupt or foreign files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except _LOAD_ERRORS as err:
        # the first sentence: torch goes on about what may have caused it
        first_line = str(err).strip().splitlines()[0].split(". ")[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt or not an lmtool checkpoint ({first_line})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} is not an lmtool checkpoint of format {FORMAT_VERSION}")
    return ckpt


def checkpoint_step(path: Path) -> int | None:
    """The step a checkpoint file holds, read without loading its tensors (memory-mapped); None if unreadable."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except _LOAD_ERRORS:
        return None
    return ckpt.get("step") if isinstance(ckpt, dict) else None


def rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_pos": random.getstate()[2],
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_compatible(ckpt: dict, identity: dict, path: Path) -> None:
    """Refuse a checkpoint trained with another vocabulary or an incompatible model config."""
    vocab, want = ckpt.get("vocab", {}), identity["vocab"]
    if vocab.get("fingerprint") != want["fingerprint"]:
        raise CheckpointError(
            f"checkpoint {path} was trained on another vocabulary ({vocab.get('dataset')}, "
            f"{vocab.get('size')} symbols) than this run ({want['dataset']}, {want['size']} symbols)"
        )
    diff = _diff(ckpt.get("signature", {}), identity["signature"])
    if diff:
        raise CheckpointError(f"checkpoint {path} has an incompatible model config: {diff}")


def _diff(old: dict, new: dict, prefix: str = "") -> str:
    """The first key whose value differs. A key that only one side has is skipped: options added or
    dropped by a later lmtool version (checkpoints keep loading; a changed shape still fails the load)."""
    for key in sorted(set(old) & set(new)):
        a, b = old[key], new[key]
        if isinstance(a, dict) and isinstance(b, dict):
            inner = _diff(a, b, f"{prefix}{key}.")
            if inner:
                return inner
        elif a != b:
            return f"{prefix}{key} is {a} in the checkpoint, {b} now"
    return ""


def load_weights(model: torch.nn.Module, ckpt: dict, path: Path) -> None:
    """Load the checkpoint's model weights, refusing (one line) weights that do not fit the model."""
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise CheckpointError(f"checkpoint {path} does not fit the model its config builds ({first})") from None


def vocab_record(vocab: Vocab, dataset: str, level: str) -> dict:
    """What a checkpoint stores of its vocabulary: the fingerprint checked on resume and evaluation, and the
    symbols themselves, so that generation can turn ids into text without the corpus."""
    return {
        "fingerprint": vocab.fingerprint, "size": len(vocab), "dataset": dataset, "level": level,
        "symbols": vocab.symbols, "unk": vocab.unk,
    }  # fmt: skip
