"""Frozen-feature caching: while the backbone is frozen and deterministic, run it once, not per epoch.

Valid only when the backbone computes the same features for a sample every epoch: no backbone
parameter trains, every BatchNorm in it is in eval mode (``train_bn=False``), no dropout in it is
active, and the train transforms are deterministic (``augment=False``). Then the pooled features of
every training image are computed once (each rank encodes its share, then all ranks gather all of
them, since the shuffled sample order sends each image to a different rank every epoch) and the
frozen epochs train the head on them. The head sees the same features in the same order as without
the cache, equal up to float rounding of batched convolutions. Memory: images x features x 4 bytes
on every rank. The cache is dropped at the first unfreeze.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, Dataset

MAX_CACHE_BYTES = 4 << 30


def backbone_is_static(backbone: nn.Module) -> bool:
    """True when the backbone's output for an input cannot change between epochs."""
    if any(p.requires_grad for p in backbone.parameters()):
        return False
    return not any(m.training for m in backbone.modules() if isinstance(m, (_BatchNorm, nn.Dropout)))


class FeatureDataset(Dataset):
    """Cached features, addressed by the same ``epoch * len + index`` keys as the image dataset."""

    def __init__(self, features: torch.Tensor, labels: list[int]):
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: int) -> tuple[torch.Tensor, int]:
        index = key % len(self.labels)
        return self.features[index], self.labels[index]


@torch.no_grad()
def encode_dataset(task: nn.Module, dataset: Dataset, batch_size: int, num_workers: int, device,
                   rank: int, world_size: int) -> torch.Tensor:
    """Pooled backbone features of every sample, [N, F] on CPU, identical on every rank."""
    share = list(range(rank, len(dataset), world_size))
    loader = DataLoader(torch.utils.data.Subset(dataset, share), batch_size=batch_size, num_workers=num_workers,
                        generator=torch.Generator())  # its own seed source: the global RNG (dropout) stays put
    was_training = task.training
    task.eval()
    chunks = [task.features(images.to(device)).float().cpu() for images, _ in loader]
    task.train(was_training)
    mine = torch.cat(chunks) if chunks else torch.zeros(0)
    if world_size == 1:
        return mine
    gathered: list[torch.Tensor] = [None] * world_size  # type: ignore[list-item]
    dist.all_gather_object(gathered, mine)
    features = torch.empty(len(dataset), gathered[0].shape[1])
    for owner, block in enumerate(gathered):
        features[owner::world_size] = block
    return features


def cache_fits(num_samples: int, num_features: int) -> bool:
    return num_samples * num_features * 4 <= MAX_CACHE_BYTES


def all_reduce_gradients(module: nn.Module, world_size: int) -> None:
    """Average gradients over ranks by hand (the head trains outside the DDP wrapper here)."""
    if world_size == 1:
        return
    for param in module.parameters():
        if param.grad is not None:
            dist.all_reduce(param.grad)
            param.grad.div_(world_size)
