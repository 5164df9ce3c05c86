"""Frozen-feature caching: the head trains on cached features exactly as on recomputed ones; when a backbone
is static, and a second run never reuses the first's cache."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch
import torchvision
from conftest import task, tiny_trainer, write_image_folder
from torch import nn
from torchvision.ops import StochasticDepth

from dist_finetune import ImageClassificationData, ImageClassifier, seed_everything
from dist_finetune import distributed
from dist_finetune.callbacks import Callback
from dist_finetune.feature_cache import backbone_is_static, cache_fits


class CacheSeen(Callback):
    """Per epoch: whether the run held the feature cache when the epoch's training was done."""

    def __init__(self):
        self.per_epoch: list[bool] = []

    def on_validation_end(self, trainer, run, record):
        self.per_epoch.append(run.feature_loader is not None)


def train(image_folders, cache: bool, strategy, epochs=3, augment=False):
    data = ImageClassificationData.from_folders(str(image_folders / "train"), str(image_folders / "val"),
                                                image_size=32, batch_size=4, num_workers=0, augment=augment)
    seed_everything(0)
    task = ImageClassifier(3, "tiny_resnet", pretrained=False, head_dropout=0.1)
    seen = CacheSeen()
    trainer = tiny_trainer(max_epochs=epochs, cache_frozen_features=cache, callbacks=[seen])
    metrics = trainer.finetune(task, data, strategy, train_bn=False)
    trainer.cache_seen = seen.per_epoch
    return task, metrics, trainer


def assert_close(a: ImageClassifier, b: ImageClassifier) -> None:
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.allclose(x, y, atol=1e-5, rtol=1e-4), name


def test_cached_features_train_the_head_like_recomputed_ones(image_folders, capsys):
    cached, cached_metrics, _ = train(image_folders, True, "freeze")
    assert "cached frozen backbone features of 24 images" in capsys.readouterr().out
    recomputed, metrics, _ = train(image_folders, False, "freeze")
    assert_close(cached, recomputed)
    for a, b in zip(cached_metrics, metrics):
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-5 and a["val_acc"] == b["val_acc"]


def test_cache_is_dropped_at_the_unfreeze(image_folders):
    cached, _, trainer = train(image_folders, True, ("freeze_unfreeze", 1))
    recomputed, _, untouched = train(image_folders, False, ("freeze_unfreeze", 1))
    assert trainer.cache_seen == [True, False, False], "built for the frozen epoch 0, dropped at the unfreeze"
    assert untouched.cache_seen == [False, False, False], "cache_frozen_features=False (--no-feature-cache)"
    assert_close(cached, recomputed)


def test_no_cache_with_augmentation(image_folders):
    """Augmented images change every epoch, so their features may not be cached, however frozen the backbone."""
    _, _, trainer = train(image_folders, True, "freeze", epochs=2, augment=True)
    assert trainer.cache_seen == [False, False]


def test_the_cache_is_capped_at_4_gib():
    assert cache_fits(2**28, 4)  # 2^28 images x 4 features x 4 bytes = 4 GiB exactly
    assert not cache_fits(2**28 + 1, 4)
    assert not cache_fits(2**20, 2**10 + 1)


def test_no_feature_cache_flag_turns_the_cache_off(tmp_path):
    from dist_finetune.cli import build_parser, train_config

    args = ["train", "--train-folder", str(tmp_path), "--no-augment"]
    assert train_config(build_parser().parse_args(args)).trainer.cache_frozen_features is True
    assert train_config(build_parser().parse_args([*args, "--no-feature-cache"])).trainer.cache_frozen_features is False


def test_not_cacheable_while_batchnorm_or_dropout_trains():
    task = ImageClassifier(3, "tiny_resnet", pretrained=False)
    task.backbone.requires_grad_(False)
    assert not backbone_is_static(task.backbone.train())
    assert backbone_is_static(task.backbone.eval())


@pytest.mark.parametrize("layer, static_in_train_mode", [
    (torch.nn.Dropout(0.1), False), (torch.nn.Dropout2d(0.2), False), (StochasticDepth(0.1, "row"), False),
    (torch.nn.Dropout(0.0), True), (StochasticDepth(0.0, "row"), True),
])
def test_not_cacheable_while_dropout_or_drop_path_is_active(layer, static_in_train_mode):
    """A frozen backbone without BatchNorm: only its dropout / stochastic depth decides, and only in train mode."""
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), layer, torch.nn.Flatten())
    backbone.requires_grad_(False)
    assert backbone_is_static(backbone.train()) is static_in_train_mode
    assert backbone_is_static(backbone.eval())
    backbone[0].weight.requires_grad_(True)
    assert not backbone_is_static(backbone.eval()), "a trainable parameter is never static"



class ThreadRanks:
    """``world`` ranks as threads of this process, with accelerate's ``gather`` (concatenate every rank's
    tensor, in rank order) done through shared slots; records what each rank puts into each collective."""

    def __init__(self, world: int):
        self.world, self.slots, self.barrier = world, [None] * world, threading.Barrier(world)
        self.local = threading.local()
        self.sent: list[tuple[int, int]] = []  # (rank, bytes it contributed to one collective)

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        rank = self.local.rank
        self.sent.append((rank, tensor.nbytes))
        self.slots[rank] = tensor.clone()
        self.barrier.wait()
        result = torch.cat(self.slots)
        self.barrier.wait()  # every rank has read the slots before the next collective refills them
        return result

    def run(self, work) -> list:
        """``work(rank, accelerator)`` on every rank at once; their results in rank order."""
        results = [None] * self.world

        def rank_main(rank: int) -> None:
            self.local.rank = rank
            accelerator = SimpleNamespace(num_processes=self.world, process_index=rank, device=torch.device("cpu"))
            results[rank] = work(rank, accelerator)

        threads = [threading.Thread(target=rank_main, args=(rank,)) for rank in range(self.world)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        return results


def test_the_cache_is_gathered_in_chunks_into_its_rows(monkeypatch):
    """3 ranks holding 7, 6 and 6 rows of 5 features (sample i encoded by rank i % 3 as its row i // 3);
    a chunk of 2 rows (40 bytes): every rank's cache equals the whole gather, every sample in its row,
    and no rank ever puts more than one chunk into a collective."""
    ranks = ThreadRanks(3)
    monkeypatch.setattr(distributed, "gather", ranks.gather)
    rows = [torch.arange(count * 5, dtype=torch.float32).reshape(count, 5) + 1000 * rank
            for rank, count in enumerate((7, 6, 6))]

    def into_the_cache(rank, accelerator):
        cache = torch.empty(19, 5)
        distributed.gather_rows(accelerator, rows[rank], [cache[r::3] for r in range(3)], chunk_bytes=40)
        return cache

    expected = torch.stack([rows[i % 3][i // 3] for i in range(19)])
    for cache in ranks.run(into_the_cache):
        assert torch.equal(cache, expected)
    assert max(size for _, size in ranks.sent) <= 40
    assert [size for rank, size in ranks.sent if rank == 0] == [40, 40, 40, 20]  # 7 rows as 2 + 2 + 2 + 1


def test_static_backbone_ignores_zero_rate_dropout_but_not_stochastic_depth():
    from torchvision.ops import StochasticDepth

    def frozen(*modules) -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 4, 3), *modules).requires_grad_(False).train()

    assert backbone_is_static(frozen(nn.Dropout(p=0.0)))  # ViT's default dropout: nothing random
    assert not backbone_is_static(frozen(nn.Dropout(p=0.1)))
    assert not backbone_is_static(frozen(StochasticDepth(0.1, "row")))
    assert backbone_is_static(frozen(StochasticDepth(0.0, "row")))
    convnext = torchvision.models.convnext_tiny().requires_grad_(False).train()
    assert not backbone_is_static(convnext), "ConvNeXt's stochastic depth is active in train mode"
    assert backbone_is_static(convnext.eval())


def test_a_second_finetune_never_reuses_the_first_runs_cached_features(image_folders, tmp_path, capsys):
    other = write_image_folder(tmp_path / "other", per_class=6, seed=7)
    settings = dict(image_size=32, batch_size=4, num_workers=0, augment=False)
    first = ImageClassificationData.from_folders(str(image_folders / "train"), str(image_folders / "val"), **settings)
    second = ImageClassificationData.from_folders(str(other), str(image_folders / "val"), **settings)
    trainer = tiny_trainer(max_epochs=1)
    trainer.finetune(task(), first, "freeze")
    reused = task()
    trainer.finetune(reused, second, "freeze")
    fresh = task()
    tiny_trainer(max_epochs=1).finetune(fresh, second, "freeze")
    printed = capsys.readouterr().out
    assert "cached frozen backbone features of 24 images" in printed
    assert printed.count("cached frozen backbone features of 18 images") == 2
    assert all(torch.equal(a, b) for a, b in zip(reused.head.parameters(), fresh.head.parameters()))
