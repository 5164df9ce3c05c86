"""Activation checkpointing (dist_finetune/activation_checkpointing.py): the same training, less saved memory."""

from __future__ import annotations

import torch
from conftest import tiny_trainer

from dist_finetune import ImageClassifier
from dist_finetune.activation_checkpointing import checkpoint_trainable_layers
from dist_finetune.finetuning import FreezeUnfreeze


def finetune(data, **settings):
    torch.manual_seed(0)
    task = ImageClassifier(data.num_classes, "tiny_resnet", pretrained=False)
    metrics = tiny_trainer(max_epochs=2, channels_last=False, cache_frozen_features=False, **settings).finetune(
        task, data, FreezeUnfreeze(unfreeze_epoch=1, train_bn=True))
    return task, metrics


def test_same_losses_weights_and_batchnorm_statistics_with_checkpointing(tiny_data):
    """Frozen then unfrozen (BatchNorm training throughout, train_bn=True): with every trainable layer
    recomputed in backward the losses, weights and running statistics are bit-identical (a recomputation
    that updated BatchNorm's statistics again would count each batch twice)."""
    plain, plain_metrics = finetune(tiny_data)
    recomputed, metrics = finetune(tiny_data, activation_checkpointing=True)
    assert [m["train_loss"] for m in metrics] == [m["train_loss"] for m in plain_metrics]
    a, b = plain.state_dict(), recomputed.state_dict()
    assert [n for n in a if not torch.equal(a[n], b[n])] == []
    assert int(b["backbone.layer1.0.bn1.num_batches_tracked"]) == 6  # 2 epochs x 3 steps, not 12


def saved_bytes(task, images) -> int:
    """Bytes autograd saves for backward during one forward (what activation memory is)."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        task(images).sum()
    return total


def test_trainable_layers_save_only_their_inputs_and_frozen_layers_nothing():
    torch.manual_seed(0)
    task = ImageClassifier(3, "tiny_resnet", pretrained=False).train()
    images = torch.rand(4, 3, 32, 32)
    full = saved_bytes(task, images)
    assert checkpoint_trainable_layers(task) == 6  # conv1, bn1, layer1..layer4
    assert checkpoint_trainable_layers(task) == 6  # wrapped once only
    recomputed = saved_bytes(task, images)
    assert recomputed < 0.2 * full, (recomputed, full)
    task.backbone.requires_grad_(False)  # frozen: nothing to recompute, nothing saved in the backbone
    assert saved_bytes(task, images) < recomputed
