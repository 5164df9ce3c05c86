"""The optimisation settings the README promises, each checked against what it must do to the numbers:
``optimizer="sgd"``, ``weight_decay``, ``max_grad_norm``, the cosine/linear/constant schedules,
``label_smoothing``, ``gradient_accumulation_steps`` (equal to the larger batch, and an exact resume
inside an epoch whose last accumulation is partial) and bf16 autocast on the CPU."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_trainer
from safetensors.torch import load_file

from dist_finetune import ImageClassificationData, ImageClassifier, seed_everything
from dist_finetune.callbacks import Callback


@pytest.fixture(scope="module")
def plain_data(image_folders):
    """No augmentation: every sample is the same each epoch (frozen epochs train the head on cached features)."""
    return ImageClassificationData.from_folders(str(image_folders / "train"), str(image_folders / "val"),
                                                image_size=32, batch_size=4, num_workers=0, augment=False)


def new_task(**options) -> ImageClassifier:
    seed_everything(0)
    return ImageClassifier(3, "tiny_resnet", pretrained=False, **options)


class Recorder(Callback):
    """The trainable parameters before training and after the first optimizer step, the first group's lr
    after every step, the optimizer itself, and where a resumed run started."""

    def __init__(self):
        self.lrs, self.first_step, self.start = [], None, None

    def on_fit_start(self, trainer, run) -> None:
        self.optimizer = run.optimizer.optimizer  # the torch optimizer inside accelerate's wrapper
        self.start = (run.position.epoch, run.position.batch)
        self.before = {n: p.detach().clone() for n, p in run.task.named_parameters() if p.requires_grad}

    def on_step_end(self, trainer, run) -> None:
        self.lrs.append(run.optimizer.param_groups[0]["lr"])
        if self.first_step is None:
            self.first_step = run.position.global_step
            self.after = {n: p.detach().clone() for n, p in run.task.named_parameters() if n in self.before}


def test_sgd_step_applies_weight_decay_and_clips_the_gradient(plain_data):
    """One plain SGD step (momentum 0) is p - lr * (clip(g) + wd * p), with ||clip(g)|| = max_grad_norm:
    exact to float rounding. AdamW (a sign-like first step), a lost weight decay or a lost clip all miss it."""
    lr, decay, max_norm = 0.5, 0.2, 1e-3
    recorder = Recorder()
    tiny_trainer(max_epochs=1, optimizer="sgd", momentum=0.0, lr=lr, weight_decay=decay, max_grad_norm=max_norm,
                 scheduler="constant", callbacks=[recorder]).finetune(new_task(), plain_data, "freeze")
    assert type(recorder.optimizer) is torch.optim.SGD
    assert sorted(recorder.before) == ["head.layers.0.bias", "head.layers.0.weight"]
    residual = [recorder.after[n] - recorder.before[n] * (1 - lr * decay) for n in recorder.before]
    step_norm = math.sqrt(sum(float(r.double().pow(2).sum()) for r in residual))
    assert step_norm == pytest.approx(lr * max_norm, rel=1e-3)  # the gradient's part: lr x the clipped norm
    moved = [recorder.after[n] - recorder.before[n] for n in recorder.before]
    assert math.sqrt(sum(float(m.double().pow(2).sum()) for m in moved)) > 100 * lr * max_norm  # the decay's part


def test_adamw_weight_decay_reaches_every_group(tiny_data):
    """The group a strategy adds at the unfreeze carries the same weight decay as the first one."""
    recorder = Recorder()
    tiny_trainer(max_epochs=2, weight_decay=0.05, callbacks=[recorder]).finetune(new_task(), tiny_data,
                                                                                 ("freeze_unfreeze", 1))
    groups = recorder.optimizer.param_groups
    assert type(recorder.optimizer) is torch.optim.AdamW and len(groups) == 2
    assert [group["weight_decay"] for group in groups] == [0.05, 0.05]


@pytest.mark.parametrize("scheduler, factor", [
    ("cosine", lambda progress: 0.5 * (1 + math.cos(math.pi * progress))),
    ("linear", lambda progress: 1 - progress),
    ("constant", lambda progress: 1.0),
])
def test_schedules_set_the_lr_of_every_step(plain_data, scheduler, factor):
    recorder = Recorder()
    tiny_trainer(max_epochs=2, lr=0.01, scheduler=scheduler, callbacks=[recorder]).finetune(new_task(), plain_data,
                                                                                           "freeze")
    steps = 12  # 24 images, batch 4, 2 epochs
    assert recorder.lrs == pytest.approx([0.01 * factor(step / steps) for step in range(1, steps + 1)], abs=1e-12)


def test_label_smoothing_is_the_training_loss(plain_data):
    """With an lr too small to move the weights, an epoch's train loss is the mean label-smoothed cross
    entropy of the initial model over the 24 training images, which differs from the plain one."""
    task = new_task()
    with torch.no_grad():  # confident logits, so that smoothing changes the loss clearly
        task.head.layers[-1].weight.mul_(50)
    dataset = plain_data.train_dataset(0)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    labels = torch.tensor([dataset[i][1] for i in range(len(dataset))])
    with torch.no_grad():
        logits = task.eval()(images)
    smoothed = F.cross_entropy(logits, labels, label_smoothing=0.3).item()
    assert abs(smoothed - F.cross_entropy(logits, labels).item()) > 100 * 1e-5 * smoothed  # 100x the tolerance
    metrics = tiny_trainer(max_epochs=1, lr=1e-12, label_smoothing=0.3).finetune(task, plain_data, "freeze")
    assert metrics[0]["train_loss"] == pytest.approx(smoothed, rel=1e-5)


def accumulated(data_root, batch_size: int, steps: int, epochs: int = 2, **settings):
    data = ImageClassificationData.from_folders(str(data_root / "train"), str(data_root / "val"), image_size=32,
                                                batch_size=batch_size, num_workers=0, augment=False)
    task = new_task()
    # contiguous layout: oneDNN's channels_last kernels depend on the batch size (see test_distributed)
    metrics = tiny_trainer(max_epochs=epochs, gradient_accumulation_steps=steps, channels_last=False,
                           load_best_model_at_end=False, **settings).finetune(task, data, ("freeze_unfreeze", 1))
    return task, metrics


def test_accumulating_two_batches_of_b_equals_one_batch_of_2b(image_folders):
    """Same samples per update in the same order (seeded sampler, no augmentation, BatchNorm frozen):
    equal up to float summation order, through the frozen epoch and the unfreeze."""
    accumulating, metrics = accumulated(image_folders, batch_size=2, steps=2)
    single, reference = accumulated(image_folders, batch_size=4, steps=1)
    for name, tensor in single.state_dict().items():
        assert torch.allclose(accumulating.state_dict()[name], tensor, atol=1e-5), name
    assert [m["train_loss"] for m in metrics] == pytest.approx([m["train_loss"] for m in reference], rel=1e-5)
    start = new_task().state_dict()["backbone.layer4.1.conv2.weight"]
    assert not torch.allclose(start, single.state_dict()["backbone.layer4.1.conv2.weight"]), "the backbone trained"


class StopAt(Callback):
    """Raises after optimizer step ``step`` (before it is saved): a crash in the middle of an epoch."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer, run) -> None:
        if run.position.global_step == self.step:
            raise KeyboardInterrupt(f"stopped after step {self.step}")


def test_resume_inside_an_accumulating_epoch_is_exact(tiny_data, tmp_path):
    """Batch 4 with 4 accumulation steps: 6 batches an epoch, so an update after batch 4 and a partial
    one after batch 6. Stopped after update 2 (the epoch's last), the run resumes from update 1 (batch 4,
    with augmentation on) and ends bit-identical to the uninterrupted run."""
    settings = {"max_epochs": 2, "gradient_accumulation_steps": 4, "save_every_n_steps": 1, "keep_last": 5}
    reference = new_task()
    tiny_trainer(output_dir=str(tmp_path / "reference"), **settings).finetune(reference, tiny_data,
                                                                             ("freeze_unfreeze", 1))
    with pytest.raises(KeyboardInterrupt):
        tiny_trainer(output_dir=str(tmp_path / "run"), callbacks=[StopAt(2)], **settings).finetune(
            new_task(), tiny_data, ("freeze_unfreeze", 1))
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-00000001"]
    recorder, resumed = Recorder(), new_task()
    metrics = tiny_trainer(output_dir=str(tmp_path / "run"), callbacks=[recorder], **settings).finetune(
        resumed, tiny_data, ("freeze_unfreeze", 1), resume="latest")
    assert recorder.start == (0, 4) and recorder.first_step == 2, "continued after batch 4, not from the start"
    assert [m["epoch"] for m in metrics] == [0, 1]
    for name, tensor in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name
    for name in ("model.safetensors", "last.safetensors"):  # the best epoch's file and the last one's
        saved, expected = load_file(tmp_path / "run" / name), load_file(tmp_path / "reference" / name)
        assert all(torch.equal(saved[k], expected[k]) for k in expected), name


def test_bf16_autocast_on_cpu_end_to_end(tiny_data, tmp_path):
    """mixed_precision="bf16" on the CPU: the training forward runs in bfloat16, the weights and the
    model file stay float32, and the saved model loads and predicts."""
    dtypes = set()
    task = new_task()
    task.head.layers[-1].register_forward_hook(lambda module, args, output: dtypes.add(output.dtype))
    metrics = tiny_trainer(max_epochs=2, mixed_precision="bf16", output_dir=str(tmp_path)).finetune(
        task, tiny_data, ("freeze_unfreeze", 1))
    assert torch.bfloat16 in dtypes
    assert all(math.isfinite(m["train_loss"]) and math.isfinite(m["val_loss"]) for m in metrics)
    loaded = ImageClassifier.load_from_checkpoint(tmp_path / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in loaded.state_dict().values() if t.is_floating_point())
    assert set(loaded.predict(tiny_data.val_paths)) <= set(tiny_data.classes)

