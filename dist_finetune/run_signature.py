"""What a resumed run must share with the checkpoint it continues (``run_signature``), and the refusal
of another run's checkpoint (``check_signature``). The image lists are digested relative to their common
folder, fast enough for a million listed paths, so a data folder moved or staged elsewhere still matches."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .errors import CheckpointError

# recorded since resumes check what the sample order and the optimizer depend on: an older checkpoint lacks them
RECORDED_LATER = ("seed", "optimizer", "layer_decay", "train_images", "val_images")


def run_signature(task, data, strategy, config) -> dict:
    """What must not change between a checkpoint and the run that resumes it (JSON-able): the model, the
    classes and strategy, the optimizer and its param groups' layer decay, and what the sample order and
    the saved position depend on beyond the batch layout (the images, the seed; a changed batch size or
    process count is mapped, and a changed lr or weight decay applied, see ``resume``)."""
    return json.loads(json.dumps({
        "backbone": task.backbone_name, "classes": list(data.classes), "image_size": data.image_size,
        "head": [task.head_hidden, task.head_dropout], "strategy": strategy.describe(), "data": data.signature(),
        "seed": config.seed, "optimizer": config.optimizer, "layer_decay": config.layer_decay,
        **image_lists(data.train_paths, data.train_labels, data.val_paths, data.val_labels),
    }))


def image_lists(train_paths: list[str], train_labels: list[int], val_paths: list[str],
                val_labels: list[int]) -> dict[str, str]:
    """``train_images``/``val_images``: "<count> images <digest>" of the items and their labels, paths taken
    relative to their common folder so that a data folder moved (or staged to a local disk) still matches."""
    relative = relative_to_common_folder(train_paths + val_paths)
    lists = {}
    for name, paths, labels in (("train_images", relative[:len(train_paths)], train_labels),
                                ("val_images", relative[len(train_paths):], val_labels)):
        digest = hashlib.sha256()
        digest.update("".join(f"{path}\0{label}\n" for path, label in zip(paths, labels)).encode())
        lists[name] = f"{len(paths)} images {digest.hexdigest()[:16]}"
    return lists


def relative_to_common_folder(paths: list[str]) -> list[str]:
    """``os.path.relpath(path, root)`` of every path, root = ``os.path.commonpath(paths)`` (the paths as they
    are without one, or for absolute and relative paths mixed). By string slicing when every path is the root
    plus a normalized rest with two or more first components (any listed folder: ~0.1 s per million paths
    instead of ~7 s); otherwise the slow way, which normalizes."""
    try:
        root = os.path.commonpath([min(paths), max(paths)]) if paths else ""  # the common path, if all share it
    except ValueError:  # absolute and relative paths mixed
        return list(paths)
    if not root:
        return list(paths)
    prefix = root if root.endswith(os.sep) else root + os.sep
    rest = [path[len(prefix):] for path in paths]
    if all(path.startswith(prefix) for path in paths) and _normalized(rest) \
            and len({path.partition(os.sep)[0] for path in rest}) > 1:
        return rest
    try:
        root = os.path.commonpath(paths)
    except ValueError:
        return list(paths)
    return [os.path.relpath(path, root) for path in paths] if root else list(paths)


def _normalized(relative: list[str]) -> bool:
    """Whether every one of the relative paths has no empty, ``.`` or ``..`` component (``normpath`` keeps it)."""
    joined, sep = "\0" + "\0".join(relative) + "\0", os.sep  # NUL: the one character no path holds
    bad = ("\0\0", sep + sep, "\0" + sep, sep + "\0", *(a + dots + b for dots in (".", "..")
                                                    for a in ("\0", sep) for b in ("\0", sep)))
    return joined.count("\0") == len(relative) + 1 and not any(part in joined for part in bad)


def check_signature(saved: dict, current: dict, checkpoint: Path) -> None:
    """Refuse to resume into another backbone, class set, image size, strategy, image list, seed, optimizer
    or layer decay."""
    strategy = saved.get("strategy")
    if isinstance(strategy, dict) and strategy.get("name") in ("FreezeUnfreeze", "UnfreezeMilestones"):
        # written before initial_denom_lr was a setting: its groups joined at lr / 10
        saved = {**saved, "strategy": {**strategy, "initial_denom_lr": strategy.get("initial_denom_lr", 10.0)}}
    compared = [k for k in current if k in saved or k not in RECORDED_LATER]
    different = {k: (saved.get(k), current.get(k)) for k in compared if saved.get(k) != current.get(k)}
    if different:
        details = "; ".join(f"{k}: checkpoint has {a!r}, this run has {b!r}" for k, (a, b) in different.items())
        raise CheckpointError(f"cannot resume from {checkpoint}: it belongs to a different run ({details}). "
                              "Use the same settings, or another --output-dir for a new run.")
