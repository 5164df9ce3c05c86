"""Finetuning strategies and the optimizer (dist_finetune/finetuning.py): what each strategy freezes and
unfreezes and when, custom strategies, build_optimizer's weight decay and gradient clipping."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import BACKBONE, tiny_trainer

from dist_finetune import ImageClassificationData, ImageClassifier, seed_everything
from dist_finetune.callbacks import Callback
from dist_finetune.finetuning import BaseFinetuning, Freeze, FreezeUnfreeze, NoFreeze, UnfreezeMilestones


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


def recording(strategy: BaseFinetuning) -> BaseFinetuning:
    """Wrap a strategy so every epoch start records the parameters, BN buffers and param groups."""
    original = strategy.finetune_function
    strategy.params, strategy.buffers, strategy.groups, strategy.members = [], [], [], []

    def finetune_function(model, epoch, optimizer):
        strategy.params.append({n: p.detach().clone() for n, p in model.named_parameters()})
        strategy.buffers.append({n: b.detach().clone() for n, b in model.named_buffers() if "running" in n})
        original(model, epoch, optimizer)
        strategy.groups.append([(len(g["params"]), g["lr"], g["initial_lr"]) for g in optimizer.param_groups])
        names = {id(p): n for n, p in model.named_parameters()}
        strategy.members.append([{names[id(p)] for p in g["params"]} for g in optimizer.param_groups])

    strategy.finetune_function = finetune_function
    return strategy


def run(strategy, data, epochs=3, **settings):
    task = ImageClassifier(data.num_classes, backbone="tiny_resnet", pretrained=False)
    strategy = recording(strategy)
    # the last epoch's weights stay in the task (not the best epoch's): they are what the strategy left
    tiny_trainer(max_epochs=epochs, load_best_model_at_end=False, **settings).finetune(task, data, strategy=strategy)
    final = {n: p.detach().clone() for n, p in task.named_parameters()}
    strategy.buffers.append({n: b.detach().clone() for n, b in task.named_buffers() if "running" in n})
    return task, strategy, strategy.params + [final]


def changed(before: dict, after: dict, prefix: str = "") -> dict[str, bool]:
    return {n: not torch.equal(before[n], after[n]) for n in before if n.startswith(prefix)}


def is_batchnorm(name: str) -> bool:
    """tiny_resnet's BatchNorm parameters (bn1, bn2, and a downsample's norm)."""
    return ".bn" in name or "downsample.1" in name


def layer_prefixes(task) -> list[list[str]]:
    return [[f"backbone.{name}" for name in names] for names in task.layer_names]


def test_no_freeze_trains_everything_from_epoch_0(tiny_data):
    task, strategy, snaps = run(NoFreeze(), tiny_data, epochs=1)
    assert all(changed(snaps[0], snaps[1]).values())
    assert [len(groups) for groups in strategy.groups] == [1]


def test_freeze_keeps_backbone_and_bn_stats_fixed(tiny_data):
    task, strategy, snaps = run(Freeze(train_bn=False), tiny_data, epochs=2)
    for before, after in zip(snaps, snaps[1:]):
        assert not any(changed(before, after, "backbone.").values())
        assert all(changed(before, after, "head.").values())
    for before, after in zip(strategy.buffers, strategy.buffers[1:]):
        assert all(torch.equal(before[n], after[n]) for n in before), "frozen BN running stats moved"
    assert all(not p.requires_grad for p in task.backbone.parameters())
    assert [len(groups) for groups in strategy.groups] == [1, 1]
    backbone = {n for n in snaps[0] if n.startswith("backbone.")}
    for members in strategy.members:  # frozen parameters are in no param group at all
        assert not backbone & set().union(*members)
        assert set().union(*members) == {n for n in snaps[0] if n.startswith("head.")}


def test_freeze_with_train_bn_trains_only_batchnorm_in_backbone(tiny_data):
    _, strategy, snaps = run(Freeze(train_bn=True), tiny_data, epochs=2)
    moved = changed(snaps[0], snaps[1], "backbone.")
    assert moved["backbone.bn1.weight"] and moved["backbone.layer4.1.bn2.bias"]
    assert not moved["backbone.conv1.weight"] and not moved["backbone.layer4.1.conv2.weight"]
    assert not torch.equal(strategy.buffers[0]["backbone.bn1.running_mean"],
                           strategy.buffers[1]["backbone.bn1.running_mean"]), "BN in train mode updates its stats"


def test_freeze_unfreeze_adds_backbone_group_at_the_epoch(tiny_data):
    task, strategy, snaps = run(FreezeUnfreeze(unfreeze_epoch=1, train_bn=False), tiny_data, epochs=3)
    assert not any(changed(snaps[0], snaps[1], "backbone.").values())
    conv_and_linear = {n: v for n, v in changed(snaps[1], snaps[2], "backbone.").items() if not is_batchnorm(n)}
    assert conv_and_linear and all(conv_and_linear.values())
    # BatchNorm stays frozen (train_bn=False) even after the unfreeze: its weights, and its running
    # statistics (eval mode) from before the unfreeze to the end of training
    assert not any(v for n, v in changed(snaps[1], snaps[3], "backbone.").items() if is_batchnorm(n))
    at_unfreeze, final = strategy.buffers[1], strategy.buffers[-1]
    assert "backbone.layer4.1.bn2.running_var" in at_unfreeze
    assert all(torch.equal(at_unfreeze[n], final[n]) for n in at_unfreeze), "frozen BN statistics moved"
    head_group, backbone_group = strategy.groups[1]
    assert len(strategy.groups[0]) == 1 and len(strategy.groups[1]) == 2
    assert backbone_group[1] == pytest.approx(head_group[1] / 100)  # the built-in default initial_denom_lr
    assert backbone_group[2] == pytest.approx(1e-2 / 100)


def test_unfreeze_milestones_unfreezes_last_layers_then_the_rest(tiny_data):
    strategy = UnfreezeMilestones((1, 2), num_layers=1, train_bn=False, initial_denom_lr=4)
    task, strategy, snaps = run(strategy, tiny_data, epochs=3)
    layers = layer_prefixes(task)
    last, rest = layers[-1], [p for layer in layers[:-1] for p in layer]

    def any_changed(before, after, prefixes):
        return any(v for p in prefixes for v in changed(before, after, p + ".").values())

    assert not any_changed(snaps[0], snaps[1], last + rest)
    assert any_changed(snaps[1], snaps[2], last) and not any_changed(snaps[1], snaps[2], rest)
    # at the second milestone every weight of the remaining layers trains (BatchNorm stays frozen)
    moved = {n: v for prefix in rest for n, v in changed(snaps[2], snaps[3], prefix + ".").items()
             if not is_batchnorm(n)}
    assert {n.split(".")[1] for n in moved} == {"conv1", "layer1", "layer2", "layer3"}
    assert all(moved.values()), [n for n, v in moved.items() if not v]
    assert [len(groups) for groups in strategy.groups] == [1, 2, 3]
    # both groups it added train at the head's base lr / initial_denom_lr
    assert [group[2] for group in strategy.groups[2]] == pytest.approx([1e-2, 1e-2 / 4, 1e-2 / 4])
    assert layers[-1] == ["backbone.layer4"] and layers[0] == ["backbone.conv1", "backbone.bn1"]


class FeatureExtractorFreezeUnfreeze(BaseFinetuning):
    """The Flash guide's custom strategy, with only the names changed (feature_extractor -> backbone)."""

    def __init__(self, unfreeze_epoch: int = 5, train_bn: bool = True):
        super().__init__("backbone", train_bn)
        self._unfreeze_epoch = unfreeze_epoch

    def finetune_function(self, pl_module, current_epoch, optimizer, opt_idx):
        if current_epoch == self._unfreeze_epoch:
            self.unfreeze_and_add_param_group(pl_module.backbone, optimizer)


def test_guide_custom_strategy_and_schedule_after_group_added(tiny_data):
    task = ImageClassifier(tiny_data.num_classes, backbone="tiny_resnet", pretrained=False)
    trainer = tiny_trainer(max_epochs=4, warmup_epochs=1, unfreeze_warmup_epochs=1)  # the new group ramps in epoch 2
    metrics = trainer.finetune(task, tiny_data, strategy=FeatureExtractorFreezeUnfreeze(unfreeze_epoch=2))
    lrs = [record["lr"] for record in metrics]
    assert [len(lr) for lr in lrs] == [1, 1, 2, 2]
    assert lrs[2][1] == pytest.approx(lrs[2][0] / 10) and lrs[3][1] == pytest.approx(lrs[3][0] / 10)
    assert lrs[3][0] < lrs[2][0] < lrs[1][0]  # the cosine keeps decaying every group after the add
    assert all(p.requires_grad for p in task.backbone.parameters())


@pytest.mark.parametrize("strategy, message", [
    ("freeze_everything", "unknown strategy"),
    (("freeze_unfreeze", -1), "unfreeze_epoch must be >= 0"),
    (("unfreeze_milestones", ((2, 1), 1)), "increasing"),
    (("unfreeze_milestones", ((-1, 2), 1)), "increasing"),
])
def test_bad_strategies_fail_before_training(tiny_data, strategy, message):
    task = ImageClassifier(tiny_data.num_classes, backbone="tiny_resnet", pretrained=False)
    before = {n: p.clone() for n, p in task.named_parameters()}
    trainer = tiny_trainer(max_epochs=3)
    with pytest.raises(ValueError, match=message):
        trainer.finetune(task, tiny_data, strategy=strategy)
    assert trainer.accelerator is None and all(torch.equal(before[n], p) for n, p in task.named_parameters())


@pytest.mark.parametrize("strategy, message", [
    (("freeze_unfreeze", 3), "freeze_unfreeze unfreezes the backbone at epoch 3 but max_epochs=3"),
    (FreezeUnfreeze(unfreeze_epoch=11), "at epoch 11 but max_epochs=3"),
    (("unfreeze_milestones", ((1, 5), 1)), "unfreezes the remaining layers at epoch 5 but max_epochs=3"),
    (("unfreeze_milestones", ((3, 5), 1)), "unfreezes the last 1 layer(s) at epoch 3"),
])
def test_unfreeze_at_or_past_the_end_warns_once_and_trains_frozen(tiny_data, strategy, message):
    """As in Flash, a schedule that never fires in this run is valid: one warning, then training."""
    task = ImageClassifier(tiny_data.num_classes, backbone="tiny_resnet", pretrained=False)
    backbone_before = {n: p.clone() for n, p in task.backbone.named_parameters()}
    with pytest.warns(UserWarning) as warned:
        metrics = tiny_trainer(max_epochs=3).finetune(task, tiny_data, strategy=strategy)
    assert [str(w.message) for w in warned if "never happens" in str(w.message)] == [
        next(str(w.message) for w in warned if message in str(w.message))]
    assert len(metrics) == 3
    if "remaining" in message:  # the first milestone fired: only the last layer trained
        assert not torch.equal(backbone_before["layer4.1.conv2.weight"], task.backbone.layer4[1].conv2.weight)
        assert torch.equal(backbone_before["layer1.0.conv1.weight"], task.backbone.layer1[0].conv1.weight)
    else:
        assert all(torch.equal(backbone_before[n], p) for n, p in task.backbone.named_parameters())


def test_freeze_and_make_trainable_helpers():
    """freeze: no gradients; BatchNorm keeps training with train_bn=True, else it is frozen in eval mode and
    stays so through make_trainable(train_bn=False) and model.train(); make_trainable lets the rest train again."""
    task = ImageClassifier(3, BACKBONE, pretrained=False)
    bn, conv = task.backbone.layer1[0].bn1, task.backbone.layer1[0].conv1
    BaseFinetuning.freeze(task.backbone, train_bn=True)
    assert not conv.weight.requires_grad and bn.weight.requires_grad and bn.bias.requires_grad
    BaseFinetuning.freeze([task.backbone], train_bn=False)
    task.train()
    assert not conv.weight.requires_grad and not bn.weight.requires_grad and not bn.training
    assert task.head.training
    BaseFinetuning.make_trainable(task.backbone, train_bn=False)
    task.train()
    assert conv.weight.requires_grad and not bn.weight.requires_grad and not bn.training
    BaseFinetuning.make_trainable(task.backbone)
    task.train()
    assert all(p.requires_grad for p in task.backbone.parameters()) and bn.training
