"""Test helpers: compose the real config."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from lmtool.config import compose_config  # noqa: F401  (the tests' way to compose the real config)

SMOKE = ("debug=smoke", "trainer.progress=false")


def load_script(name: str) -> ModuleType:
    """`scripts/<name>.py` as a module (scripts are not a package), for tests that run their `main`."""
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
