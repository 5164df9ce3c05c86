"""Listing an image folder: the same files as the pathlib walk it replaces, listed once and then read from
an index that any change to the folder's contents invalidates."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from PIL import Image

from dist_finetune import listing
from dist_finetune.sources import read_folders


@pytest.fixture()
def index_home(tmp_path, monkeypatch):
    """A private cache home, folders indexable as soon as they are listed, and a count of walks."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(listing, "SETTLE_NS", 0)
    walks = []
    walk = listing.walk_image_files

    def counted(top):
        walks.append(top)
        return walk(top)

    monkeypatch.setattr(listing, "walk_image_files", counted)
    return walks


def png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (len(path.name) * 9 % 256, 0, 0)).save(path, "PNG")


def settle(root: Path) -> None:
    """Stamp every folder an hour back, so a change made now is a different stamp at any clock granularity."""
    past = os.stat(root).st_mtime - 3600
    for folder in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        os.utime(folder, (past, past))


def tricky_folder(root: Path) -> Path:
    for name in ("a/x.png", "a/X2.PNG", "a/x[1].png", "a/x1.png", "a/.hidden.png", "a/sub/deep.jpg",
                 "a/.ipynb_checkpoints/copy.png", "a/dir.png/inner.png", "b [x]/y.JPEG", "b [x]/*?.webp",
                 ".hiddenclass/z.png", "c/only.png"):
        png(root / name)
    (root / "a" / "notes.txt").write_text("not an image")
    (root / "loose.png").write_bytes(b"")  # a file next to the classes is no class
    (root / "a" / "linked").symlink_to(root / "c", target_is_directory=True)  # a symlinked folder is not entered
    settle(root)
    return root


EXPECTED = [("a/.hidden.png", 0), ("a/X2.PNG", 0), ("a/dir.png/inner.png", 0), ("a/sub/deep.jpg", 0),
            ("a/x.png", 0), ("a/x1.png", 0), ("a/x[1].png", 0), ("b [x]/*?.webp", 1), ("b [x]/y.JPEG", 1),
            ("c/only.png", 2)]


def test_the_listing_is_the_pathlib_walk_s_and_a_second_one_reads_the_index(tmp_path, index_home):
    root = tricky_folder(tmp_path / "train")
    for attempt in range(2):
        paths, labels, classes = listing.list_class_folder(str(root), "train")
        assert classes == ["a", "b [x]", "c"]
        assert list(zip(paths, labels)) == [(f"{root}/{path}", label) for path, label in EXPECTED]
    assert len(index_home) == 3  # one walk per class, the first time only
    assert listing.index_file(str(root)).is_file()


def test_a_symlinked_file_is_listed_but_its_folder_never_indexed(tmp_path, index_home):
    root = tricky_folder(tmp_path / "train")
    (root / "c" / "link.png").symlink_to(root / "a" / "x.png")
    settle(root)
    for _ in range(2):
        paths, _, _ = listing.list_class_folder(str(root), "train")
        assert f"{root}/c/link.png" in paths
    assert len(index_home) == 6 and not listing.index_file(str(root)).exists()


@pytest.mark.parametrize("change", ["add", "remove", "rename", "add_class", "add_in_subfolder"])
def test_any_change_to_the_folder_lists_it_again(tmp_path, index_home, change):
    root = tricky_folder(tmp_path / "train")
    before, _, _ = listing.list_class_folder(str(root), "train")
    if change == "add":
        png(root / "c" / "new.png")
    elif change == "remove":
        (root / "a" / "x1.png").unlink()
    elif change == "rename":
        (root / "a" / "x1.png").rename(root / "a" / "x9.png")
    elif change == "add_class":
        png(root / "d" / "new.png")
    else:
        png(root / "a" / "sub" / "new.png")
    after, labels, classes = listing.list_class_folder(str(root), "train")
    assert len(index_home) == (7 if change == "add_class" else 6)  # listed again
    expected = {"add": {f"{root}/c/new.png"}, "remove": set(), "rename": {f"{root}/a/x9.png"},
                "add_class": {f"{root}/d/new.png"}, "add_in_subfolder": {f"{root}/a/sub/new.png"}}[change]
    assert set(after) - set(before) == expected
    assert set(before) - set(after) == ({f"{root}/a/x1.png"} if change in ("remove", "rename") else set())
    assert classes == ["a", "b [x]", "c", *(["d"] if change == "add_class" else [])]


def test_processes_listing_one_folder_at_once_walk_it_once(tmp_path, index_home):
    """What every rank of a job does when it builds its data: the first lists, the others read its index."""
    root = tricky_folder(tmp_path / "train")
    results = []
    threads = [threading.Thread(target=lambda: results.append(listing.list_class_folder(str(root), "train")))
               for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 3 and all(result == results[0] for result in results)
    assert len(index_home) == 3


def test_read_folders_lists_train_and_val_through_the_index(tmp_path, index_home):
    train, val = tricky_folder(tmp_path / "train"), tricky_folder(tmp_path / "val")
    first = read_folders(str(train), str(val))
    second = read_folders(str(train), str(val))
    assert (second.train, second.val, second.classes) == (first.train, first.val, first.classes)
    assert len(index_home) == 6 and first.val.items[0] == f"{val}/a/.hidden.png"
