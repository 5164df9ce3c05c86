"""Every Python block of README.md runs as written, in order, in one namespace, on generated tiny
images: only paths (the `data/` folders it names are created) and sizes (image size, batch size,
epochs) change. Pretrained weights come from a pre-filled torch hub cache, as on a machine that has
downloaded them once, so no example needs the network."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import write_image_folder

README = Path(__file__).resolve().parents[1] / "README.md"
SIZES = [(r"image_size=\d+", "image_size=32"), (r"batch_size=\d+", "batch_size=4"), (r"max_epochs=\d+", "max_epochs=4")]


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def shrink(code: str) -> str:
    for pattern, replacement in SIZES:
        code = re.sub(pattern, replacement, code)
    return code


@pytest.fixture()
def readme_world(tmp_path, monkeypatch):
    """A working directory with the data/ folders the examples name, and resnet18 'downloaded'."""
    names = set(re.findall(r"data/val/(\w+)/", README.read_text())) or {"bees"}
    classes = tuple(sorted(names | {"ants"}))
    write_image_folder(tmp_path / "data" / "train", classes=classes, per_class=8, seed=1)
    write_image_folder(tmp_path / "data" / "val", classes=classes, per_class=4, seed=2)
    for path in re.findall(r"data/val/\w+/[\w.]+\.jpg", README.read_text()):
        # an unseen image drawn as its folder's class is (conftest: the class index picks the square's colour)
        write_image_folder(tmp_path / "tmp", classes=classes, per_class=1, seed=3)
        label = Path(path).parent.name
        (tmp_path / path).write_bytes((tmp_path / "tmp" / label / f"{label}_0.png").read_bytes())
    hub = tmp_path / "torch_home"
    weights = torchvision.models.ResNet18_Weights.DEFAULT
    (hub / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(torchvision.models.resnet18().state_dict(), hub / "hub" / "checkpoints" / Path(weights.url).name)
    monkeypatch.setenv("TORCH_HOME", str(hub))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_readme_has_the_examples_users_copy():
    blocks = python_blocks()
    assert len(blocks) >= 3
    text = "\n".join(blocks)
    for needed in ("from_folders", "finetune(", "load_from_checkpoint", "class FeatureExtractorFreezeUnfreeze",
                   "FreezeUnfreeze(unfreeze_epoch=11)", "callbacks=["):
        assert needed in text, needed


def test_every_python_block_of_the_readme_runs(readme_world):
    """Each block runs; the results its comments state hold: the saved model is the best epoch's (also in
    runs/bees/), predict labels the bees image "bees", a list gives a list and a folder {path: label};
    the schedule that never fires says so in exactly one warning of ours."""
    from safetensors.torch import load_file

    package = str(Path(__file__).resolve().parents[1] / "dist_finetune")
    namespace: dict = {"__name__": "readme"}
    ours: list[list[str]] = []  # per block, the warnings raised from dist_finetune
    for index, block in enumerate(python_blocks()):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                exec(compile(shrink(block), f"README.md python block {index}", "exec"), namespace)
            except Exception as error:  # noqa: BLE001 - name the block that broke
                raise AssertionError(f"README python block {index} failed: {error!r}\n{block}") from error
        ours.append([str(w.message) for w in caught if w.filename.startswith(package)])
    saved, kept = load_file("model.safetensors"), load_file("runs/bees/model.safetensors")
    assert saved.keys() == kept.keys() and all(torch.equal(saved[k], kept[k]) for k in saved)
    clf = namespace["clf"]
    assert clf.predict("data/val/bees/x.jpg") == "bees"
    assert clf.predict(["data/val/bees/x.jpg"] * 2) == ["bees", "bees"]
    labels = clf.predict("data/val/")
    assert len(labels) == 9 and set(labels.values()) <= {"ants", "bees"}
    blocks = python_blocks()
    first = next(i for i, block in enumerate(blocks) if "clf.predict(" in block)
    never = next(i for i, block in enumerate(blocks) if "FreezeUnfreeze(unfreeze_epoch=11)" in block)
    assert ours[first] == [], ours[first]
    assert len(ours[never]) == 1 and "never happens" in ours[never][0], ours[never]
