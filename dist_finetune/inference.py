"""Running a model over a loader under Accelerate: validation metrics and per-image outputs.

Every image is counted exactly once over all processes (``gather_for_metrics`` drops the samples
the distributed sampler repeats to even out the last batch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def validation_metrics(task: nn.Module, loader, accelerator) -> dict:
    """Loss and top-1 (top-5 above 5 classes) accuracy of ``task`` on ``loader``."""
    was_training = task.training
    task.eval()
    top_k = 5 if task.num_classes > 5 else 1
    results = []
    for images, labels in loader:
        logits = task(images).float()
        losses = F.cross_entropy(logits, labels, reduction="none")
        hits = logits.topk(top_k, dim=1).indices.eq(labels[:, None])
        per_image = torch.stack([losses, hits[:, 0].double(), hits.any(dim=1).double()], dim=1)
        results.append(accelerator.gather_for_metrics(per_image.double()))
    task.train(was_training)
    totals = torch.cat(results).sum(dim=0) if results else torch.zeros(3)
    count = sum(len(r) for r in results)
    stats = {"val_loss": totals[0].item() / max(1, count), "val_acc": totals[1].item() / max(1, count),
             "val_images": count}
    if top_k == 5:
        stats["val_top5"] = totals[2].item() / max(1, count)
    return stats
