"""The config groups compose, every option builds a model, and bad input fails before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

import lmtool
from lmtool.config import ConfigError, validate
from lmtool.models.build import build_model
from lmtool.train.optim import LRSchedule, build_optimizer
from tests.helpers import compose_config

CONF = Path(lmtool.__file__).resolve().parent.parent / "conf"
RETRIEVAL_GROUPS = {"setting"}  # groups of lmtool-retrieval's config (tests/train/test_retrieval_sweep.py)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


GROUPS = sorted(
    p.name for p in CONF.iterdir() if p.is_dir() and not p.name.startswith("_") and p.name not in RETRIEVAL_GROUPS
)


# options that need another value to make sense (identity features can be negative: no sum-normalisation);
# update rules and feature maps are tried on the plain fast weight layer with the paper's defaults (`model=fwm`),
# since the default model chooses its own pair (conf/model/gated_deltanet.yaml)
COMPANIONS = {
    **{("feature_map", name): ("model=fwm",) for name in options("feature_map")},
    **{("update_rule", name): ("model=fwm",) for name in options("update_rule")},
    **{("feature_map", name): ("model=fwm", "update_rule.qk_norm=l2") for name in ("identity", "silu")},
}


def test_groups_are_the_documented_ones():
    """The config groups named in the architecture exist under conf/."""
    expected = {"model", "update_rule", "feature_map", "dataset", "optimizer", "scheduler", "logger",
                "experiment", "debug"}
    assert expected <= set(GROUPS)


@pytest.mark.parametrize(
    "group,option", [(g, o) for g in GROUPS for o in options(g)], ids=lambda x: str(x)
)
def test_every_option_composes_and_builds(group, option):
    """Each option of each group composes onto the typed schema, validates, and builds a model that runs."""
    companions = COMPANIONS.get((group, option), ())
    cfg = compose_config(f"{group}={option}", "debug=smoke", *companions)
    validate(cfg)
    if group == "experiment" and cfg.dataset.name != "ptb":
        with torch.device("meta"):  # full-size recipes: built without memory (tests/conf/test_recipes.py)
            build_model(cfg, vocab_size=267_735)
        return
    model = build_model(cfg, vocab_size=50)
    optimizer = build_optimizer(cfg.optimizer, model.parameters())
    LRSchedule(optimizer, cfg.scheduler, cfg.trainer.max_steps).set_step(1)
    nll, _ = model(torch.randint(0, 50, (2, 7)), torch.randint(0, 50, (2, 7)))
    nll.mean().backward()
    optimizer.step()
    assert nll.shape == (2, 7) and torch.isfinite(nll).all()


def test_default_model_is_gated_deltanet_with_carried_fast_weights():
    """Without overrides lmtool-train trains the gated delta rule in Gated DeltaNet's layer, fast weights carried
    and no positions; `model=fwm` is the paper's Delta Network (delta rule, ELU+1, positions, nothing carried);
    a command-line update rule or feature map wins over the model option's choice."""
    cfg = compose_config()
    m, rule = cfg.model, cfg.update_rule
    assert (m.name, rule.name, rule.decay, rule.qk_norm) == ("fwm", "delta", True, "l2")
    assert cfg.feature_map.name == "identity"
    assert (m.short_conv, m.head_norm, m.output_gate, m.carry_over, m.pos_emb) == (4, True, True, True, False)
    paper = compose_config("model=fwm")
    assert (paper.update_rule.name, paper.update_rule.decay, paper.feature_map.name) == ("delta", False, "elu")
    assert (paper.model.short_conv, paper.model.carry_over, paper.model.pos_emb) == (0, False, True)
    assert compose_config("update_rule=gated_sum").update_rule.name == "sum"
    validate(cfg)


def test_wrong_type_fails_at_compose_time():
    """A value of the wrong type is rejected by the schema when composing."""
    with pytest.raises((ValidationError, ConfigCompositionException)):
        compose_config("trainer.max_steps=abc")


def test_misspelled_key_fails_at_compose_time():
    """A key that the schema does not have is rejected."""
    with pytest.raises((ConfigKeyError, ConfigCompositionException)):
        compose_config("trainer.max_step=10")


def test_unknown_option_fails_at_compose_time():
    """An option that is not a file of its group is rejected."""
    with pytest.raises(ConfigCompositionException):
        compose_config("model=nope")


@pytest.mark.parametrize(
    "override",
    ["model=fwm feature_map=identity", "update_rule=delta", "optimizer.name=lamb", "trainer.precision=fp8",
     "update_rule.qk_norm=max", "trainer.batch_chunk=3"],
)
def test_bad_choice_is_a_config_error(override):
    """Values outside a key's allowed set (or an indivisible batch_chunk, or identity features with the delta
    rule's sum-normalised keys: the default model with `update_rule=delta`) raise a one-line ConfigError."""
    cfg = compose_config(*override.split())
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert "\n" not in str(err.value)


def test_carry_over_with_absolute_positions_is_refused():
    """Carrying fast weights across segments while absolute positions restart is refused with a reason."""
    cfg = compose_config("model=fwm", "model.carry_over=true")
    with pytest.raises(ConfigError, match="pos_emb"):
        validate(cfg)
