"""Test helpers: compose the real config."""

from __future__ import annotations

from hydra import compose, initialize_config_module

import lmtool.train  # noqa: F401  (registers the config schemas)


def compose_config(*overrides: str, config_name: str = "config"):
    """Compose `conf/<config_name>.yaml` from the installed package with Hydra overrides."""
    with initialize_config_module("lmtool.conf", version_base="1.3"):
        return compose(config_name, overrides=list(overrides))


SMOKE = ("debug=smoke", "trainer.progress=false")
