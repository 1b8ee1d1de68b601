"""Typed config schemas, registered in Hydra's ConfigStore.

Every YAML file under `conf/` is merged onto these dataclasses, so a misspelled key, an unknown option or
a value of the wrong type (`trainer.max_steps=abc`) fails at compose time with Hydra's message, before
any work starts. Choices that must come from a fixed set are checked in `validate` for the same reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from lmtool.models.registry import FAMILIES, get_family


@dataclass
class UpdateRuleConfig:
    name: str = "delta"  # sum | delta | delta_product
    impl: str = "auto"  # recurrent | chunk | cuda | auto
    qk_norm: str = "sum"  # sum (the paper's) | l2 (DeltaNet's) | none
    attn_norm: bool = True  # divide the read-out by z_t . q_t (off = the original toolkit's skip_attn_normalization)
    normalized_retrieval: bool = False  # delta rule reads the old value with the normaliser, as in the original toolkit
    n_householder: int = 1  # delta_product: Householder (delta) steps per token (DeltaProduct, arXiv 2502.10297)
    allow_neg_eigval: bool = False  # delta rules: beta in (0, 2), so I - beta k k^T may have eigenvalue -1
    decay: bool = False  # the state decays by a learned per-token gate (Gated DeltaNet, arXiv 2412.06464)
    eps: float = 1e-5


@dataclass
class FeatureMapConfig:
    name: str = "elu"  # elu | favor | dpfp | identity | relu | silu
    nu: int = 1  # dpfp: d_dot = 2 * nu * d_head
    n_features: int = 16  # favor: m random features, d_dot = 2 * m
    redraw: str = "every_forward"  # favor: every_forward | every_n | fixed
    redraw_interval: int = 1000  # favor with redraw=every_n: training forwards between redraws


@dataclass
class DatasetConfig:
    name: str = "ptb"
    data_dir: str | None = None  # None: $LMTOOL_DATA or ~/.cache/lmtool/data
    cache_dir: str | None = None  # None: $LMTOOL_CACHE or ~/.cache/lmtool
    min_freq: int = 1
    max_size: int | None = None
    url: str | None = None  # lmtool-prepare: mirror (http(s)://, file:// or a directory) holding the archives


@dataclass
class OptimizerConfig:
    name: str = "adam"  # adam | adamw | sgd | adagrad
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.0  # sgd
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8


@dataclass
class SchedulerConfig:
    name: str = "cosine"  # cosine | inv_sqrt | constant | dev_perf
    warmup_steps: int = 0
    eta_min: float = 0.0  # cosine: final learning rate
    decay_rate: float = 0.5  # dev_perf: factor applied when valid loss stops improving
    patience: int = 0  # dev_perf: evaluations without improvement before decaying
    min_lr: float = 0.0  # dev_perf: floor


@dataclass
class LoggerConfig:
    name: str = "default"  # default (train.log + metrics.jsonl) | wandb (also a wandb run)
    project: str = "lmtool"
    entity: str | None = None
    group: str | None = None
    mode: str = "offline"  # offline | online | disabled
    tags: list[str] = field(default_factory=list)


@dataclass
class TrainerConfig:
    max_steps: int = 2000
    batch_size: int = 32
    tgt_len: int = 128
    eval_tgt_len: int | None = None  # None: tgt_len
    eval_batch_size: int = 16
    eval_interval: int = 500
    eval_max_segments: int | None = None  # cap on periodic validation; the final evaluation is full
    final_eval: bool = True  # evaluate valid and test in full with the best weights at the end
    log_interval: int = 50
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "fp32"  # fp32 | bf16 | fp16
    clip: float = 0.25
    batch_chunk: int = 1  # gradient accumulation: split each batch into this many chunks
    varlen: bool = False
    num_threads: int = 0  # torch intra-op threads on CPU; 0 keeps torch's default
    # torch.compile the layers' small elementwise functions (lmtool/layers/compile.py); never required: a
    # failure warns once and runs eagerly
    compile: bool = False
    resume: str | None = None  # checkpoint path; by default a run resumes from <run dir>/checkpoints/last.pt
    progress: bool = True


@dataclass
class Config:
    # typed by the chosen family's schema (`conf/model/<name>.yaml` names it; lmtool/models/registry.py)
    model: Any = MISSING
    update_rule: UpdateRuleConfig = field(default_factory=UpdateRuleConfig)
    feature_map: FeatureMapConfig = field(default_factory=FeatureMapConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    seed: int = 1111


@dataclass
class EvalConfig:
    checkpoint: str = MISSING
    split: str = "test"  # valid | test
    # segment: non-overlapping segments of tgt_len (Transformer-XL memory carried when the model has one);
    # carry: each layer's state (fast weights or memory) carried across the whole split;
    # sliding: every token scored with exactly tgt_len tokens of context (windows shifted by one token)
    mode: str = "segment"  # segment | carry | sliding
    tgt_len: int | None = None  # None: the training run's evaluation length
    # model overrides applied before building the model (not part of the checkpoint's model signature);
    # None keeps the training run's value
    mem_len: int | None = None  # transformer, transformer_xl: memory length (0: no memory)
    clamp_len: int | None = None  # transformer_xl: relative distances beyond clamp_len share one encoding
    same_length: bool | None = None  # every query attends to the same number of keys (needs mem_len > 0)
    batch_size: int = 16  # segment/carry: parallel streams; sliding: windows per forward pass
    device: str = "auto"


@dataclass
class GenerateConfig:
    checkpoint: str = MISSING
    prompt: str | None = None  # the text to continue (word level: space-separated words; a newline is <eos>)
    prompt_file: str | None = None  # read the prompt from this file instead
    max_new_tokens: int = 100
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # keep the k most likely tokens; 0: all
    top_p: float = 1.0  # keep the smallest set of most likely tokens with this total probability; 1: all
    seed: int = 0
    num_samples: int = 1
    # None: the model's own context (its memory; the whole history if trained with carried state; else a
    # window of its training length); 0: unbounded; N: a window of the last N tokens
    max_context: int | None = None
    cache: bool = True  # false: recompute every step from scratch (the reference, for checking)
    device: str = "auto"


@dataclass
class PrepareConfig:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)


@dataclass
class RetrievalRunConfig:
    """One run of the synthetic retrieval task (arXiv 2102.11174, section 6.1); defaults are the paper's."""

    d_key: int = 64
    embedding_factor: float = 1.1  # key embedding width = embedding_factor * 2 S
    batch_size: int = 32
    lr: float = 1e-3  # Adam, otherwise default hyperparameters
    eval_interval: int = 100
    eval_sequences: int = 20  # every key of each fresh sequence is queried
    target_loss: float = 1e-3  # solved: stop
    patience_steps: int = 1000  # no new best evaluation loss for this many steps: stop
    max_steps: int | None = None  # None: 100,000 (the paper's) with grid=paper, 3,000 with grid=default
    seed: int = 1


@dataclass
class RetrievalSettingConfig:
    name: str = "capacity"  # capacity (L = S distinct keys) | update (L = 2 S pairs, keys repeat)
    memories: list[str] = field(default_factory=lambda: ["sum/elu", "softmax"])  # softmax | <sum|delta>/<map>
    sizes: list[int] = field(default_factory=lambda: [20, 40])  # grid=default: the numbers of keys S to run
    paper_max_size: int = 600  # grid=paper: S = 20, 40, ..., paper_max_size
    log_y: bool = False  # plot the loss on a log scale


@dataclass
class RetrievalConfig:
    setting: RetrievalSettingConfig = field(default_factory=RetrievalSettingConfig)
    grid: str = "default"  # default: setting.sizes | paper: S from 20 to setting.paper_max_size in steps of 20
    run: RetrievalRunConfig = field(default_factory=RetrievalRunConfig)
    workers: int = 2  # runs in parallel, one CPU thread each
    out_dir: str | None = None  # None: Hydra's run directory


CHOICES: dict[str, tuple[str, ...]] = {
    "feature_map.redraw": ("every_forward", "every_n", "fixed"),
    "optimizer.name": ("adam", "adamw", "sgd", "adagrad"),
    "scheduler.name": ("cosine", "inv_sqrt", "constant", "dev_perf"),
    "logger.name": ("default", "wandb"),
    "logger.mode": ("offline", "online", "disabled"),
    "trainer.device": ("auto", "cpu", "cuda"),
    "trainer.precision": ("fp32", "bf16", "fp16"),
    "split": ("valid", "test"),
    "mode": ("segment", "carry", "sliding"),
    "device": ("auto", "cpu", "cuda"),
    "setting.name": ("capacity", "update"),
    "grid": ("default", "paper"),
}


class ConfigError(ValueError):
    """A config value that composes but cannot be used; the message says which key and what to do."""


def _lookup(cfg: Any, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        if not hasattr(node, part) and not (hasattr(node, "__contains__") and part in node):
            return None
        node = node[part] if hasattr(node, "__getitem__") else getattr(node, part)
    return node


def validate(cfg: Any) -> None:
    """Check choices and ranges that the type system cannot, raising ConfigError with a one-line reason."""
    for key, allowed in CHOICES.items():
        value = _lookup(cfg, key)
        if value is not None and value not in allowed:
            raise ConfigError(f"{key}={value} is not one of {', '.join(allowed)}")
    trainer = _lookup(cfg, "trainer")
    if trainer is not None:
        for key in ("max_steps", "batch_size", "tgt_len", "eval_interval", "log_interval", "batch_chunk"):
            if trainer[key] < 1:
                raise ConfigError(f"trainer.{key} must be at least 1, got {trainer[key]}")
        if trainer.batch_size % trainer.batch_chunk:
            raise ConfigError(
                f"trainer.batch_size={trainer.batch_size} is not divisible by "
                f"trainer.batch_chunk={trainer.batch_chunk}"
            )
    model = _lookup(cfg, "model")
    if model is not None:
        _validate_model(cfg)


def _validate_model(cfg: Any) -> None:
    model = cfg.model
    try:
        family = get_family(model.name)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    problem = family.check(cfg) if family.check is not None else None
    if problem:
        raise ConfigError(problem)
    _validate_memory_and_adaptive(model)


def _validate_memory_and_adaptive(model: Any) -> None:
    for key in ("mem_len", "clamp_len"):
        if model.get(key, 0) < 0:
            raise ConfigError(f"model.{key} must be at least 0, got {model[key]}")
    if model.get("same_length", False) and model.mem_len < 1:
        raise ConfigError("model.same_length=true attends to the last mem_len keys: set model.mem_len > 0")
    if model.carry_over and "mem_len" in model:
        raise ConfigError(
            f"model.carry_over=true carries a fixed-size state; model={model.name} carries its past through "
            "a memory: set model.mem_len instead"
        )
    if model.div_val < 1:
        raise ConfigError(f"model.div_val must be at least 1, got {model.div_val}")
    cutoffs = list(model.cutoffs)
    if model.adaptive:
        if any(c < 1 for c in cutoffs) or cutoffs != sorted(set(cutoffs)):
            raise ConfigError(f"model.cutoffs={cutoffs} must be positive and strictly increasing")
        if model.d_model // model.div_val ** len(cutoffs) < 1:
            raise ConfigError(
                f"model.div_val={model.div_val} shrinks the last of {len(cutoffs) + 1} clusters below one dimension"
            )
    elif cutoffs or model.div_val != 1:
        raise ConfigError("model.cutoffs and model.div_val configure the adaptive softmax: set model.adaptive=true")


def compose_config(*overrides: str, config_name: str = "config") -> Any:
    """`conf/<config_name>.yaml` composed with Hydra overrides outside a Hydra app (tests, benchmark scripts),
    the typed schemas registered first."""
    from hydra import compose, initialize_config_module  # only callers outside the entry points need it

    register_configs()
    with initialize_config_module("lmtool.conf", version_base="1.3"):
        return compose(config_name, overrides=list(overrides))


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for family in FAMILIES.values():  # conf/model/<name>.yaml lists `<name>_schema` in its defaults
        cs.store(group="model", name=f"{family.name}_schema", node=family.schema)
    cs.store(name="base_eval", node=EvalConfig)
    cs.store(name="base_prepare", node=PrepareConfig)
    cs.store(name="base_generate", node=GenerateConfig)
    cs.store(name="base_retrieval", node=RetrievalConfig)
