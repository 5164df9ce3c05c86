"""Typed run configuration: dataclasses that load from YAML and take dotted overrides.

A run is four sections (data, model, strategy, trainer). The CLI, YAML files and the Python API all
build the same objects, so a value is validated in exactly one place (``__post_init__``); the
strategies' defaults and checks are the strategies' own (``finetuning``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from typing import Any, get_type_hints

import yaml

from .distributed import DEFAULT_PROCESS_GROUP_TIMEOUT_S
from .errors import ConfigError
from .fsdp import SHARDINGS
from .finetuning import (
    BUILTIN_TRAIN_BN,
    DEFAULT_INITIAL_DENOM_LR,
    DEFAULT_MILESTONES,
    DEFAULT_NUM_LAYERS,
    DEFAULT_UNFREEZE_EPOCH,
    STRATEGY_NAMES,
    check_initial_denom_lr,
    check_milestones,
    check_unfreeze_epoch,
    resolve_strategy,
)
from .model_selection import METRICS_FOR_BEST
from .trackers import tracker_names

STRATEGIES = STRATEGY_NAMES
MIXED_PRECISION = ("no", "fp16", "bf16")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULERS = ("cosine", "linear", "constant")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass
class DataConfig:
    train_folder: str | None = None
    val_folder: str | None = None
    val_split: float = 0.2
    image_size: int = 224
    batch_size: int = 32
    num_workers: int | None = None  # None: sized from the CPU count and local processes
    augment: bool = True
    skip_bad_images: bool = False
    # a `datasets` dataset instead of folders: a Hub name, a folder of parquet/arrow files, a save_to_disk folder
    dataset: str | None = None
    image_column: str = "image"
    label_column: str = "label"
    train_split: str = "train"
    val_split_name: str | None = None  # None: "validation" if the dataset has it, else val_split of train
    # or csv files of path,label rows, paths relative to image_root (default: the csv file's folder)
    train_csv: str | None = None
    val_csv: str | None = None
    image_root: str | None = None
    dedupe: bool = False  # drop byte-identical images but the first (train before val)
    class_weights: str = "none"  # "auto": inverse-frequency loss weights N / (C x n_c)
    balanced_sampler: bool = False  # draw every class equally often, seeded by (seed, epoch)

    def __post_init__(self) -> None:
        from .data import CLASS_WEIGHTS

        _require(0.0 < self.val_split < 1.0, f"val_split must be in (0, 1), got {self.val_split}")
        _require(self.image_size >= 16, f"image_size must be at least 16, got {self.image_size}")
        _require(self.batch_size >= 1, f"batch_size must be positive, got {self.batch_size}")
        _require(self.num_workers is None or self.num_workers >= 0, "num_workers must be >= 0")
        sources = [name for name in ("train_folder", "dataset", "train_csv") if getattr(self, name)]
        _require(len(sources) <= 1, f"data: set one source, not {' and '.join(sources)} (train_folder / "
                                    "--train-folder, dataset / --dataset, or train_csv / --train-csv)")
        for setting, needs in (("val_folder", "train_folder"), ("val_csv", "train_csv"), ("image_root", "train_csv"),
                               ("val_split_name", "dataset")):
            _require(getattr(self, setting) is None or getattr(self, needs) is not None,
                     f"data.{setting} is set but data.{needs} is not: {setting} belongs to that source")
        _require(self.class_weights in CLASS_WEIGHTS,
                 f"class_weights must be one of {CLASS_WEIGHTS}, got {self.class_weights!r}")


@dataclass
class ModelConfig:
    backbone: str = "resnet18"
    pretrained: bool = True
    weights: str | None = None  # local .safetensors / .pth file, for offline clusters
    head_hidden: int | None = None
    head_dropout: float = 0.0

    def __post_init__(self) -> None:
        _require(0.0 <= self.head_dropout < 1.0, f"head_dropout must be in [0, 1), got {self.head_dropout}")
        _require(self.head_hidden is None or self.head_hidden > 0, "head_hidden must be positive")


@dataclass
class StrategyConfig:
    name: str = "freeze_unfreeze"
    unfreeze_epoch: int = DEFAULT_UNFREEZE_EPOCH
    milestones: tuple[int, int] = DEFAULT_MILESTONES
    num_layers: int = DEFAULT_NUM_LAYERS
    train_bn: bool = BUILTIN_TRAIN_BN
    initial_denom_lr: float = DEFAULT_INITIAL_DENOM_LR  # groups the strategy adds train at trainer.lr / this

    def __post_init__(self) -> None:
        self.milestones = tuple(self.milestones)
        _require(self.name in STRATEGIES, f"unknown strategy {self.name!r}; choose one of {', '.join(STRATEGIES)}")
        check_unfreeze_epoch(self.unfreeze_epoch)
        check_milestones(self.milestones, self.num_layers)
        check_initial_denom_lr(self.initial_denom_lr)

    def strategy(self):
        """The strategy object this section describes, as ``Trainer.finetune`` takes it."""
        arguments = {"freeze_unfreeze": self.unfreeze_epoch, "unfreeze_milestones": (self.milestones, self.num_layers)}
        return resolve_strategy((self.name, arguments.get(self.name)), train_bn=self.train_bn,
                                initial_denom_lr=self.initial_denom_lr)


@dataclass
class TrainerConfig:
    max_epochs: int = 10
    lr: float = 1e-2  # the head's; groups a strategy adds get lr / strategy.initial_denom_lr (README, Defaults)
    optimizer: str = "adamw"
    weight_decay: float = 1e-4
    momentum: float = 0.9  # SGD only
    scheduler: str = "cosine"
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    mixed_precision: str | None = None  # None: what `accelerate launch`/its config says, else "no"
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = None
    seed: int = 42
    output_dir: str | None = None
    check_rank_consistency: bool = True
    process_group_timeout_s: float = DEFAULT_PROCESS_GROUP_TIMEOUT_S  # a rank waits this long for the others
    cache_frozen_features: bool = True  # only ever used when augment=False and the backbone is frozen+eval
    save_every_n_steps: int | None = None  # training-state checkpoints; one is always written per epoch
    keep_last: int = 2
    channels_last: bool | None = None  # None: on for conv nets on GPU, off on CPU; True on CPU is checked first
    tune_cpu_allocator: bool = True  # CPU runs: glibc malloc keeps freed memory for the next step (host_memory)
    compile: bool = False  # torch.compile the training forward; each strategy transition recompiles it
    compile_backend: str = "inductor"
    compile_mode: str | None = None  # torch.compile's mode: None (default), reduce-overhead, max-autotune, ...
    check_every_n_steps: int = 10  # stop signals and a non-finite loss are checked this often (a host sync)
    deterministic: bool = False  # CUDA: deterministic kernels, no TF32, no cuDNN benchmark (bit-exact, slower)
    progress_bar: bool = True
    unfreeze_warmup_epochs: float = 2.0  # a param group added mid-run ramps its lr up from ~0 over this span
    layer_decay: float | None = None  # lr x layer_decay ** (distance from the head) per backbone layer
    metric_for_best: str = "val_acc"  # model.safetensors = the best epoch by this (val_acc ties: lower val_loss)
    load_best_model_at_end: bool = True  # after finetune the task holds the best epoch's weights
    early_stopping_patience: int | None = None  # stop after this many epochs without improvement
    early_stopping_min_delta: float = 0.0
    log_every_n_steps: int = 10  # train loss and lrs to steps.jsonl (and trackers)
    report_to: str = "none"  # experiment trackers, comma-separated: tensorboard, wandb, mlflow, comet_ml, aim, all
    # "ddp": every rank holds the whole model; "fsdp2": parameters, gradients and optimizer state sharded per
    # backbone layer over the ranks, every strategy (docs/fsdp2.md). None: what the launch config asks for
    sharding: str | None = None
    activation_checkpointing: bool = False  # recompute trainable backbone layers in backward: less memory, ~1/3 slower

    def __post_init__(self) -> None:
        _require(self.max_epochs >= 1, f"max_epochs must be >= 1, got {self.max_epochs}")
        _require(self.lr > 0, f"lr must be positive, got {self.lr}")
        _require(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        _require(self.optimizer in OPTIMIZERS, f"unknown optimizer {self.optimizer!r}; choose {OPTIMIZERS}")
        _require(self.scheduler in SCHEDULERS, f"unknown scheduler {self.scheduler!r}; choose {SCHEDULERS}")
        _require(0 <= self.warmup_epochs < self.max_epochs, "warmup_epochs must be in [0, max_epochs)")
        _require(0.0 <= self.label_smoothing < 1.0, "label_smoothing must be in [0, 1)")
        _require(
            self.mixed_precision is None or self.mixed_precision in MIXED_PRECISION,
            f"mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}",
        )
        _require(self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be >= 1")
        _require(self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm must be positive")
        _require(self.save_every_n_steps is None or self.save_every_n_steps >= 1, "save_every_n_steps must be >= 1")
        _require(self.keep_last >= 1, f"keep_last must be >= 1, got {self.keep_last}")
        _require(self.compile_mode is None or self.compile_mode in COMPILE_MODES,
                 f"compile_mode must be one of {COMPILE_MODES}, got {self.compile_mode!r}")
        _require(self.check_every_n_steps >= 1, "check_every_n_steps must be >= 1")
        _require(self.process_group_timeout_s > 0,
                 f"process_group_timeout_s must be positive, got {self.process_group_timeout_s}")
        _require(self.unfreeze_warmup_epochs >= 0, "unfreeze_warmup_epochs must be >= 0")
        _require(self.layer_decay is None or 0 < self.layer_decay <= 1,
                 f"layer_decay must be in (0, 1], got {self.layer_decay}")
        _require(self.metric_for_best in METRICS_FOR_BEST,
                 f"metric_for_best must be one of {METRICS_FOR_BEST}, got {self.metric_for_best!r}")
        _require(self.early_stopping_patience is None or self.early_stopping_patience >= 1,
                 "early_stopping_patience must be >= 1")
        _require(self.early_stopping_min_delta >= 0, "early_stopping_min_delta must be >= 0")
        _require(self.log_every_n_steps >= 1, "log_every_n_steps must be >= 1")
        _require(self.sharding is None or self.sharding in SHARDINGS,
                 f"sharding must be one of {SHARDINGS}, got {self.sharding!r}")
        tracker_names(self.report_to)  # unknown names fail here; missing packages when training starts


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(section_cls: type, values: dict[str, Any], where: str) -> Any:
    known = {f.name for f in fields(section_cls)}
    unknown = sorted(set(values) - known)
    _require(not unknown, f"{where}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    return section_cls(**values)


def config_from_dict(raw: dict[str, Any], where: str = "config") -> RunConfig:
    """Build a RunConfig from nested dicts (as in a YAML file), rejecting unknown keys."""
    raw = dict(raw or {})
    sections = {f.name: f for f in fields(RunConfig)}
    unknown = sorted(set(raw) - set(sections))
    _require(not unknown, f"{where}: unknown section(s) {unknown}; sections are {sorted(sections)}")
    hints = get_type_hints(RunConfig)
    built = {name: _coerce(hints[name], raw.get(name) or {}, f"{where}: [{name}]") for name in sections}
    return RunConfig(**built)


def load_yaml(path: str | os.PathLike) -> RunConfig:
    """Read a run configuration from a YAML file with sections data/model/strategy/trainer."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist")
    with open(path) as handle:
        raw = yaml.safe_load(handle) or {}
    _require(isinstance(raw, dict), f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    return config_from_dict(raw, where=str(path))


def apply_overrides(config: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """Return a copy of ``config`` with dotted keys (``"trainer.lr"``) replaced, re-validated."""
    raw = config.to_dict()
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        _require(section in raw and key in raw[section], f"unknown setting {dotted!r}")
        raw[section][key] = value
    return config_from_dict(raw)
