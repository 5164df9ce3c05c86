"""Frozen-feature caching: while the backbone is frozen and deterministic, run it once, not per epoch.

Valid only when the backbone computes the same features for a sample every epoch: no backbone
parameter trains, no module in it behaves differently in train mode (BatchNorm in eval, i.e.
``train_bn=False``; no active dropout, stochastic depth or drop-path with a non-zero rate), and the
train transforms are deterministic (``augment=False``). Then the pooled features of every training
image are computed once (each rank encodes its share, then all ranks gather all of them, since the
shuffled sample order sends each image to a different rank every epoch) and the frozen epochs
train the head on them. The head sees the same features in the same order as without the cache,
equal up to float rounding of batched convolutions. Memory: images x features x 4 bytes on every
rank's host (plus its own share while gathering); the gather goes through the device in chunks
(``distributed.gather_rows``), so the GPU never holds the cache. The cache belongs to one run and is
dropped at the first unfreeze. Mixed batches (mixup, cutmix) never use it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd
from torch.utils.data import DataLoader, Dataset

from .distributed import gather_rows

MAX_CACHE_BYTES = 4 << 30


def _random_in_training(module: nn.Module) -> bool:
    """Whether ``module`` (in train mode) computes something else than in eval mode."""
    if isinstance(module, _BatchNorm):
        return True
    if isinstance(module, _DropoutNd):
        return module.p > 0
    # stochastic depth / drop-path / drop-block (torchvision StochasticDepth.p, timm DropPath.drop_prob)
    if "drop" in type(module).__name__.lower() or "stochasticdepth" in type(module).__name__.lower():
        rate = getattr(module, "drop_prob", getattr(module, "p", None))
        return rate is None or rate > 0
    return False


def backbone_is_static(backbone: nn.Module) -> bool:
    """True when the backbone's output for an input cannot change between epochs."""
    if any(p.requires_grad for p in backbone.parameters()):
        return False
    return not any(m.training and _random_in_training(m) for m in backbone.modules())


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
def encode_dataset(task: nn.Module, dataset: Dataset, batch_size: int, num_workers: int, accelerator) -> torch.Tensor:
    """Pooled backbone features of every sample, [N, F] on CPU, identical on every rank."""
    rank, world_size = accelerator.process_index, accelerator.num_processes
    share = list(range(rank, len(dataset), world_size))
    loader = DataLoader(torch.utils.data.Subset(dataset, share), batch_size=batch_size, num_workers=num_workers,
                        generator=torch.Generator())  # its own seed source: the global RNG (dropout) stays put
    was_training = task.training
    task.eval()
    chunks = [task.features(images.to(accelerator.device)).float().cpu() for images, _ in loader]
    task.train(was_training)
    mine = torch.cat(chunks) if chunks else torch.zeros(0, task.num_features)
    features = torch.empty(len(dataset), mine.shape[1])
    # rank r encoded samples r, r + W, ...: gathered in chunks straight into their rows of the cache
    gather_rows(accelerator, mine, out=[features[owner::world_size] for owner in range(world_size)])
    return features


def cache_fits(num_samples: int, num_features: int) -> bool:
    return num_samples * num_features * 4 <= MAX_CACHE_BYTES


def epoch_loader(run, announce) -> tuple[object, bool]:
    """This epoch's training loader: the images, or cached backbone features when valid: (loader, head_only).

    ``announce(message)`` is called once when the cache is built (the main process prints it).
    """
    task, data, accelerator = run.task, run.data, run.accelerator
    # a sharded task (FSDP2) runs its head and backbone only as a whole: never the cache's head-only steps
    usable = (run.config.cache_frozen_features and not data.augment and not run.sharded
              and not (run.config.mixup or run.config.cutmix)  # mixing blends images, not features
              and backbone_is_static(task.backbone) and cache_fits(len(data.train_paths), task.num_features))
    if not usable:
        run.feature_loader = None  # unfrozen (or never cacheable): free the cache
        return run.train_loader, False
    if run.feature_loader is None:
        with accelerator.autocast():
            features = encode_dataset(task, data.train_dataset(run.config.seed), data.batch_size,
                                      run.train_loader.num_workers, accelerator)
        dataset = FeatureDataset(features, data.train_labels)
        loader = data.dataloader(dataset, shuffle=True, drop_last=True, seed=run.config.seed, num_workers=0)
        run.feature_loader = accelerator.prepare_data_loader(loader)
        announce(f"cached frozen backbone features of {len(dataset)} images; training the head on them")
    return run.feature_loader, True
