"""The image-list digests of a run's signature: what a resume compares, computed fast for listed folders."""

import hashlib
import os

import pytest

from dist_finetune.training_state import image_lists, relative_to_common_folder


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
