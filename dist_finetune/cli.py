"""``dist-finetune train | predict | demo``: a thin layer over the Python API.

Every ``train`` flag maps to one :class:`~dist_finetune.config.RunConfig` field; flags override the
``--config`` YAML file, which overrides the defaults. Works under ``accelerate launch -m dist_finetune``.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from .config import COMPILE_MODES, MIXED_PRECISION, OPTIMIZERS, SCHEDULERS, STRATEGIES, RunConfig, apply_overrides, load_yaml
from .errors import UserError
from .model_selection import METRICS_FOR_BEST

# (flag, config field, argparse options); defaults stay in the dataclasses
TRAIN_FLAGS: list[tuple[str, str, dict]] = [
    ("--train-folder", "data.train_folder", {"help": "folder of class subfolders with training images"}),
    ("--val-folder", "data.val_folder", {"help": "folder of class subfolders with validation images"}),
    ("--val-split", "data.val_split", {"type": float, "help": "without --val-folder: stratified fraction of train held out (0.2)"}),
    ("--image-size", "data.image_size", {"type": int, "help": "square input size in pixels (224)"}),
    ("--batch-size", "data.batch_size", {"type": int, "help": "images per process per step (32)"}),
    ("--num-workers", "data.num_workers", {"type": int, "help": "data loader workers per process (default: from CPU count)"}),
    ("--no-augment", "data.augment", {"action": "store_false", "help": "deterministic train transforms (resize + center crop)"}),
    ("--skip-bad-images", "data.skip_bad_images", {"action": "store_true",
                                                    "help": "skip unreadable images (listed) instead of stopping"}),
    ("--backbone", "model.backbone", {"help": "torchvision name (resnet18, ...) or timm:NAME (resnet18)"}),
    ("--no-pretrained", "model.pretrained", {"action": "store_false", "help": "random initialisation, no download"}),
    ("--weights", "model.weights", {"help": "local backbone weights (.safetensors or .pth state dict), for offline use"}),
    ("--head-hidden", "model.head_hidden", {"type": int, "help": "hidden units of an optional head layer"}),
    ("--head-dropout", "model.head_dropout", {"type": float, "help": "dropout before the head's linear layers (0)"}),
    ("--strategy", "strategy.name", {"choices": STRATEGIES, "help": "finetuning strategy (freeze_unfreeze)"}),
    ("--unfreeze-epoch", "strategy.unfreeze_epoch", {"type": int, "help": "freeze_unfreeze: epoch the backbone joins"}),
    ("--milestones", "strategy.milestones", {"type": int, "nargs": 2, "metavar": ("A", "B"),
                                             "help": "unfreeze_milestones: last K layers join at A, the rest at B"}),
    ("--num-layers", "strategy.num_layers", {"type": int, "help": "unfreeze_milestones: K, layers unfrozen at A"}),
    ("--train-bn", "strategy.train_bn", {"action": argparse.BooleanOptionalAction,
                                         "help": "train BatchNorm layers of frozen parts (default: no, they stay "
                                                 "in eval mode with their pretrained statistics)"}),
    ("--max-epochs", "trainer.max_epochs", {"type": int, "help": "epochs (10)"}),
    ("--lr", "trainer.lr", {"type": float, "help": "head learning rate; unfrozen groups get lr/10"}),
    ("--optimizer", "trainer.optimizer", {"choices": OPTIMIZERS, "help": "adamw (default) or sgd"}),
    ("--weight-decay", "trainer.weight_decay", {"type": float, "help": "weight decay (1e-4)"}),
    ("--scheduler", "trainer.scheduler", {"choices": SCHEDULERS, "help": "lr schedule after warmup (cosine)"}),
    ("--warmup-epochs", "trainer.warmup_epochs", {"type": float, "help": "linear warmup length in epochs (0)"}),
    ("--label-smoothing", "trainer.label_smoothing", {"type": float, "help": "cross-entropy label smoothing (0)"}),
    ("--mixed-precision", "trainer.mixed_precision", {"choices": MIXED_PRECISION,
                                                      "help": "no, fp16 or bf16 (default: the accelerate config's)"}),
    ("--gradient-accumulation-steps", "trainer.gradient_accumulation_steps", {"type": int, "help": "steps per update (1)"}),
    ("--max-grad-norm", "trainer.max_grad_norm", {"type": float, "help": "clip gradients to this norm"}),
    ("--seed", "trainer.seed", {"type": int, "help": "seed for init, sample order and augmentation (42)"}),
    ("--output-dir", "trainer.output_dir", {"help": "where model.safetensors and metrics.jsonl go (outputs)"}),
    ("--no-feature-cache", "trainer.cache_frozen_features", {"action": "store_false",
                                                             "help": "recompute frozen backbone features every epoch "
                                                                     "(cached by default with --no-augment)"}),
    ("--save-every-n-steps", "trainer.save_every_n_steps", {"type": int,
                                                            "help": "also save training state every N optimizer steps"}),
    ("--keep-last", "trainer.keep_last", {"type": int, "help": "training-state checkpoints to keep (2)"}),
    ("--no-rank-check", "trainer.check_rank_consistency", {"action": "store_false",
                                                           "help": "skip the cross-rank parameter checksum"}),
    ("--channels-last", "trainer.channels_last", {"action": argparse.BooleanOptionalAction,
                                                  "help": "channels_last memory format (default: on for conv nets)"}),
    ("--compile", "trainer.compile", {"action": "store_true",
                                      "help": "torch.compile the training forward (recompiles at each unfreeze)"}),
    ("--compile-backend", "trainer.compile_backend", {"help": "torch.compile backend (inductor)"}),
    ("--compile-mode", "trainer.compile_mode", {"choices": COMPILE_MODES, "help": "torch.compile mode"}),
    ("--check-every-n-steps", "trainer.check_every_n_steps",
     {"type": int, "help": "how often stop signals and a NaN loss are checked (10; each check syncs the GPU)"}),
    ("--no-progress-bar", "trainer.progress_bar", {"action": "store_false", "help": "no tqdm bar"}),
    ("--unfreeze-warmup-epochs", "trainer.unfreeze_warmup_epochs",
     {"type": float, "help": "a newly unfrozen param group ramps its lr up from ~0 over this many epochs"}),
    ("--layer-decay", "trainer.layer_decay", {"type": float, "help": "layer-wise lr decay D: a backbone layer's lr "
                                                                    "is its group's lr x D^(distance from the head)"}),
    ("--metric-for-best", "trainer.metric_for_best", {"choices": METRICS_FOR_BEST,
                                                      "help": "model.safetensors keeps the best epoch by this "
                                                              "(val_acc; ties go to the lower val_loss)"}),
    ("--keep-last-model", "trainer.load_best_model_at_end",
     {"action": "store_false", "help": "end with the last epoch's weights in memory (files: best and last either way)"}),
    ("--early-stopping-patience", "trainer.early_stopping_patience",
     {"type": int, "help": "stop after N epochs without improvement of --metric-for-best (off)"}),
    ("--early-stopping-min-delta", "trainer.early_stopping_min_delta",
     {"type": float, "help": "smallest change that counts as an improvement (0)"}),
    ("--log-every-n-steps", "trainer.log_every_n_steps",
     {"type": int, "help": "train loss and lrs to OUTPUT_DIR/steps.jsonl every N optimizer steps (10)"}),
]
DEFAULT_OUTPUT_DIR = "outputs"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dist-finetune", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="finetune a backbone on an image folder",
                                description="Finetune a pretrained backbone on train/<class>/* images.")
    train.add_argument("--config", help="YAML file with sections data/model/strategy/trainer; flags override it")
    for flag, dest, options in TRAIN_FLAGS:
        train.add_argument(flag, dest=dest, default=argparse.SUPPRESS, **options)
    train.add_argument("--resume", help="'latest' (newest intact checkpoint in --output-dir; nothing to resume "
                                        "starts fresh) or a checkpoint folder")

    predict = commands.add_parser("predict", help="label images with a saved model",
                                  description="Print (or write as CSV) path, label, probability for each image.")
    predict.add_argument("--checkpoint", required=True, help="model.safetensors written by train")
    predict.add_argument("paths", nargs="+", help="image files and/or folders (searched recursively)")
    predict.add_argument("--output", help="CSV file to write instead of stdout")
    predict.add_argument("--batch-size", type=int, default=32, help="images per forward pass (32)")

    demo = commands.add_parser("demo", help="generate a shapes dataset and finetune on it, offline",
                               description="The built-in default run: no downloads, a few minutes on CPU.")
    demo.add_argument("--output-dir", default="demo_output", help="where data, model and metrics go (demo_output)")
    demo.add_argument("--max-epochs", type=int, default=8, help="epochs (8)")
    return parser


def train_config(args: argparse.Namespace) -> RunConfig:
    """Defaults < YAML file < command-line flags."""
    config = load_yaml(args.config) if args.config else RunConfig()
    overrides = {dest: getattr(args, dest) for _, dest, _ in TRAIN_FLAGS if hasattr(args, dest)}
    if not config.trainer.output_dir and "trainer.output_dir" not in overrides:
        overrides["trainer.output_dir"] = DEFAULT_OUTPUT_DIR
    return apply_overrides(config, overrides)


def run_train(args: argparse.Namespace) -> None:
    from .distributed import shutdown
    from .preemption import PREEMPTED_EXIT_CODE, TrainingPreempted
    from .recipe import finetune_from_config

    try:
        finetune_from_config(train_config(args), resume=args.resume)
    except TrainingPreempted as stopped:
        print(f"dist-finetune train: {stopped}", file=sys.stderr)
        raise SystemExit(PREEMPTED_EXIT_CODE) from None
    finally:
        shutdown()


def run_predict(args: argparse.Namespace) -> None:
    from .task import ImageClassifier
    from .images import list_image_files

    model = ImageClassifier.load_from_checkpoint(args.checkpoint)
    paths: list[str] = []
    for item in args.paths:
        if Path(item).is_dir():
            paths += list_image_files(item)
        else:
            paths.append(item)
    rows = [(path, label, f"{score:.4f}") for path, (label, score) in
            zip(paths, model.predict_with_scores(paths, args.batch_size))]
    handle = open(args.output, "w", newline="") if args.output else sys.stdout
    try:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "probability"])
        writer.writerows(rows)
    finally:
        if args.output:
            handle.close()


def run_demo_command(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(args.output_dir, max_epochs=args.max_epochs)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    commands = {"train": run_train, "predict": run_predict, "demo": run_demo_command}
    try:
        commands[args.command](args)
    except UserError as error:  # names the file or setting and the fix; anything else is a bug: traceback
        print(f"dist-finetune {args.command}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
