"""Per-image augmentation: the train transform's policy, its per-sample seeds, and test-time augmentation.

``augment_policy`` (``--augment``): ``basic`` is random resized crop + horizontal flip; ``trivial`` adds
torchvision's TrivialAugmentWide and ``randaugment`` its RandAugment (2 ops, magnitude 9) after them. Every
random draw of a sample's transform comes from a generator seeded by (seed, epoch, index)
(:func:`sample_seed`), so a resumed or resharded run sees the same pixels.

``tta`` (``--tta``): ``flip`` scores an image by the mean of its and its mirror image's class probabilities.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.transforms import v2

from .errors import check_choice

AUGMENT_POLICIES = ("basic", "trivial", "randaugment")
TTA_MODES = ("none", "flip")
EVAL_RESIZE_RATIO = 0.875  # resize to size/0.875, then center-crop size (the torchvision convention)


def train_transform(image_size: int, policy: str = "basic") -> v2.Compose:
    """uint8 CHW crops of a PIL image: random resized crop, flip, then the policy's operations."""
    check_choice("augment_policy (--augment)", policy, AUGMENT_POLICIES)
    extra = {"basic": [], "trivial": [v2.TrivialAugmentWide()], "randaugment": [v2.RandAugment()]}[policy]
    return v2.Compose([
        v2.PILToTensor(),
        v2.RandomResizedCrop(image_size, antialias=True),
        v2.RandomHorizontalFlip(),
        *extra,
    ])


def eval_resize_size(image_size: int) -> int:
    """The short side eval_transform resizes to before its center crop (256 for 224)."""
    return int(round(image_size / EVAL_RESIZE_RATIO))


def eval_transform(image_size: int) -> v2.Compose:
    return v2.Compose([
        v2.PILToTensor(),
        v2.Resize(eval_resize_size(image_size), antialias=True),
        v2.CenterCrop(image_size),
    ])


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one sample's augmentation in one epoch (also one batch's mixing)."""
    value = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) % (1 << 64)
    value ^= value >> 31
    return value % (1 << 63)


def tta_logits(model: nn.Module, images: torch.Tensor, tta: str = "none") -> torch.Tensor:
    """float32 scores of a batch: the logits, or with ``tta="flip"`` the log of the mean of the softmax
    probabilities of the images and their horizontal mirrors (a log-probability is a logit whose softmax is
    that probability, so losses, accuracy and reports read it as they read logits)."""
    logits = model(images).float()
    if tta == "none":
        return logits
    mirrored = model(images.flip(-1)).float()
    return ((logits.softmax(dim=1) + mirrored.softmax(dim=1)) / 2).log()
