"""Loader workers of a process-group member start from a forkserver on Pythons whose forked children
can hang (CPython gh-112275), and load the same batches there as in the main process, for every
data source and every loader that starts workers."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from conftest import write_image_folder
from test_sources import SETTINGS, image_dataset

from dist_finetune import ImageClassificationData, worker_start
from dist_finetune.prediction import prediction_loader


@pytest.mark.parametrize("version, hangs", [
    ((3, 10, 14), True), ((3, 10, 15), False), ((3, 11, 7), True), ((3, 11, 9), True), ((3, 11, 10), False),
    ((3, 12, 0), False), ((3, 13, 5), False),
])
def test_fork_can_hang_before_the_fix_releases(version, hangs):
    assert worker_start.fork_can_hang(version) is hangs


@pytest.fixture()
def process_group():
    """A one-process gloo group in this process: its threads are what makes a fork unsafe."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def sources(tmp_path):
    write_image_folder(tmp_path / "train", per_class=3, size=36)
    write_image_folder(tmp_path / "val", per_class=2, size=36, seed=3)
    rows = [f"{p.relative_to(tmp_path)},{p.parent.name}" for p in sorted((tmp_path / "train").rglob("*.png"))]
    (tmp_path / "all.csv").write_text("\n".join(rows) + "\n")
    return {
        "folders": ImageClassificationData.from_folders(str(tmp_path / "train"), str(tmp_path / "val"), **SETTINGS),
        "datasets": ImageClassificationData.from_datasets(image_dataset(3), image_dataset(2, seed=1), **SETTINGS),
        "csv": ImageClassificationData.from_csv(str(tmp_path / "all.csv"), val_split=0.34, **SETTINGS),
    }


def batches(loader) -> list[torch.Tensor]:
    return [batch[0] for batch in loader]


def test_in_a_process_group_on_an_affected_python_workers_start_from_a_forkserver(tmp_path, process_group,
                                                                                  monkeypatch):
    monkeypatch.setattr(worker_start, "fork_can_hang", lambda version=None: True)
    for name, data in sources(tmp_path).items():  # training's loader: augmented, seeded per sample
        in_process = batches(data.dataloader(data.train_dataset(0), shuffle=True, seed=1, num_workers=0))
        loader = data.dataloader(data.train_dataset(0), shuffle=True, seed=1, num_workers=2)
        assert loader.multiprocessing_context.get_start_method() == "forkserver", name
        served = batches(loader)
        assert len(served) == len(in_process) > 0
        assert all(torch.equal(a, b) for a, b in zip(served, in_process)), name
    paths = sorted(str(p) for p in (tmp_path / "val").rglob("*.png"))
    loader = prediction_loader(paths, image_size=32, batch_size=2, num_workers=1)
    assert loader.multiprocessing_context.get_start_method() == "forkserver"
    assert all(torch.equal(a, b) for a, b in zip(batches(loader), batches(prediction_loader(paths, 32, 2, 0))))


def test_workers_are_forked_as_before_outside_a_process_group_or_on_a_fixed_python(tiny_data, process_group,
                                                                                   monkeypatch):
    dataset = tiny_data.val_dataset()
    monkeypatch.setattr(worker_start, "fork_can_hang", lambda version=None: False)
    assert tiny_data.dataloader(dataset, shuffle=False, num_workers=1).multiprocessing_context is None
    monkeypatch.setattr(worker_start, "fork_can_hang", lambda version=None: True)
    dist.destroy_process_group()
    assert tiny_data.dataloader(dataset, shuffle=False, num_workers=1).multiprocessing_context is None
    assert worker_start.worker_context(0, dataset) is None
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # for the fixture's teardown
    assert worker_start.worker_context(0, dataset) is None  # no workers: nothing to start
