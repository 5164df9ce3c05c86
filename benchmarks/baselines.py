"""The plain references the benchmarks hold dist_finetune against, written once: one training loop
(used by the bare in-memory loop, the plain Accelerate loop, the linear probe and the plain
freeze-then-unfreeze loop), one torchvision-style folder dataset, and its transforms.

Nothing here comes from dist_finetune's data or training code: a reference that shared the code
it is compared with would measure nothing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch.utils.data import Dataset

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def cosine(step: int, total: int) -> float:
    """Cosine decay from 1 at step 0 to 0 at ``total``, per optimizer step."""
    return 0.5 * (1.0 + math.cos(math.pi * step / total))


def constant(step: int) -> float:
    return 1.0


def train_epoch(model: torch.nn.Module, batches: Iterable, optimizer: torch.optim.Optimizer, *,
                device: torch.device, step: int = 0, lr_factor: Callable[[int], float] = constant,
                backward: Callable[[torch.Tensor], None] | None = None, autocast_dtype: torch.dtype | None = None,
                scaler: torch.amp.GradScaler | None = None, channels_last: bool = False) -> tuple[dict, int]:
    """One epoch of the plain loop over ``(images, labels)`` batches: every param group's lr is its
    ``base_lr`` x ``lr_factor(step)``, forward (autocast when ``autocast_dtype``), cross-entropy,
    backward (``backward`` when given, e.g. ``accelerator.backward``; through ``scaler`` for fp16),
    step. The loss stays on the device until the epoch ends, so no step waits for the host.
    Returns (the epoch's figures, the next step)."""
    seen, loss_sum, loss = 0, torch.zeros((), device=device), None
    start = time.perf_counter()
    for images, labels in batches:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_factor(step)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            (backward or torch.Tensor.backward)(loss)
            optimizer.step()
        loss_sum += loss.detach() * len(labels)
        seen, step = seen + len(labels), step + 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    return {"train_images": seen, "epoch_time_s": elapsed, "images_per_s": seen / elapsed,
            "train_loss": float(loss_sum) / max(seen, 1),
            "train_loss_last": float(loss.detach()) if loss is not None else None,
            "lr": [group["lr"] for group in optimizer.param_groups]}, step


def evaluate(forward: Callable[[torch.Tensor], torch.Tensor], batches: Iterable) -> tuple[float, float]:
    """(accuracy, mean loss) of ``forward`` over ``(inputs, labels)`` batches, without gradients."""
    correct = loss = count = 0
    with torch.no_grad():
        for inputs, labels in batches:
            logits = forward(inputs)
            loss += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += (logits.argmax(1) == labels).sum().item()
            count += len(labels)
    return correct / count, loss / count


class FolderImages(Dataset):
    """A torchvision-style dataset, as accelerate's examples/cv_example.py writes one: open the file,
    apply its EXIF orientation, RGB, transform; items are ``(image, label)``."""

    def __init__(self, files, labels, image_transform=None):
        self.files, self.labels, self.image_transform = list(files), list(labels), image_transform

    @classmethod
    def from_folder(cls, root: str | Path, image_transform=None) -> FolderImages:
        """``root/<class>/*`` with classes in sorted order (ImageFolder's convention)."""
        classes = sorted(p.name for p in Path(root).iterdir() if p.is_dir())
        files = [(f, label) for label, name in enumerate(classes) for f in sorted((Path(root) / name).iterdir())
                 if f.suffix.lower() in IMAGE_SUFFIXES]
        dataset = cls([str(f) for f, _ in files], [label for _, label in files], image_transform)
        dataset.classes = classes
        return dataset

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        with Image.open(self.files[index]) as image:
            image = ImageOps.exif_transpose(image).convert("RGB")
        if self.image_transform is not None:
            image = self.image_transform(image)
        return image, self.labels[index]


def plain_transform(image_size: int, train: bool, normalize: bool = False):
    """Train: RandomResizedCrop + horizontal flip; eval: resize to size/0.875 + center crop (the same
    operations as dist_finetune's, spelled out here). uint8 output (an ImageClassifier normalises on
    its device), or float normalised with ImageNet's mean/std for a bare backbone."""
    from torchvision.transforms import v2

    geometry = ([v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()] if train else
                [v2.Resize(int(round(image_size / 0.875)), antialias=True), v2.CenterCrop(image_size)])
    scale = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)] if normalize else []
    return v2.Compose([v2.PILToTensor(), *geometry, *scale])
