"""MixUp and CutMix of training batches (``--mixup ALPHA``, ``--cutmix ALPHA``) and the loss on their soft targets.

torchvision's ``v2.MixUp`` / ``v2.CutMix`` pair each image with the previous one in the batch; with both
set, each batch takes one of them at even odds (``v2.RandomChoice``, timm's switch probability 0.5). Their
draws (the mixing weight, the box, the choice) come from torch's CPU generator, seeded here per (seed,
epoch, batch, rank) inside ``fork_rng``: each rank mixes differently, a resumed run mixes every batch as
the uninterrupted run did, and the global RNG state is left untouched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from .augment import sample_seed
from .errors import ConfigError

MIXING_SALT = 0x5DEECE66D  # keeps a batch's mixing seed apart from the seed of the sample with the same index


def check_mixing(mixup: float, cutmix: float) -> None:
    """Refuse a negative alpha (data of one class, which mixing could not blend, never reaches training: the
    readers and ``ImageClassifier`` refuse it)."""
    for name, alpha in (("mixup", mixup), ("cutmix", cutmix)):
        if alpha < 0:
            raise ConfigError(f"{name} (--{name}) is the Beta distribution's alpha: 0 (off) or positive, got {alpha}")


class BatchMixing:
    """``(uint8 images, class labels) -> (float images in [0, 1], soft targets [N, C])`` for one batch.

    The images become floats in [0, 1] first, as the model's own input conversion makes them, so mixing
    blends pixels, not rounded bytes.
    """

    def __init__(self, mixup: float, cutmix: float, num_classes: int, seed: int, rank: int):
        check_mixing(mixup, cutmix)
        choices = [kind(alpha=alpha, num_classes=num_classes)
                   for kind, alpha in ((v2.MixUp, mixup), (v2.CutMix, cutmix)) if alpha > 0]
        self.mix = choices[0] if len(choices) == 1 else v2.RandomChoice(choices)
        self.seed, self.rank = seed, rank

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, epoch: int, batch: int):
        images = images.float().div_(255) if images.dtype == torch.uint8 else images
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed ^ MIXING_SALT, epoch, (batch << 16) + self.rank))
            return self.mix(images, labels)


def batch_mixing(mixup: float, cutmix: float, num_classes: int, seed: int, rank: int) -> BatchMixing | None:
    """The mixing of this run's batches, or None when both alphas are 0."""
    return BatchMixing(mixup, cutmix, num_classes, seed, rank) if mixup or cutmix else None


def training_loss(logits: torch.Tensor, targets: torch.Tensor, class_weights: torch.Tensor | None,
                  label_smoothing: float) -> torch.Tensor:
    """Cross-entropy on class labels [N] or soft targets [N, C].

    Soft targets are normalised as torch normalises labels: by the targets' total class weight (the batch
    size without weights), so a one-hot target gives the loss its label gives, class weights and label
    smoothing included.
    """
    if targets.ndim == 1:
        return F.cross_entropy(logits, targets, weight=class_weights, label_smoothing=label_smoothing)
    total = F.cross_entropy(logits, targets, weight=class_weights, label_smoothing=label_smoothing, reduction="sum")
    return total / (targets.shape[0] if class_weights is None else (targets @ class_weights).sum())
