"""The model-family registry: a new token mixer plugs in with one registration; old checkpoints keep loading."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import lmtool
from lmtool.config import Config, ConfigError, validate
from lmtool.layers.mixer import ModelConfig, TokenMixer
from lmtool.models import registry
from lmtool.models.build import build_model, model_signature
from lmtool.models.generation import CachedDecoder, Context, reference_scores
from lmtool.models.state import LMState
from lmtool.train.checkpoint import CheckpointError, check_compatible
from tests.helpers import compose_config


@dataclass
class PrefixMeanConfig(ModelConfig):
    decay: float = 1.0


class PrefixMean(TokenMixer):
    """A toy mixer: y_t = W (sum_{j<=t} decay^(t-j) x_j); state: the running sum `[B, d_model]`."""

    def __init__(self, d_model: int, decay: float) -> None:
        super().__init__()
        self.proj, self.decay = torch.nn.Linear(d_model, d_model, bias=False), decay

    def forward(self, x, state=None, return_state=False):
        total = torch.zeros_like(x[:, 0]) if state is None else state
        outs = []
        for t in range(x.shape[1]):
            total = self.decay * total + x[:, t]
            outs.append(total)
        return self.proj(torch.stack(outs, 1)), (total if return_state else None)


@pytest.fixture
def prefix_mean_family():
    family = registry.ModelFamily(
        "prefix_mean", PrefixMeanConfig, lambda cfg: lambda i: PrefixMean(cfg.model.d_model, cfg.model.decay),
        check=lambda cfg: None if 0 < cfg.model.decay <= 1 else "model.decay must be in (0, 1]",
    )  # fmt: skip
    registry.register(family)
    yield family
    del registry.FAMILIES["prefix_mean"]


def test_a_new_family_needs_only_its_registration(prefix_mean_family):
    """A mixer registered in one line is validated, built, signed, and decodes token by token exactly."""
    cfg = OmegaConf.structured(Config)
    cfg.model = OmegaConf.structured(PrefixMeanConfig(name="prefix_mean", n_layer=2, d_model=16, d_inner=32,
                                                      dropout=0.0, pos_emb=False, decay=0.9))  # fmt: skip
    validate(cfg)
    model = build_model(cfg, 23).double().eval()
    assert model_signature(cfg)["model"]["decay"] == 0.9
    tokens = torch.randint(0, 23, (2, 9))
    decoder = CachedDecoder(model, Context("unbounded"), 2)
    with torch.no_grad():
        cached = [decoder.feed(tokens[:, :3])] + [decoder.feed(tokens[:, t : t + 1]) for t in range(3, 8)]
        reference = [reference_scores(model, tokens[:, :t], 3, Context("unbounded")) for t in range(3, 9)]
    torch.testing.assert_close(torch.stack(cached), torch.stack(reference), rtol=1e-9, atol=1e-9)
    cfg.model.decay = 2.0
    with pytest.raises(ConfigError, match="decay"):
        validate(cfg)


def test_unknown_model_name_lists_the_registered_ones():
    """An unregistered model name fails validation with the list of names."""
    cfg = compose_config("model=fwm")
    cfg.model.name = "lstm_typo"
    with pytest.raises(ConfigError, match="transformer, transformer_xl, fwm"):
        validate(cfg)


def test_no_module_outside_the_registry_lists_model_names():
    """Model names appear as string literals only in the registry (a new family edits no other module)."""
    root = Path(lmtool.__file__).parent
    names = "|".join(registry.FAMILIES)
    pattern = re.compile(rf"[\"'](?:{names})[\"']")
    sources = [p for p in root.rglob("*.py") if p.name != "registry.py"]
    offenders = [str(p.relative_to(root)) for p in sources if pattern.search(p.read_text())]
    assert offenders == []


def test_checkpoints_of_the_previous_layout_keep_loading():
    """A signature with keys of the former flat model schema and a carried list of layer states still load."""
    cfg = compose_config("model=fwm", "debug=smoke")
    identity = {"vocab": {"fingerprint": "x"}, "signature": model_signature(cfg)}
    old = {"vocab": {"fingerprint": "x"}, "signature": model_signature(cfg)}
    old["signature"]["model"] = {**old["signature"]["model"], "untie_r": False}  # the flat schema had it
    check_compatible(old, identity, Path("old.pt"))
    old["signature"]["model"]["d_model"] = 64
    with pytest.raises(CheckpointError, match="d_model is 64 in the checkpoint, 32 now"):
        check_compatible(old, identity, Path("old.pt"))
    memory = torch.zeros(2, 5, 8)
    assert LMState.from_payload([memory, memory]).seen == 5  # the memory length was the position offset
    assert LMState.from_payload([(memory, None)]).seen == 0
    assert LMState.from_payload(LMState([memory], 7).to_payload()).seen == 7
