"""``dist-finetune train | predict | evaluate | plot | demo``: a thin layer over the Python API.

Every ``train`` flag maps to one :class:`~dist_finetune.config.RunConfig` field; flags override the
``--config`` YAML file, which overrides the defaults. Works under ``accelerate launch -m dist_finetune``.
"""

from __future__ import annotations

import argparse
import sys

from .config import (COMPILE_MODES, MIXED_PRECISION, OPTIMIZERS, SCHEDULERS, SHARDINGS, STRATEGIES, RunConfig,
                     apply_overrides, load_yaml)
from .errors import UserError
from .model_selection import METRICS_FOR_BEST

# (flag, config field, argparse options); defaults stay in the dataclasses
TRAIN_FLAGS: list[tuple[str, str, dict]] = [
    ("--train-folder", "data.train_folder", {"help": "folder of class subfolders with training images"}),
    ("--val-folder", "data.val_folder", {"help": "folder of class subfolders with validation images"}),
    ("--val-split", "data.val_split", {"type": float, "help": "with no --val-folder, --val-csv or validation "
                                                              "split: stratified fraction of train held out (0.2)"}),
    ("--image-size", "data.image_size", {"type": int, "help": "square input size in pixels (224)"}),
    ("--batch-size", "data.batch_size", {"type": int, "help": "images per process per step (32)"}),
    ("--num-workers", "data.num_workers", {"type": int, "help": "data loader workers per process (default: from CPU count)"}),
    ("--no-augment", "data.augment", {"action": "store_false", "help": "deterministic train transforms (resize + center crop)"}),
    ("--skip-bad-images", "data.skip_bad_images", {"action": "store_true",
                                                    "help": "skip unreadable images (listed) instead of stopping"}),
    ("--dataset", "data.dataset", {"metavar": "NAME_OR_PATH", "help": "a `datasets` dataset instead of folders: a Hub "
                                   "name (needs internet), a folder of parquet/arrow files, or a save_to_disk folder"}),
    ("--image-column", "data.image_column", {"help": "--dataset: the column with the images (image)"}),
    ("--label-column", "data.label_column", {"help": "--dataset: the label column, ClassLabel or strings (label)"}),
    ("--train-split", "data.train_split", {"help": "--dataset: the split to train on (train)"}),
    ("--val-split-name", "data.val_split_name", {"help": "--dataset: the validation split (default: 'validation' "
                                                         "if the dataset has one, else --val-split of train)"}),
    ("--train-csv", "data.train_csv", {"help": "csv file of path,label rows to train on (instead of folders)"}),
    ("--val-csv", "data.val_csv", {"help": "csv file of path,label rows to validate on (else --val-split of train)"}),
    ("--image-root", "data.image_root", {"help": "folder the csv paths are relative to (default: the csv's folder)"}),
    ("--dedupe", "data.dedupe", {"action": "store_true", "help": "drop byte-identical images but the first (train "
                                                                 "before val); without it they are only reported"}),
    ("--class-weights", "data.class_weights", {"metavar": "{none,auto}", "help": "auto: weight the training loss by "
                                               "inverse class frequency, N / (C x n_c) (none)"}),
    ("--balanced-sampler", "data.balanced_sampler", {"action": "store_true", "help": "draw training samples so every "
                                                     "class is seen equally often (with replacement)"}),
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
    ("--initial-denom-lr", "strategy.initial_denom_lr", {"type": float, "help": "groups the strategy unfreezes "
                                                         "train at lr / this (100)"}),
    ("--max-epochs", "trainer.max_epochs", {"type": int, "help": "epochs (10)"}),
    ("--lr", "trainer.lr", {"type": float, "help": "head learning rate; unfrozen groups get lr / --initial-denom-lr"}),
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
    ("--process-group-timeout", "trainer.process_group_timeout_s",
     {"type": float, "metavar": "SECONDS", "help": "how long a rank waits for the others in any collective before "
                                                   "the job fails (1800; NCCL's own default is 600)"}),
    ("--channels-last", "trainer.channels_last",
     {"action": argparse.BooleanOptionalAction, "help": "channels_last memory format (default: on for conv nets on "
                                                        "GPU, off on CPU, where asking for it runs a check first)"}),
    ("--tune-cpu-allocator", "trainer.tune_cpu_allocator",
     {"action": argparse.BooleanOptionalAction, "help": "CPU runs: glibc malloc keeps freed memory for the next step "
                                                        "instead of page-faulting it anew (default: on)"}),
    ("--compile", "trainer.compile", {"action": "store_true",
                                      "help": "torch.compile the training forward (recompiles at each unfreeze)"}),
    ("--compile-backend", "trainer.compile_backend", {"help": "torch.compile backend (inductor)"}),
    ("--compile-mode", "trainer.compile_mode", {"choices": COMPILE_MODES, "help": "torch.compile mode"}),
    ("--check-every-n-steps", "trainer.check_every_n_steps",
     {"type": int, "help": "how often stop signals and a NaN loss are checked (10; each check syncs the GPU)"}),
    ("--deterministic", "trainer.deterministic", {"action": "store_true", "help": "GPU: deterministic kernels, no "
                                                  "TF32, no cuDNN benchmark: reruns and resumes bit-exact, slower"}),
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
    ("--sharding", "trainer.sharding", {"choices": SHARDINGS, "help": "ddp: every rank holds the whole model; fsdp2: "
                                        "parameters, gradients and optimizer state sharded over the ranks per "
                                        "backbone layer, every strategy (default: the launch config's)"}),
    ("--activation-checkpointing", "trainer.activation_checkpointing",
     {"action": "store_true", "help": "recompute each trainable backbone layer's activations in backward: less "
                                      "memory, about a third more compute"}),
    ("--report-to", "trainer.report_to", {"help": "experiment trackers: none (default), tensorboard, wandb, mlflow, "
                                                  "comet_ml, aim, all; comma-separated for several"}),
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
    train.add_argument("--dry-run", action="store_true", help="check everything (config, folders, images, backbone, "
                                                              "strategy) and print the plan; train nothing")

    from .prediction import PREDICTION_FORMATS, UNREADABLE_EXIT_CODE

    predict = commands.add_parser("predict", help="label images with a saved model",
                                  description="Write path, label, probability, error for each image, in input "
                                              "order (CSV or JSONL, streamed); works under accelerate launch.")
    predict.add_argument("--checkpoint", required=True, help="model.safetensors written by train")
    predict.add_argument("paths", nargs="*", help="image files and/or folders (searched recursively, sorted)")
    predict.add_argument("--paths-from", metavar="FILE", help="text file with one image path per line (after PATHS)")
    predict.add_argument("--dataset", metavar="NAME_OR_PATH",
                         help="instead of PATHS: a `datasets` dataset (Hub name, folder of parquet/arrow files, "
                              "save_to_disk folder); rows are named SPLIT[ROW]")
    predict.add_argument("--split", default="train", help="--dataset: the split to predict (train)")
    predict.add_argument("--image-column", default="image", help="--dataset: the column holding images (image)")
    predict.add_argument("--output", help="file to write instead of stdout (flushed after every batch)")
    predict.add_argument("--format", choices=PREDICTION_FORMATS,
                         help="csv or jsonl (default: jsonl for an --output ending in .jsonl, else csv)")
    predict.add_argument("--top-k", type=int, default=1,
                         help="also write the K most probable labels with their probabilities (1)")
    predict.add_argument("--batch-size", type=int, default=32, help="images per forward pass per process (32)")
    predict.add_argument("--num-workers", type=int, help="decoding workers per process (default: from CPU count)")
    predict.add_argument("--device", default="auto", help="auto (the GPU if there is one), cpu, cuda, cuda:N; "
                                                          "under accelerate launch the launcher's")
    predict.add_argument("--mixed-precision", choices=MIXED_PRECISION,
                         help="bf16 or fp16 autocast for inference (default: no, or the accelerate config's)")
    predict.add_argument("--tune-cpu-allocator", action=argparse.BooleanOptionalAction, default=True,
                         help="on the CPU: glibc malloc keeps freed memory for the next batch (default: on)")
    predict.add_argument("--strict", action="store_true",
                         help=f"exit with code {UNREADABLE_EXIT_CODE} if any file was unreadable (rows still written)")
    predict.add_argument("--no-progress-bar", dest="progress_bar", action="store_false", help="no tqdm bar")

    demo = commands.add_parser("demo", help="generate a shapes dataset and finetune on it, offline",
                               description="The built-in default run: no downloads, a few minutes on CPU.")
    demo.add_argument("--output-dir", default="demo_output", help="where data, model and metrics go (demo_output)")
    demo.add_argument("--max-epochs", type=int, default=8, help="epochs (8)")

    evaluate = commands.add_parser("evaluate", help="per-class report and confusion matrix of a saved model",
                                   description="Accuracy, per-class precision/recall/F1, confusion matrix and the "
                                               "highest-loss images of a model on a labelled image folder; works "
                                               "under accelerate launch (each image counted once).")
    evaluate.add_argument("--checkpoint", required=True, help="model.safetensors written by train")
    images = evaluate.add_mutually_exclusive_group(required=True)
    images.add_argument("--data-folder", help="folder of class subfolders named as the model's classes")
    images.add_argument("--dataset", help="a datasets dataset: Hub name, folder of parquet/arrow files, or "
                                          "save_to_disk folder")
    evaluate.add_argument("--split", default="test", help="with --dataset: the split to evaluate (test)")
    evaluate.add_argument("--image-column", default="image", help="with --dataset: the image column (image)")
    evaluate.add_argument("--label-column", default="label", help="with --dataset: the label column (label)")
    evaluate.add_argument("--output-dir", default="evaluation",
                          help="where report.json, confusion_matrix.csv and .png go (evaluation)")
    evaluate.add_argument("--batch-size", type=int, default=32, help="images per forward pass per process (32)")
    evaluate.add_argument("--num-workers", type=int, help="decoding workers per process (default: from CPU count)")
    evaluate.add_argument("--top-losses", type=int, default=10, help="highest-loss images to list (10)")

    plot = commands.add_parser("plot", help="draw RUN_DIR/curves.png (also of a run still going or preempted)",
                               description="Train/val loss, val accuracy and every param group's lr, with the "
                                           "unfreeze points and the best epoch marked, from a run's metrics files.")
    plot.add_argument("run_dir", help="a train --output-dir")
    plot.add_argument("--output", help="PNG to write (default: RUN_DIR/curves.png)")
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
        trainer, _, result = finetune_from_config(train_config(args), resume=args.resume, dry_run=args.dry_run)
        if args.dry_run:
            trainer.announce(result)
    except TrainingPreempted as stopped:
        print(f"dist-finetune train: {stopped}", file=sys.stderr)
        raise SystemExit(PREEMPTED_EXIT_CODE) from None
    finally:
        shutdown()


def run_predict(args: argparse.Namespace) -> None:
    from .distributed import launched_world_size, make_accelerator, shutdown
    from .errors import ConfigError
    from .prediction import UNREADABLE_EXIT_CODE, predict_to_file, shared_inputs
    from .sources import dataset_images
    from .task import ImageClassifier

    if bool(args.paths or args.paths_from) == bool(args.dataset):
        raise ConfigError("predict needs image files or folders (PATHS) and/or --paths-from FILE, or --dataset")
    try:
        # one process: plain --device; under a launcher: the accelerator shards the files over the ranks
        accelerator = make_accelerator(args.mixed_precision) if launched_world_size() > 1 else None
        task = ImageClassifier.load_from_checkpoint(args.checkpoint)
        if args.dataset:  # every rank reads the same split (memory-mapped), so the items agree
            paths, reader = dataset_images(args.dataset, args.split, args.image_column)
        else:
            paths, reader = shared_inputs(accelerator, args.paths, args.paths_from), None
        summary = predict_to_file(task, paths, args.output, args.format, args.top_k, args.progress_bar,
                                  batch_size=args.batch_size, device=args.device, mixed_precision=args.mixed_precision,
                                  num_workers=args.num_workers, accelerator=accelerator, reader=reader,
                                  tune_cpu_allocator=args.tune_cpu_allocator)
    finally:
        shutdown()
    if summary.images:
        print(f"dist-finetune predict: {summary.images} images in {summary.seconds:.1f} s "
              f"({summary.images / max(summary.seconds, 1e-9):.1f} images/s)", file=sys.stderr)
    if summary.unreadable:
        print(f"dist-finetune predict: warning: {summary.unreadable} of {summary.images} files could not be read "
              f"(rows with an empty label and an error; first: {summary.first_unreadable})", file=sys.stderr)
        if args.strict:
            raise SystemExit(UNREADABLE_EXIT_CODE)


def run_demo_command(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(args.output_dir, max_epochs=args.max_epochs)


def run_evaluate(args: argparse.Namespace) -> None:
    from .distributed import shutdown
    from .recipe import evaluate_checkpoint
    from .reports import evaluation_source

    try:
        source = evaluation_source(args.data_folder, args.dataset, args.split, args.image_column, args.label_column)
        evaluate_checkpoint(args.checkpoint, source, args.output_dir, args.batch_size, args.num_workers,
                            args.top_losses)
    finally:
        shutdown()


def run_plot(args: argparse.Namespace) -> None:
    from .errors import ConfigError
    from .plots import PlotsUnavailable, plot_curves

    try:
        print(f"curves written: {plot_curves(args.run_dir, args.output)}")
    except (PlotsUnavailable, FileNotFoundError) as error:  # no matplotlib, or not a run folder
        raise ConfigError(str(error)) from None


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    commands = {"train": run_train, "predict": run_predict, "demo": run_demo_command, "evaluate": run_evaluate,
                "plot": run_plot}
    try:
        commands[args.command](args)
    except UserError as error:  # names the file or setting and the fix; anything else is a bug: traceback
        print(f"dist-finetune {args.command}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
