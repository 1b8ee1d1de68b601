"""Test helpers: compose the real config."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from hydra import compose, initialize_config_module

import lmtool.train  # noqa: F401  (registers the config schemas)


def compose_config(*overrides: str, config_name: str = "config"):
    """Compose `conf/<config_name>.yaml` from the installed package with Hydra overrides."""
    with initialize_config_module("lmtool.conf", version_base="1.3"):
        return compose(config_name, overrides=list(overrides))


SMOKE = ("debug=smoke", "trainer.progress=false")


def load_script(name: str) -> ModuleType:
    """`scripts/<name>.py` as a module (scripts are not a package), for tests that run their `main`."""
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
