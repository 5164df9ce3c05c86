"""``dist-finetune train | lr-find | predict | evaluate | plot | pack | demo``: a thin layer over the Python API.

Every ``train`` flag is one :class:`~dist_finetune.config.RunConfig` field, generated from the field (its
help, type and default: ``config.setting``); flags override the ``--config`` YAML file, which overrides the
defaults. ``lr-find`` takes train's data, model and strategy flags, the trainer ones its sweep uses, and the
sweep's own (:class:`~dist_finetune.lr_finder.LRSweep` fields, generated the same way). Works under
``accelerate launch -m dist_finetune``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import fields
from pathlib import Path
from types import UnionType
from typing import Any, get_args, get_origin, get_type_hints

from .augment import TTA_MODES
from .config import MIXED_PRECISION, RunConfig, apply_overrides, load_yaml
from .errors import UserError


def config_flag(section: str, spec: dataclasses.Field, kind: Any) -> tuple[str, str, dict]:
    """``--name`` (or the field's ``flag``), ``section.name``, argparse options: the type from the annotation,
    and the help with the field's default after it."""
    meta, default = spec.metadata, spec.default
    negated = default is True and not meta.get("negatable")  # a flag that turns an on-by-default setting off
    flag = meta.get("flag") or f"--{'no-' if negated else ''}{spec.name.replace('_', '-')}"
    options = {key: meta[key] for key in ("choices", "metavar") if key in meta}
    types = [t for t in get_args(kind) if t is not type(None)] if get_origin(kind) is UnionType else [kind]
    shown = meta.get("cli_default", default)
    if meta.get("negatable"):
        options["action"] = argparse.BooleanOptionalAction
        shown = None if default is None else ("on" if default else "off")
    elif types[0] is bool:
        options["action"], shown = "store_false" if default else "store_true", None
    elif get_origin(types[0]) is tuple:  # tuple[int, int]: that many values; tuple[str, ...]: one or more
        items = get_args(types[0])
        options.update(type=items[0], nargs="+" if items[-1] is Ellipsis else len(items))
        shown = None if default is None else " ".join(map(str, default))
    elif "choices" not in options:
        options["type"] = types[0]
    options["help"] = meta["help"] + (f" (default: {shown})" if shown is not None else "")
    return flag, f"{section}.{spec.name}", options


def settings() -> list[tuple[str, dataclasses.Field, Any]]:
    """Every RunConfig field: (section name, the field, its resolved annotation), in the fields' order."""
    return [setting for section in fields(RunConfig)
            for setting in section_settings(section.name, get_type_hints(RunConfig)[section.name])]


def section_settings(section: str, section_class: type) -> list[tuple[str, dataclasses.Field, Any]]:
    """Every field of one settings dataclass: (``section``, the field, its resolved annotation)."""
    kinds = get_type_hints(section_class)
    return [(section, spec, kinds[spec.name]) for spec in fields(section_class)]


def config_flags() -> list[tuple[str, str, dict]]:
    """One ``train`` flag per RunConfig field that has help (``config.setting``), in the fields' order:
    (flag, "section.field", argparse options)."""
    return [config_flag(section, spec, kind) for section, spec, kind in settings() if spec.metadata.get("help")]


TRAIN_FLAGS = config_flags()
CLI_DEFAULTS = {f"{section}.{spec.name}": spec.metadata["cli_default"] for section, spec, _ in settings()
                if "cli_default" in spec.metadata}

# lr-find: every data, model and strategy flag, and these trainer ones (the sweep sets the lr, and runs no epochs)
LR_FIND_TRAINER_SETTINGS = ("optimizer", "weight_decay", "label_smoothing", "mixed_precision",
                            "gradient_accumulation_steps", "max_grad_norm", "seed", "output_dir",
                            "process_group_timeout_s", "tune_cpu_allocator", "deterministic", "progress_bar",
                            "layer_decay")
LR_FIND_OUTPUT_HELP = "where lr_find.json and lr_find.png go (default: outputs)"


def lr_find_flags() -> list[tuple[str, str, dict]]:
    """``lr-find``'s flags: train's for what it shares with ``train`` (``LR_FIND_TRAINER_SETTINGS``), then the
    sweep's own (``LRSweep`` fields, dest ``sweep.NAME``)."""
    from .lr_finder import LRSweep

    shared = [(flag, dest, options) for flag, dest, options in TRAIN_FLAGS
              if not dest.startswith("trainer.") or dest.split(".")[1] in LR_FIND_TRAINER_SETTINGS]
    shared = [(flag, dest, {**options, "help": LR_FIND_OUTPUT_HELP} if dest == "trainer.output_dir" else options)
              for flag, dest, options in shared]
    return shared + [config_flag(*setting) for setting in section_settings("sweep", LRSweep)]


PACKED_DATA_SETTINGS = ("train_folder", "val_folder", "train_csv", "val_csv", "image_root", "skip_bad_images",
                        "dedupe")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dist-finetune", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="finetune a backbone on an image folder",
                                description="Finetune a pretrained backbone on train/<class>/* images.")
    train.add_argument("--config", help="YAML file with sections data/model/strategy/trainer; flags override it")
    for flag, dest, options in TRAIN_FLAGS:
        train.add_argument(flag, dest=dest, default=argparse.SUPPRESS, **options)
    train.add_argument("--dry-run", action="store_true", help="check everything (config, folders, images, backbone, "
                                                              "strategy) and print the plan; train nothing")

    lr_find = commands.add_parser("lr-find", help="sweep the head lr exponentially and suggest one (fastai's lr_find)",
                                  description="Train what the strategy's first epoch trains, on a copy of the model, "
                                              "with an lr growing from --start-lr to --end-lr; write the loss "
                                              "against the lr (OUTPUT_DIR/lr_find.json, .png) and print the "
                                              "suggested --lr. Works under accelerate launch.")
    lr_find.add_argument("--config", help="train's YAML file (its data/model/strategy/trainer); flags override it")
    for flag, dest, options in lr_find_flags():
        lr_find.add_argument(flag, dest=dest, default=argparse.SUPPRESS, **options)

    from .prediction import PREDICTION_FORMATS, UNREADABLE_EXIT_CODE

    tta_help = "test-time augmentation: flip averages the probabilities of each image and its mirror image (none)"

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
    predict.add_argument("--tta", choices=TTA_MODES, default="none", help=tta_help)
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
    evaluate.add_argument("--tta", choices=TTA_MODES, default="none", help=tta_help)

    pack = commands.add_parser("pack", help="write an image folder or csv once as a dataset that trains with no "
                                            "listing and no scan (--dataset PATH)",
                               description="Pack train (and val) images into a datasets save_to_disk folder: Arrow "
                                           "shards of the image bytes, ClassLabel labels, the scan's and dedupe's "
                                           "decisions applied, pack_manifest.json listing what was left out.")
    pack.add_argument("--output", required=True, help="the folder to write (must not exist)")
    for flag, dest, options in TRAIN_FLAGS:  # the data settings a pack applies, as train spells them
        section, name = dest.split(".")
        if section == "data" and name in PACKED_DATA_SETTINGS:
            pack.add_argument(flag, dest=name, **options)
    pack.add_argument("--max-shard-size", default="500MB", help="largest Arrow shard (500MB)")

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
    for dest, value in CLI_DEFAULTS.items():  # where neither the file nor a flag set the field
        section, key = dest.split(".")
        if getattr(getattr(config, section), key) is None and dest not in overrides:
            overrides[dest] = value
    return apply_overrides(config, overrides)


def run_train(args: argparse.Namespace) -> None:
    from .distributed import shutdown
    from .preemption import PREEMPTED_EXIT_CODE, TrainingPreempted
    from .recipe import finetune_from_config

    try:
        trainer, _, result = finetune_from_config(train_config(args), dry_run=args.dry_run)
        if args.dry_run:
            trainer.announce(result)
    except TrainingPreempted as stopped:
        print(f"dist-finetune train: {stopped}", file=sys.stderr)
        raise SystemExit(PREEMPTED_EXIT_CODE) from None
    finally:
        shutdown()


def run_lr_find(args: argparse.Namespace) -> None:
    from .distributed import shutdown
    from .lr_finder import LR_FIND_JSON, LR_FIND_PNG, LRSweep
    from .recipe import lr_find_from_config

    config = train_config(args)
    sweep = LRSweep(**{name: value for dest, value in vars(args).items()
                       for section, _, name in [dest.partition(".")] if section == "sweep"})
    try:
        trainer, result = lr_find_from_config(config, sweep)
        suggested = f"{result.suggestion:.1e}" if result.suggestion is not None else "none (fewer than 2 steps)"
        trainer.announce(f"lr-find: {len(result.lrs)} steps from lr {result.lrs[0]:.1e} to {result.lrs[-1]:.1e}"
                         + (f"; stopped early: {result.stopped_early}" if result.stopped_early else ""))
        trainer.announce(f"lr-find: suggested --lr {suggested} (steepest descent of the smoothed loss); lowest loss "
                         f"at {result.min_loss_lr:.1e}, a tenth of it: {result.min_loss_lr / 10:.1e}")
        output = config.trainer.output_dir
        written = [name for name in (LR_FIND_JSON, LR_FIND_PNG) if (Path(output) / name).is_file()]
        trainer.announce(f"lr-find: written to {output}: {', '.join(written)}")
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
                                  tune_cpu_allocator=args.tune_cpu_allocator, tta=args.tta)
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
                            args.top_losses, args.tta)
    finally:
        shutdown()


def run_plot(args: argparse.Namespace) -> None:
    from .errors import ConfigError
    from .plots import PlotsUnavailable, plot_curves

    try:
        print(f"curves written: {plot_curves(args.run_dir, args.output)}")
    except (PlotsUnavailable, FileNotFoundError) as error:  # no matplotlib, or not a run folder
        raise ConfigError(str(error)) from None


def run_pack(args: argparse.Namespace) -> None:
    from .packing import pack

    manifest = pack(args.output, args.train_folder, args.val_folder, args.train_csv, args.val_csv, args.image_root,
                    args.skip_bad_images, args.dedupe, args.max_shard_size)
    rows = ", ".join(f"{split} {count}" for split, count in manifest["rows"].items())
    print(f"packed {rows} images of {len(manifest['classes'])} classes into {args.output} "
          f"({len(manifest['dropped'])} left out, listed in its pack_manifest.json); train with --dataset {args.output}")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    commands = {"train": run_train, "lr-find": run_lr_find, "predict": run_predict, "demo": run_demo_command,
                "evaluate": run_evaluate, "plot": run_plot, "pack": run_pack}
    try:
        commands[args.command](args)
    except UserError as error:  # names the file or setting and the fix; anything else is a bug: traceback
        print(f"dist-finetune {args.command}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
