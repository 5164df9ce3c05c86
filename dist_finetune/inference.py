"""Running a model over a loader under Accelerate: validation metrics and per-image outputs.

Every image is counted exactly once over all processes (``gather_for_metrics`` drops the samples
the distributed sampler repeats to even out the last batch). Accelerate hands out whole batches
to the processes in turn, so the gathered batches come back in the loader's own order. ``tta``:
test-time augmentation (``augment.tta_logits``), on each rank's own batches.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .augment import tta_logits


def eval_loader(task: nn.Module, data, accelerator):
    """``data``'s val images, unshuffled, split over the processes (``task``, checked to fit ``data``, moved
    to their device)."""
    task.check_data(data, scoring=True)
    task.to(accelerator.device)
    return accelerator.prepare_data_loader(data.dataloader(data.val_dataset(), shuffle=False))


def _gathered_batches(task: nn.Module, loader, accelerator,
                      tta: str = "none") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(logits as float32, labels) of each batch, gathered over processes, in eval mode."""
    was_training = task.training
    task.eval()
    try:
        with torch.no_grad():
            for images, labels in loader:
                yield accelerator.gather_for_metrics((tta_logits(task, images, tta), labels))
    finally:
        task.train(was_training)


def validation_metrics(task: nn.Module, loader, accelerator, tta: str = "none") -> dict:
    """Loss and top-1 (top-5 above 5 classes) accuracy of ``task`` on ``loader``."""
    top_k = 5 if task.num_classes > 5 else 1
    totals, count = torch.zeros(3, dtype=torch.float64, device=accelerator.device), 0  # on the device: no sync per batch
    for logits, labels in _gathered_batches(task, loader, accelerator, tta):
        losses = F.cross_entropy(logits, labels, reduction="none")
        hits = logits.topk(top_k, dim=1).indices.eq(labels[:, None])
        totals += torch.stack([losses.double().sum(), hits[:, 0].double().sum(), hits.any(dim=1).double().sum()])
        count += len(labels)
    stats = {"val_loss": totals[0].item() / max(1, count), "val_acc": totals[1].item() / max(1, count),
             "val_images": count}
    if top_k == 5:
        stats["val_top5"] = totals[2].item() / max(1, count)
    return stats


def collect_outputs(task: nn.Module, loader, accelerator, tta: str = "none") -> tuple[torch.Tensor, torch.Tensor]:
    """Every image's logits [N, C] and label [N] on the CPU, in the order of the (unshuffled) loader.

    Under several processes each rank gets all of them (gathered), every image exactly once.
    """
    logits, labels = [], []
    for batch_logits, batch_labels in _gathered_batches(task, loader, accelerator, tta):
        logits.append(batch_logits.cpu())
        labels.append(batch_labels.cpu())
    if not logits:
        return torch.zeros(0, task.num_classes), torch.zeros(0, dtype=torch.long)
    return torch.cat(logits), torch.cat(labels)
