"""The WikiText-103 paper recipes compose, validate and build the paper's model sizes; each has its script."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import lmtool
from lmtool.config import validate
from lmtool.models.build import build_model
from tests.helpers import compose_config

REPO = Path(lmtool.__file__).resolve().parent.parent
WT103_VOCAB = 267_735  # types of WikiText-103 train incl. <eos>; the data itself is not needed

# Parameters with that vocabulary, counted on the meta device (adaptive input and softmax, tied tables, no
# projections with div_val 1). Fast weight models add the beta projection (n_head per layer; the original
# toolkit's qkvb_net), Transformer-XL the position projection r_net (d_model x n_head d_head per layer) and
# one shared content/position bias pair. Small: 44.0M, medium: 89.8-89.9M (the paper's small and medium
# settings).
PARAMETERS = {
    "wt103_small_transformer": 44_018_394,
    "wt103_small_transformer_xl": 44_280_794,
    "wt103_small_linear_transformer": 44_018_394,
    "wt103_small_performer": 44_018_394,
    "wt103_small_delta_elu": 44_034_778,
    "wt103_small_delta_favor": 44_034_778,
    "wt103_small_delta_dpfp": 44_034_778,
    "wt103_small_delta_elu_carry": 44_034_778,
    "wt103_medium_transformer": 89_833_434,
    "wt103_medium_transformer_xl": 90_882_522,
    "wt103_medium_linear_transformer": 89_833_434,
    "wt103_medium_performer": 89_833_434,
    "wt103_medium_delta_elu": 89_866_202,
    "wt103_medium_delta_favor": 89_866_202,
    "wt103_medium_delta_dpfp": 89_866_202,
    "wt103_medium_delta_elu_carry": 89_866_202,
    # lmtool's own modern recipes: DeltaNet's layer adds the output gate, short convolution, head norm (and decay
    # gate, or a second key/value/beta per token for DeltaProduct) to the same sizes
    "wt103_small_gated_deltanet": 44_338_394,
    "wt103_small_delta_product": 44_878_810,
    "wt103_medium_gated_deltanet": 90_997_466,
    "wt103_medium_delta_product": 93_127_130,
    # the recurrent fast weight programmers (arXiv 2106.06295) and the SRWM / LSTM at the small setting: their
    # slow nets project to more (or, for the SRWM, fewer) fast-net inputs than the Delta Network's q, k, v, beta
    "wt103_small_delta_mlp": 46_149_082,
    "wt103_small_delta_delta": 44_575_706,
    "wt103_small_delta_rnn": 44_575_706,
    "wt103_small_delta_lstm": 47_262_682,
    "wt103_small_rec_delta": 44_135_386,
    "wt103_small_srwm": 43_338_714,
    "wt103_small_lstm": 45_345_754,
}
RECIPES = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("wt103_*.yaml"))
SETTINGS = {"small": (128, 16, 256, 96, 500_000), "medium": (256, 32, 384, 56, 400_000)}
EVAL_MODE = {"transformer_xl": "segment", "delta_elu_carry": "carry"}  # the others: sliding window
FAST_WEIGHTS = {  # recipe model -> (update rule, feature map)
    "linear_transformer": ("sum", "elu"),
    "performer": ("sum", "favor"),
    "delta_elu": ("delta", "elu"),
    "delta_favor": ("delta", "favor"),
    "delta_dpfp": ("delta", "dpfp"),
    "delta_elu_carry": ("delta", "elu"),
}
MODERN = {  # recipe model -> (update rule, decay, Householder steps): DeltaNet's layer, no positions
    "gated_deltanet": ("delta", True, 1),
    "delta_product": ("delta_product", False, 2),
}
RECURRENT = ("delta_mlp", "delta_delta", "delta_rnn", "delta_lstm", "rec_delta", "srwm", "lstm")  # model= names


def setting_and_model(recipe: str) -> tuple[str, str]:
    _, setting, model = recipe.split("_", 2)
    return setting, model


def test_every_recipe_has_an_expected_size():
    """The recipes on disk are exactly the ones whose sizes are recorded here."""
    assert RECIPES == sorted(PARAMETERS)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_builds_the_paper_size(recipe):
    """A recipe composes, validates and builds (on the meta device) a model of the recorded size."""
    cfg = compose_config(f"experiment={recipe}")
    validate(cfg)
    with torch.device("meta"):
        model = build_model(cfg, WT103_VOCAB)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == PARAMETERS[recipe]
    if "transformer_xl" not in recipe and setting_and_model(recipe)[1] not in (*MODERN, *RECURRENT):
        # Transformer-XL adds 0.26M (small) / 1.05M (medium) for r_net
        assert abs(n_params - (44.0e6 if "_small_" in recipe else 89.85e6)) < 0.05e6


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_follows_the_original_settings(recipe):
    """Sizes, context, batch, schedule and the model variant are the original toolkit's for the recipe's setting."""
    setting, model = setting_and_model(recipe)
    d_model, d_head, tgt_len, batch_size, max_steps = SETTINGS[setting]
    cfg = compose_config(f"experiment={recipe}")
    m, t = cfg.model, cfg.trainer
    assert cfg.dataset.name == "wt103"
    assert (m.n_layer, m.d_model, m.n_head, m.d_head, m.d_inner, m.dropout) == (16, d_model, 8, d_head, 2048, 0.1)
    assert m.adaptive and list(m.cutoffs) == [20000, 40000, 200000] and m.div_val == 1 and m.tie_weight
    assert (t.tgt_len, t.eval_tgt_len, t.batch_size, t.clip) == (tgt_len, tgt_len, batch_size, 0.25)
    assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.scheduler.name) == ("adam", 2.5e-4, "cosine")
    if recipe == "wt103_medium_transformer_xl":  # the original toolkit's medium Transformer-XL script
        assert (t.max_steps, cfg.scheduler.warmup_steps) == (200_000, 1000)
    else:
        assert (t.max_steps, cfg.scheduler.warmup_steps) == (max_steps, 2000)
    assert m.get("mem_len", 0) == (tgt_len if model == "transformer_xl" else 0)
    assert m.carry_over == (model == "delta_elu_carry")
    assert m.pos_emb == (model not in ("transformer_xl", "delta_elu_carry", *MODERN))
    assert m.name == (model if model in ("transformer", "transformer_xl", *RECURRENT) else "fwm")
    assert m.pre_lnorm == (model in RECURRENT)  # IDSIA/recurrent-fwp's --pre_lnorm for limited context
    if model in FAST_WEIGHTS:
        assert (cfg.update_rule.name, cfg.feature_map.name) == FAST_WEIGHTS[model]
        assert cfg.update_rule.attn_norm == (cfg.update_rule.name == "sum")  # delta: Table 3's best setting
        if cfg.feature_map.name == "favor":
            assert cfg.feature_map.n_features == 16  # m, the original toolkit's performer_proj_dim
        if cfg.feature_map.name == "dpfp":
            assert cfg.feature_map.nu == (1 if setting == "small" else 2)  # Table 5; original toolkit: dpfp_n_roll
    if model in MODERN:
        rule = cfg.update_rule
        assert (rule.name, rule.decay, rule.n_householder) == MODERN[model]
        assert (rule.qk_norm, rule.attn_norm, cfg.feature_map.name) == ("l2", False, "identity")
        assert (m.short_conv, m.head_norm, m.output_gate) == (4, True, True)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_script_trains_and_evaluates_as_the_paper(recipe):
    """scripts/paper/<recipe>.sh trains the recipe, evaluates it as its header says, and is in the index."""
    setting, model = setting_and_model(recipe)
    tgt_len = SETTINGS[setting][2]
    mode = EVAL_MODE.get(model, "sliding")
    header = (REPO / "conf" / "experiment" / f"{recipe}.yaml").read_text()
    script = (REPO / "scripts" / "paper" / f"{recipe}.sh").read_text()
    assert "# @package _global_" in header and "# Reproduces: " in header
    assert f"experiment={recipe} hydra.run.dir=" in script and "lmtool-prepare dataset=wt103" in script
    eval_args = re.search(r'^EVAL_ARGS="(.*)"$', script, re.M).group(1)
    assert eval_args.startswith(f"mode={mode} tgt_len={tgt_len}")
    assert eval_args in header  # the header shows the same evaluation command
    if mode == "segment":
        assert f"mem_len={tgt_len} clamp_len={tgt_len}" in eval_args
    assert f"]({recipe}.sh)" in (REPO / "scripts" / "paper" / "README.md").read_text()  # listed in the index


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_names_the_paper_table_and_number(recipe):
    """A recipe's header names the paper table and valid / test perplexity it reproduces (or that it has
    none), and the scripts/paper index shows the same number."""
    header = (REPO / "conf" / "experiment" / f"{recipe}.yaml").read_text()
    row = next(
        line for line in (REPO / "scripts" / "paper" / "README.md").read_text().splitlines()
        if f"[`{recipe}.sh`]" in line
    )
    found = re.search(r"#   (Table \d)[^\n]*\n#   Paper valid / test perplexity: (\d+\.\d) / (\d+\.\d)", header)
    unread = re.search(r"# Reproduces: [^\n]*(arXiv \d+\.\d+)[^\n]*\n#   (Table \d)[^\n]*\n#   Paper valid / test "
                       r"perplexity: not recorded here", header)
    if unread is not None:  # a paper row whose number could not be read: nothing is made up in its place
        paper, table = unread.groups()
        assert row.endswith(f"| not recorded ({table} of {paper}) |")
        return
    if found is None:
        assert "# Reproduces: nothing published; not in the paper" in header and row.endswith("| not in the paper |")
        return
    table, valid, test = found.groups()
    assert float(valid) < float(test) < 40.0  # the paper's WikiText-103 perplexities
    assert row.endswith(f"| {valid} / {test} ({table}) |")
