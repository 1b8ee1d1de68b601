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


@dataclass
class ModelConfig:
    name: str = MISSING  # transformer | transformer_xl | fwm (token mixer of every block)
    n_layer: int = 4
    d_model: int = 256
    n_head: int = 4
    d_head: int = 64
    d_inner: int = 1024
    dropout: float = 0.1
    dropatt: float = 0.0
    pre_lnorm: bool = False
    tie_weight: bool = True
    pos_emb: bool = True  # sinusoidal absolute positions added to the embedding
    init_std: float = 0.02
    proj_init_std: float = 0.01
    # fast weights: pass each layer's state (detached) to the next segment, as the seed's
    # carry_over_fast_weight; reset at every epoch and every evaluation
    carry_over: bool = False
    # segment memory (transformer, transformer_xl): each layer attends to its input of the previous segments,
    # the last mem_len positions, detached; carried across training and evaluation segments, reset per epoch.
    # mem_len, same_length and clamp_len are evaluation-time knobs (not part of the checkpoint signature).
    mem_len: int = 0
    same_length: bool = False  # every query attends to the mem_len keys ending at itself (needs mem_len > 0)
    clamp_len: int = 0  # transformer_xl: relative distances beyond clamp_len use clamp_len's encoding; 0 = off
    untie_r: bool = False  # transformer_xl: a content/position bias pair per layer (default: one shared pair)
    # adaptive input + adaptive softmax (Baevski & Auli 2019; Grave et al. 2017): vocabulary clusters split at
    # `cutoffs`, cluster i embedded in d_model // div_val**i dimensions; tie_weight shares the tables between
    # input and output, tie_projs the tail clusters' projections
    adaptive: bool = False
    cutoffs: list[int] = field(default_factory=list)
    div_val: int = 1
    tie_projs: bool = True


@dataclass
class UpdateRuleConfig:
    name: str = "delta"  # sum | delta
    impl: str = "auto"  # recurrent | chunk | cuda | auto
    qk_norm: str = "sum"  # sum (the paper's) | l2 (DeltaNet's) | none
    attn_norm: bool = True  # divide the read-out by z_t . q_t (off = the seed's skip_attn_normalization)
    normalized_retrieval: bool = False  # delta rule reads the old value with the normaliser (seed's 44-46)
    eps: float = 1e-5


@dataclass
class FeatureMapConfig:
    name: str = "elu"  # elu | favor | dpfp | identity | relu
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
    resume: str | None = None  # checkpoint path; by default a run resumes from <run dir>/checkpoints/last.pt
    progress: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
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
    "model.name": ("transformer", "transformer_xl", "fwm"),
    "update_rule.name": ("sum", "delta"),
    "update_rule.impl": ("auto", "recurrent", "chunk", "cuda"),
    "update_rule.qk_norm": ("sum", "l2", "none"),
    "feature_map.name": ("elu", "favor", "dpfp", "identity", "relu"),
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
    if model is not None and model.name == "fwm":
        _validate_fast_weights(cfg)
    if model is not None:
        _validate_memory_and_adaptive(model)


def _validate_fast_weights(cfg: Any) -> None:
    rule, fmap, model = cfg.update_rule, cfg.feature_map, cfg.model
    if fmap.name == "identity" and (rule.qk_norm == "sum" or rule.normalized_retrieval):
        raise ConfigError(
            "feature_map=identity can be negative, so update_rule.qk_norm=sum and normalized_retrieval divide "
            "by sums that may vanish: use update_rule.qk_norm=l2 (DeltaNet) or none"
        )
    if rule.normalized_retrieval and rule.name != "delta":
        raise ConfigError("update_rule.normalized_retrieval=true needs update_rule=delta")
    if model.carry_over and model.pos_emb:
        raise ConfigError(
            "model.carry_over=true needs model.pos_emb=false: absolute positions restart at every segment "
            "while the carried fast weights do not"
        )


def _validate_memory_and_adaptive(model: Any) -> None:
    for key in ("mem_len", "clamp_len"):
        if model[key] < 0:
            raise ConfigError(f"model.{key} must be at least 0, got {model[key]}")
    if model.mem_len > 0 and model.name not in ("transformer", "transformer_xl"):
        raise ConfigError(f"model.mem_len applies to model=transformer or transformer_xl, not {model.name}")
    if model.same_length and model.mem_len < 1:
        raise ConfigError("model.same_length=true attends to the last mem_len keys: set model.mem_len > 0")
    if model.name == "transformer_xl" and model.pos_emb:
        raise ConfigError("model=transformer_xl uses relative positions: set model.pos_emb=false")
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


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    cs.store(name="base_eval", node=EvalConfig)
    cs.store(name="base_prepare", node=PrepareConfig)
    cs.store(name="base_retrieval", node=RetrievalConfig)
