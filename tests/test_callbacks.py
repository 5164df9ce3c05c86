"""The callback hooks: their order, teardown after an exception, and what a recording callback sees of a run
(the frozen backbone without autograd, a custom group's lr); README's StopAtAccuracy example stops a run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_trainer

from dist_finetune import ImageClassifier, seed_everything
from dist_finetune.callbacks import Callback
from dist_finetune.finetuning import BaseFinetuning

STEPS = 6  # 24 training images / batch 4
EPOCH = ["on_epoch_start", *["on_step_end"] * STEPS, "on_validation_end", "on_epoch_end"]


class Recorder(Callback):
    """Records every hook it gets and, per forward of the backbone, whether autograd tracked its output."""

    def __init__(self):
        self.hooks: list[str] = []
        self.backbone_grad: dict[int, set[bool]] = {}
        self.epoch = 0

    def __getattribute__(self, name):
        hook = object.__getattribute__(self, name)
        if name in ("setup", "load_state_dict", "on_fit_start", "on_epoch_start", "on_step_end", "on_validation_end",
                    "on_epoch_end", "on_fit_end", "teardown"):
            object.__getattribute__(self, "hooks").append(name)
        return hook

    def setup(self, trainer, run):
        def seen(module, inputs, output):
            if module.training or torch.is_grad_enabled():  # training forwards only, not validation's
                self.backbone_grad.setdefault(run.position.epoch, set()).add(output.requires_grad)
        run.task.backbone.register_forward_hook(seen)


class UnfreezeAtOneWithLr(BaseFinetuning):
    """Flash's custom-strategy form: the backbone joins at epoch 1 with an explicit ``lr``."""

    def __init__(self):
        super().__init__("backbone", train_bn=False)

    def finetune_function(self, model, epoch, optimizer):
        if epoch == 1:
            self.unfreeze_and_add_param_group(model.backbone, optimizer, lr=5e-4, train_bn=False)


@pytest.fixture(scope="module")
def recorded_run(image_folders):
    from dist_finetune import ImageClassificationData

    data = ImageClassificationData.from_folders(str(image_folders / "train"), str(image_folders / "val"),
                                                image_size=32, batch_size=4, num_workers=0)
    seed_everything(0)
    recorder = Recorder()
    trainer = tiny_trainer(max_epochs=3, scheduler="constant", unfreeze_warmup_epochs=0, callbacks=[recorder])
    history = trainer.finetune(ImageClassifier(3, "tiny_resnet", pretrained=False), data, UnfreezeAtOneWithLr())
    return recorder, history


def test_hooks_run_in_the_documented_order(recorded_run):
    recorder, _ = recorded_run
    assert recorder.hooks == ["setup", "on_fit_start", *EPOCH, *EPOCH, *EPOCH, "on_fit_end", "teardown"]


def test_a_frozen_backbone_runs_without_autograd(recorded_run):
    """train_bn=False: while frozen, nothing in the backbone needs a gradient, so autograd records nothing."""
    recorder, _ = recorded_run
    assert recorder.backbone_grad == {0: {False}, 1: {True}, 2: {True}}


def test_an_explicit_lr_is_the_new_groups_base_lr(recorded_run):
    """constant schedule, no ramp: the head keeps 1e-2 and the added group trains at exactly the lr passed."""
    _, history = recorded_run
    assert [record["lr"] for record in history] == [[1e-2], [1e-2, 5e-4], [1e-2, 5e-4]]


class FailAtFirstEpochEnd(Callback):
    def on_epoch_end(self, trainer, run, record):
        raise RuntimeError("callback failed")


def test_teardown_runs_after_an_exception(tiny_data):
    recorder = Recorder()
    trainer = tiny_trainer(max_epochs=2, callbacks=[FailAtFirstEpochEnd(), recorder])
    with pytest.raises(RuntimeError, match="callback failed"):
        trainer.finetune(ImageClassifier(3, "tiny_resnet", pretrained=False), tiny_data, "freeze")
    # FailAtFirstEpochEnd comes first, so the recorder never gets the failing epoch's on_epoch_end
    assert recorder.hooks == ["setup", "on_fit_start", *EPOCH[:-1], "teardown"]


def readme_block(marker: str) -> str:
    """The python block of README.md or docs/*.md that contains ``marker``."""
    root = Path(__file__).resolve().parents[1]
    for page in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        for block in re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), flags=re.S):
            if marker in block:
                return block
    raise AssertionError(f"no python block with {marker!r} in README.md or docs/")


def test_the_documented_stop_at_accuracy_callback_stops_training(tiny_data):
    namespace: dict = {}
    exec(readme_block("class StopAtAccuracy"), namespace)  # noqa: S102 - the documented example itself
    trainer = tiny_trainer(max_epochs=4, callbacks=[namespace["StopAtAccuracy"](0.0)])
    history = trainer.finetune(ImageClassifier(3, "tiny_resnet", pretrained=False), tiny_data, "freeze")
    assert len(history) == 1
    assert trainer.run.stop_reason.startswith("val_acc ") and trainer.run.stop_reason.endswith(
        "reached 0.0 after 1 epochs")
