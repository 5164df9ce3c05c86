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

from .augment import AUGMENT_POLICIES, TTA_MODES
from .distributed import DEFAULT_PROCESS_GROUP_TIMEOUT_S
from .errors import ConfigError, check_choice
from .fsdp import SHARDINGS
from .finetuning import (
    BUILTIN_TRAIN_BN,
    DEFAULT_INITIAL_DENOM_LR,
    DEFAULT_MILESTONES,
    DEFAULT_NUM_LAYERS,
    DEFAULT_UNFREEZE_EPOCH,
    BaseFinetuning,
    build_strategy,
    strategy_names,
)
from .lora import DEFAULT_LORA_ALPHA, DEFAULT_LORA_RANK
from .mixing import check_mixing
from .model_selection import METRICS_FOR_BEST
from .trackers import tracker_names

MIXED_PRECISION = ("no", "fp16", "bf16")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULERS = ("cosine", "linear", "constant")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def setting(default: Any, help: str | None = None, **cli: Any) -> Any:
    """A config field and its ``train`` flag (``cli.config_flags``): ``help`` (the CLI prints the default
    after it; a field without help has no flag) and flag options in ``cli``: ``flag`` (the name, else
    ``--field-name``), ``choices``, ``metavar``, ``negatable`` (``--x/--no-x``), ``cli_default`` (the CLI's
    value where the field's default is None)."""
    return field(default=default, metadata={"help": help, **cli} if help else {})


@dataclass
class DataConfig:
    train_folder: str | None = setting(None, "folder of class subfolders with training images")
    val_folder: str | None = setting(None, "folder of class subfolders with validation images")
    val_split: float = setting(0.2, "with no --val-folder, --val-csv or validation split: stratified fraction of "
                                    "train held out")
    image_size: int = setting(224, "square input size in pixels")
    batch_size: int = setting(32, "images per process per step")
    num_workers: int | None = setting(None, "data loader workers per process (default: from CPU count)")
    augment: bool = setting(True, "deterministic train transforms (resize + center crop)")
    augment_policy: str = setting("basic", "train transform: basic (random resized crop + flip); trivial or "
                                           "randaugment add torchvision's TrivialAugmentWide or RandAugment "
                                           "(docs/augmentation.md)", flag="--augment", choices=AUGMENT_POLICIES)
    skip_bad_images: bool = setting(False, "skip unreadable images (listed) instead of stopping")
    dataset: str | None = setting(None, "a `datasets` dataset instead of folders: a Hub name (needs internet), a "
                                        "folder of parquet/arrow files, or a save_to_disk folder", metavar="NAME_OR_PATH")
    image_column: str = setting("image", "--dataset: the column with the images")
    label_column: str = setting("label", "--dataset: the label column, ClassLabel or strings")
    train_split: str = setting("train", "--dataset: the split to train on")
    val_split_name: str | None = setting(None, "--dataset: the validation split (default: 'validation' if the "
                                               "dataset has one, else --val-split of train)")
    train_csv: str | None = setting(None, "csv file of path,label rows to train on (instead of folders)")
    val_csv: str | None = setting(None, "csv file of path,label rows to validate on (else --val-split of train)")
    image_root: str | None = setting(None, "folder the csv paths are relative to (default: the csv's folder)")
    dedupe: bool = setting(False, "drop byte-identical images but the first (train before val); without it they "
                                  "are only reported")
    class_weights: str = setting("none", "auto: weight the training loss by inverse class frequency, N / (C x n_c)",
                                 metavar="{none,auto}")
    balanced_sampler: bool = setting(False, "draw training samples so every class is seen equally often (with "
                                            "replacement), seeded by (seed, epoch)")
    scan: bool | None = setting(None, "decode every image before training, cached (default: on, except for a "
                                      "packed dataset, scanned when packed); --no-scan for data you trust: an "
                                      "image that fails to load is replaced by the next readable one, named, and "
                                      "counted at the end", negatable=True)

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
        check_choice("class_weights", self.class_weights, CLASS_WEIGHTS)
        check_choice("data.augment_policy (--augment)", self.augment_policy, AUGMENT_POLICIES)
        _require(self.augment or self.augment_policy == "basic",
                 f"data.augment_policy {self.augment_policy!r} needs augment on: drop --no-augment")


@dataclass
class ModelConfig:
    backbone: str = setting("resnet18", "torchvision name (resnet18, ...) or timm:NAME")
    pretrained: bool = setting(True, "random initialisation, no download")
    weights: str | None = setting(None, "local backbone weights (.safetensors or .pth state dict), for offline use")
    head_hidden: int | None = setting(None, "hidden units of an optional head layer")
    head_dropout: float = setting(0.0, "dropout before the head's linear layers")

    def __post_init__(self) -> None:
        _require(0.0 <= self.head_dropout < 1.0, f"head_dropout must be in [0, 1), got {self.head_dropout}")
        _require(self.head_hidden is None or self.head_hidden > 0, "head_hidden must be positive")


@dataclass
class StrategyConfig:
    """The strategy's settings; only those of the chosen strategy are used, and checked (by the strategy)."""

    name: str = setting("freeze_unfreeze", "finetuning strategy", flag="--strategy", choices=strategy_names())
    unfreeze_epoch: int = setting(DEFAULT_UNFREEZE_EPOCH, "freeze_unfreeze: epoch the backbone joins (lora: its "
                                                          "adapters)")
    milestones: tuple[int, int] = setting(DEFAULT_MILESTONES, "unfreeze_milestones: last K layers join at A, the "
                                                              "rest at B", metavar=("A", "B"))
    num_layers: int = setting(DEFAULT_NUM_LAYERS, "unfreeze_milestones: K, layers unfrozen at A")
    train_bn: bool = setting(BUILTIN_TRAIN_BN, "train BatchNorm layers of frozen parts (when off they stay in "
                                               "eval mode with their pretrained statistics)", negatable=True)
    initial_denom_lr: float = setting(DEFAULT_INITIAL_DENOM_LR, "groups the strategy unfreezes train at "
                                                                "trainer.lr / this")
    lora_rank: int = setting(DEFAULT_LORA_RANK, "lora: rank R of the adapters (needs pip install "
                                                "'dist_finetune[lora]')")
    lora_alpha: float = setting(DEFAULT_LORA_ALPHA, "lora: an adapter's output is scaled by alpha / R")
    lora_targets: tuple[str, ...] | None = setting(None, "lora: backbone module names or glob patterns to adapt "
                                                         "(default: the Linears of a ViT; the Conv2d and Linears of a "
                                                         "conv net; depthwise convs skipped)", metavar="PATTERN")
    lora_dropout: float = setting(0.0, "lora: dropout on the adapters' input")

    def __post_init__(self) -> None:
        self.milestones = tuple(self.milestones)
        if self.lora_targets is not None:  # YAML: one name or a list
            self.lora_targets = (self.lora_targets,) if isinstance(self.lora_targets, str) else tuple(self.lora_targets)
        self.strategy()  # the strategy checks its settings

    def strategy(self) -> BaseFinetuning:
        """The strategy object this section describes, as ``Trainer.finetune`` takes it."""
        return build_strategy(self.name, unfreeze_epoch=self.unfreeze_epoch, milestones=self.milestones,
                              num_layers=self.num_layers, train_bn=self.train_bn,
                              initial_denom_lr=self.initial_denom_lr, lora_rank=self.lora_rank,
                              lora_alpha=self.lora_alpha, lora_targets=self.lora_targets,
                              lora_dropout=self.lora_dropout)


@dataclass
class TrainerConfig:
    max_epochs: int = setting(10, "epochs")
    lr: float = setting(1e-2, "head learning rate; unfrozen groups get lr / --initial-denom-lr")  # README, Defaults
    optimizer: str = setting("adamw", "optimizer", choices=OPTIMIZERS)
    weight_decay: float = setting(1e-4, "weight decay")
    momentum: float = 0.9  # SGD only
    scheduler: str = setting("cosine", "lr schedule after warmup", choices=SCHEDULERS)
    warmup_epochs: float = setting(0.0, "linear warmup length in epochs")
    label_smoothing: float = setting(0.0, "cross-entropy label smoothing")
    mixup: float = setting(0.0, "MixUp's Beta alpha: blend each training image and its label with the previous "
                                "one in the batch (0: off; 0.2 is common)")
    cutmix: float = setting(0.0, "CutMix's Beta alpha: paste a box of the previous image in the batch, labels "
                                 "by area (0: off; 1.0 is common); with --mixup too, each batch takes one of them")
    tta: str = setting("none", "test-time augmentation of validation, evaluate and predict: flip averages the "
                               "probabilities of each image and its mirror image", choices=TTA_MODES)
    mixed_precision: str | None = setting(None, "no, fp16 or bf16 (default: the accelerate config's, else no)",
                                          choices=MIXED_PRECISION)
    gradient_accumulation_steps: int = setting(1, "steps per update")
    max_grad_norm: float | None = setting(None, "clip gradients to this norm")
    seed: int = setting(42, "seed for init, sample order and augmentation")
    output_dir: str | None = setting(None, "where model.safetensors and metrics.jsonl go", cli_default="outputs")
    resume: str | None = setting(None, "'latest' (newest intact checkpoint in --output-dir; nothing to resume starts "
                                       "fresh) or a checkpoint folder; a resumed run's config.yaml names the one used")
    check_rank_consistency: bool = setting(True, "skip the cross-rank parameter checksum", flag="--no-rank-check")
    process_group_timeout_s: float = setting(DEFAULT_PROCESS_GROUP_TIMEOUT_S, "how long a rank waits for the others "
                                             "in any collective before the job fails (NCCL's own default is 600)",
                                             flag="--process-group-timeout", metavar="SECONDS")
    cache_frozen_features: bool = setting(True, "recompute frozen backbone features every epoch (cached by default "
                                                "with --no-augment)", flag="--no-feature-cache")
    save_every_n_steps: int | None = setting(None, "also save training state every N optimizer steps (one is always "
                                                   "written per epoch)")
    keep_last: int = setting(2, "training-state checkpoints to keep")
    channels_last: bool | None = setting(None, "channels_last memory format (default: on for conv nets on GPU, off "
                                               "on CPU, where asking for it runs a check first)", negatable=True)
    tune_cpu_allocator: bool = setting(True, "CPU runs: glibc malloc keeps freed memory for the next step instead of "
                                             "page-faulting it anew", negatable=True)
    compile: bool = setting(False, "torch.compile the training forward (recompiles at each unfreeze)")
    compile_backend: str = setting("inductor", "torch.compile backend")
    compile_mode: str | None = setting(None, "torch.compile mode", choices=COMPILE_MODES)
    check_every_n_steps: int = setting(10, "how often stop signals and a NaN loss are checked (each check syncs the "
                                           "GPU)")
    deterministic: bool = setting(False, "GPU: deterministic kernels, no TF32, no cuDNN benchmark: reruns and resumes "
                                         "bit-exact, slower")
    progress_bar: bool = setting(True, "no tqdm bar")
    unfreeze_warmup_epochs: float = setting(2.0, "a newly unfrozen param group ramps its lr up from ~0 over this many "
                                                 "epochs")
    layer_decay: float | None = setting(None, "layer-wise lr decay D: a backbone layer's lr is its group's lr x "
                                              "D^(distance from the head)")
    metric_for_best: str = setting("val_acc", "model.safetensors keeps the best epoch by this (ties go to the lower "
                                              "val_loss)", choices=METRICS_FOR_BEST)
    load_best_model_at_end: bool = setting(True, "end with the last epoch's weights in memory (files: best and last "
                                                 "either way)", flag="--keep-last-model")
    early_stopping_patience: int | None = setting(None, "stop after N epochs without improvement of "
                                                        "--metric-for-best (default: off)")
    early_stopping_min_delta: float = setting(0.0, "smallest change that counts as an improvement")
    log_every_n_steps: int = setting(10, "train loss and lrs to OUTPUT_DIR/steps.jsonl every N optimizer steps")
    report_to: str = setting("none", "experiment trackers: none, tensorboard, wandb, mlflow, comet_ml, aim, all; "
                                     "comma-separated for several")
    sharding: str | None = setting(None, "ddp: every rank holds the whole model; fsdp2: parameters, gradients and "
                                         "optimizer state sharded over the ranks per backbone layer, every strategy "
                                         "(docs/fsdp2.md) (default: the launch config's, else ddp)", choices=SHARDINGS)
    activation_checkpointing: bool = setting(False, "recompute each trainable backbone layer's activations in "
                                                    "backward: less memory, about a third more compute")
    ema_decay: float | None = setting(None, "keep an exponential moving average of the weights with this decay "
                                            "(warmed up as (1+step)/(10+step)), validated each epoch beside them and "
                                            "eligible as the best model (docs/ema.md) (default: off)")

    def __post_init__(self) -> None:
        _require(self.max_epochs >= 1, f"max_epochs must be >= 1, got {self.max_epochs}")
        _require(self.lr > 0, f"lr must be positive, got {self.lr}")
        _require(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        _require(self.optimizer in OPTIMIZERS, f"unknown optimizer {self.optimizer!r}; choose {OPTIMIZERS}")
        _require(self.scheduler in SCHEDULERS, f"unknown scheduler {self.scheduler!r}; choose {SCHEDULERS}")
        _require(0 <= self.warmup_epochs < self.max_epochs, "warmup_epochs must be in [0, max_epochs)")
        _require(0.0 <= self.label_smoothing < 1.0, "label_smoothing must be in [0, 1)")
        check_mixing(self.mixup, self.cutmix)
        check_choice("tta (--tta)", self.tta, TTA_MODES)
        check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISION, unset_allowed=True)
        _require(self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be >= 1")
        _require(self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm must be positive")
        _require(self.save_every_n_steps is None or self.save_every_n_steps >= 1, "save_every_n_steps must be >= 1")
        _require(self.keep_last >= 1, f"keep_last must be >= 1, got {self.keep_last}")
        check_choice("compile_mode", self.compile_mode, COMPILE_MODES, unset_allowed=True)
        _require(self.check_every_n_steps >= 1, "check_every_n_steps must be >= 1")
        _require(self.process_group_timeout_s > 0,
                 f"process_group_timeout_s must be positive, got {self.process_group_timeout_s}")
        _require(self.unfreeze_warmup_epochs >= 0, "unfreeze_warmup_epochs must be >= 0")
        _require(self.layer_decay is None or 0 < self.layer_decay <= 1,
                 f"layer_decay must be in (0, 1], got {self.layer_decay}")
        check_choice("metric_for_best", self.metric_for_best, METRICS_FOR_BEST)
        _require(self.early_stopping_patience is None or self.early_stopping_patience >= 1,
                 "early_stopping_patience must be >= 1")
        _require(self.early_stopping_min_delta >= 0, "early_stopping_min_delta must be >= 0")
        _require(self.log_every_n_steps >= 1, "log_every_n_steps must be >= 1")
        check_choice("sharding", self.sharding, SHARDINGS, unset_allowed=True)
        _require(self.ema_decay is None or 0 < self.ema_decay < 1,
                 f"ema_decay must be in (0, 1), got {self.ema_decay}: the weight the average keeps per step, "
                 "e.g. 0.999 (leave it unset for no average)")
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
