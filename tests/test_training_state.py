"""Training-state checkpoints: the save cadence, resuming over only corrupt checkpoints, and loading one
written before some of its fields were recorded; the image-list digests of a run's signature (what a resume
compares), computed fast for listed folders."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from conftest import task, tiny_trainer
from safetensors.torch import save_file

from dist_finetune.callbacks import Callback, Position
from dist_finetune.errors import CheckpointError
from dist_finetune.run_signature import image_lists, relative_to_common_folder
from dist_finetune.training_state import load_training_state


def test_a_checkpoint_written_before_layout_settings_and_callbacks_were_recorded_loads(tmp_path):
    """state.json of the oldest format (no layout, optimizer_settings or callbacks, no RNG file for this
    rank): the fields it has are read, the missing ones are None / empty, the optimizer state is joined."""
    save_file({"head.weight": torch.ones(2, 3)}, tmp_path / "model.safetensors")
    save_file({"0.exp_avg": torch.zeros(2, 3)}, tmp_path / "optimizer.safetensors")
    groups = [{"lr": 0.01, "betas": [0.9, 0.999], "params": [0]}]
    (tmp_path / "state.json").write_text(json.dumps({
        "position": {"epoch": 1, "batch": 2, "global_step": 5, "samples_done": 8},
        "optimizer": {"param_groups": groups, "scalars": {"0.step": 5.0}},
        "schedule": {"step_count": 5}, "scaler": None, "signature": {"backbone": "tiny_resnet"}, "num_processes": 1,
    }))
    state = load_training_state(tmp_path, rank=0)
    assert state.position == Position(epoch=1, batch=2, global_step=5, samples_done=8)
    assert torch.equal(state.model["head.weight"], torch.ones(2, 3))
    assert state.optimizer["param_groups"] == [{"lr": 0.01, "betas": (0.9, 0.999), "params": [0]}]
    assert state.optimizer["state"][0]["step"] == 5.0 and state.optimizer["state"][0]["exp_avg"].shape == (2, 3)
    assert (state.schedule, state.scaler, state.num_processes) == ({"step_count": 5}, None, 1)
    assert (state.layout, state.optimizer_settings, state.callbacks, state.rng) == (None, None, {}, None)


def test_resume_latest_over_only_corrupt_checkpoints_is_refused_and_loses_nothing(tiny_data, tmp_path):
    tiny_trainer(max_epochs=2, output_dir=str(tmp_path)).finetune(task(), tiny_data, "no_freeze")
    for checkpoint in (tmp_path / "checkpoints").glob("step-*"):
        model = checkpoint / "model.safetensors"
        data = bytearray(model.read_bytes())
        data[-1] ^= 0xFF  # same size: only the SHA-256 can tell
        model.write_bytes(bytes(data))
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(CheckpointError, match=r"every checkpoint in .*checkpoints is corrupt or incomplete "
                                              r"\(step-00000006, step-00000012\): refusing to start over"):
        tiny_trainer(max_epochs=2, output_dir=str(tmp_path)).finetune(task(), tiny_data, "no_freeze", resume="latest")
    assert (tmp_path / "metrics.jsonl").read_text() == before


class CheckpointInodes(Callback):
    """Remembers the inode of every checkpoint folder the first time it is seen, and every later sighting."""

    def __init__(self):
        self.seen: dict[str, set[int]] = {}

    def _look(self, run) -> None:
        for folder in (run.output_dir / "checkpoints").glob("step-*"):
            self.seen.setdefault(folder.name, set()).add(folder.stat().st_ino)

    def on_step_end(self, trainer, run) -> None:
        self._look(run)

    def on_validation_end(self, trainer, run, record) -> None:  # after the last step, before the epoch's save
        self._look(run)

    def on_epoch_start(self, trainer, run) -> None:
        self._look(run)


def test_a_step_is_saved_once_when_the_cadence_divides_the_epoch(tiny_data, tmp_path):
    """6 steps per epoch, a cadence of 3: step 6 ends epoch 0; rewriting it in place (rmtree, then
    rename) would leave a moment without that checkpoint."""
    watcher = CheckpointInodes()
    tiny_trainer(max_epochs=2, output_dir=str(tmp_path), save_every_n_steps=3, keep_last=5,
                 callbacks=[watcher]).finetune(task(), tiny_data, "no_freeze")
    assert sorted(watcher.seen) == ["step-00000003", "step-00000006", "step-00000009"]
    assert all(len(inodes) == 1 for inodes in watcher.seen.values()), watcher.seen
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == \
        ["step-00000003", "step-00000006", "step-00000009", "step-00000012"]


def stdlib_relative(paths):
    """The definition: relative to os.path.commonpath (the paths themselves when there is none)."""
    try:
        root = os.path.commonpath(paths) if paths else ""
    except ValueError:
        return list(paths)
    return [os.path.relpath(path, root) for path in paths] if root else list(paths)


@pytest.mark.parametrize("paths", [
    ["/d/train/cat/1.png", "/d/train/dog/2.png", "/d/val/cat/3.png"],
    ["/d/imgs/a.png", "/d/imgs/b.png"],                       # one flat folder
    ["/d/imgs/a.png"], ["/d/imgs/a.png", "/d/imgs/a.png"],    # one path: relpath is "."
    ["/a/b", "/a/b-c/x.png", "/a/b/c.png"],                    # a sibling sorting between a folder and its files
    ["/a/b/", "/a/b/c.png"], ["/a/./b/x.png", "/a/b/y.png"], ["/a//b/x.png", "/a/b/y.png"],
    ["/a/b/../c/x.png", "/a/c/y.png"], ["/a/../b/x.png", "/a/../b/y.png"], ["/a/b/./x.png", "/a/b/y.png"],
    ["/x.png", "/y.png"], ["//a/x.png", "//a/y.png"], ["/a/x/1.png", "/a/x/2/3.png"],
    ["rel/a/x.png", "rel/b/y.png"], ["a/x.png", "b/y.png"], ["../up/a.png", "../up/b.png"],
    ["/abs/a.png", "rel/b.png"], ["rel/b.png", "/abs/a.png", "rel/c.png"], [],
])
def test_relative_paths_are_the_stdlib_ones(paths):
    assert relative_to_common_folder(paths) == stdlib_relative(paths)


def test_a_listed_folder_takes_no_per_path_normalization(monkeypatch):
    """A listing's paths (the common case, 1 M of them at scale) are sliced, not run through relpath (~7 s per
    million), and the digest is the one checkpoints written before hold: sha256 of "<relative path>\\0<label>\\n"."""
    def refuse(*_):
        raise AssertionError("per-path os.path call on clean paths")

    monkeypatch.setattr(os.path, "relpath", refuse)
    paths = [f"/data/{split}/{name}/{i}.png" for split, name in (("train", "cat"), ("train", "dog"), ("val", "cat"))
             for i in range(3)]
    lists = image_lists(paths[:6], [0, 0, 0, 1, 1, 1], paths[6:], [0, 0, 0])
    train = "".join(f"train/{name}/{i}.png\0{label}\n" for name, label in (("cat", 0), ("dog", 1)) for i in range(3))
    val = "".join(f"val/cat/{i}.png\0{0}\n" for i in range(3))
    assert lists == {"train_images": f"6 images {hashlib.sha256(train.encode()).hexdigest()[:16]}",
                     "val_images": f"3 images {hashlib.sha256(val.encode()).hexdigest()[:16]}"}
