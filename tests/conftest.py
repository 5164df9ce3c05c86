"""Shared fixtures: tiny generated image folders (no downloads), fast random-init backbones."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# processes the tests launch (the worker scripts of tests/integration/) import conftest, tiny_resnet and
# test modules from this folder, as the tests themselves do through pyproject's pythonpath
os.environ["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent),
                                            *filter(None, [os.environ.get("PYTHONPATH")])])



def one_thread_per_xdist_worker() -> None:
    """With a pytest-xdist worker per core, each worker's torch, and every process it starts, gets one
    thread: two workers of two OpenMP threads each on two cores wait on each other's barriers. A thread
    count set in the environment is kept."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and workers >= (os.cpu_count() or 1) and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = "1"


one_thread_per_xdist_worker()  # before torch is imported
import tiny_resnet  # noqa: E402,F401  (registers the "tiny_resnet" backbone the tests train)

CLASSES = ("blue", "green", "red")
BACKBONE = "tiny_resnet"


def free_port() -> int:
    """A TCP port nothing listens on right now (for a rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_image_folder(root: Path, classes=CLASSES, per_class: int = 8, size: int = 40, seed: int = 0) -> Path:
    """``root/<class>/<i>.png``: noise with a class-coloured square at a random spot (learnable)."""
    rng = np.random.default_rng(seed)
    for index, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 90, (size, size, 3), dtype=np.uint8)
            x, y = rng.integers(0, size // 2, 2)
            pixels[y:y + size // 2, x:x + size // 2, index % 3] = 230
            Image.fromarray(pixels).save(folder / f"{name}_{i}.png")
    return root


@pytest.fixture(scope="session")
def image_folders(tmp_path_factory) -> Path:
    """``<root>/train`` (3 classes x 8) and ``<root>/val`` (3 classes x 4)."""
    root = tmp_path_factory.mktemp("images")
    write_image_folder(root / "train", per_class=8, seed=1)
    write_image_folder(root / "val", per_class=4, seed=2)
    return root


@pytest.fixture(scope="session")
def tiny_data(image_folders):
    from dist_finetune import ImageClassificationData

    return ImageClassificationData.from_folders(
        str(image_folders / "train"), str(image_folders / "val"), image_size=32, batch_size=4, num_workers=0
    )


def tiny_trainer(**settings):
    from dist_finetune import Trainer

    defaults = {"max_epochs": 3, "lr": 1e-2, "progress_bar": False, "seed": 0}
    return Trainer(**{**defaults, **settings})


def task(data=None):
    """A seeded random-init tiny_resnet classifier for ``data``'s classes (3 without data)."""
    from dist_finetune import ImageClassifier, seed_everything

    seed_everything(0)
    return ImageClassifier(3 if data is None else data.num_classes, backbone=BACKBONE, pretrained=False)


class Killed(Exception):
    """Raised by :class:`KillAt`: the run ends there, as under SIGKILL."""


def kill_at(step: int):
    """A callback that ends the run after optimizer step ``step``, before its checkpoint (as a SIGKILL would)."""
    from dist_finetune.callbacks import Callback

    class KillAt(Callback):
        def on_step_end(self, trainer, run) -> None:
            if run.position.global_step == step:
                raise Killed

    return KillAt()


def nan_head_from_epoch_1():
    """A freeze_unfreeze strategy that also fills the head's last weight with NaN at epoch 1, so
    every loss from then on is non-finite (for the tests of the non-finite-loss check)."""
    import torch

    from dist_finetune.finetuning import FreezeUnfreeze

    class NanHeadFromEpoch1(FreezeUnfreeze):
        def finetune_function(self, model, epoch, optimizer):
            super().finetune_function(model, epoch, optimizer)
            if epoch == 1:
                with torch.no_grad():
                    model.head.layers[-1].weight.fill_(float("nan"))

    return NanHeadFromEpoch1(unfreeze_epoch=1)
