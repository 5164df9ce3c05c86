"""The image scan (dist_finetune/images.py): every bad file is found before training, named, and either stops
the run or (skip_bad_images) is skipped; its cache (columns, fast to read back at a million images; older
per-file caches still read) and the decompression-bomb limit."""

from __future__ import annotations

import io
import json

import accelerate
import numpy as np
import pytest
import torch
from conftest import task, tiny_trainer, write_image_folder
from PIL import Image

from dist_finetune import ImageClassificationData, ImageClassifier, images as images_module
from dist_finetune.errors import DataError
from dist_finetune.images import scan, scan_images


def test_no_process_waits_in_a_barrier_while_another_scans_the_images(tiny_data, monkeypatch):
    """The scan is split over every rank (test_distributed_ranks runs it under a 5 s timeout): neither
    main_process_first nor local_main_process_first, whose barrier would outlast NCCL's timeout."""
    used = []
    for name in ("main_process_first", "local_main_process_first"):
        original = getattr(accelerate.Accelerator, name)

        def recording(self, _name=name, _original=original):
            used.append(_name)
            return _original(self)

        monkeypatch.setattr(accelerate.Accelerator, name, recording)
    tiny_trainer(max_epochs=1).finetune(task(), tiny_data, "freeze")
    assert used == []


@pytest.fixture()
def messy(tmp_path, monkeypatch):
    """A train folder with one of each kind of bad file, and odd-but-fine files."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = write_image_folder(tmp_path / "train", per_class=6, size=32)
    photo = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(photo, "JPEG")
    bad = {
        "truncated.jpg": photo.getvalue()[: len(photo.getvalue()) // 2],
        "notes.jpg": b"these are my notes, not a picture",
        "empty.png": b"",
    }
    for name, content in bad.items():
        (root / "red" / name).write_bytes(content)
    Image.new("RGB", (20, 20), "green").save(root / "green" / "really_a_png.jpg", format="PNG")
    frames = [Image.new("P", (20, 20), i) for i in range(3)]
    frames[0].save(root / "blue" / "animated.gif", save_all=True, append_images=frames[1:])
    return root, {str(root / "red" / name) for name in bad}


def test_scan_finds_exactly_the_bad_files_and_caches(messy, monkeypatch, tmp_path):
    root, bad = messy
    paths = sorted(str(p) for p in root.rglob("*") if p.is_file())
    problems = scan_images(paths, tmp_path / "scan.json")
    assert set(problems) == bad
    assert "truncated" in problems[str(root / "red" / "truncated.jpg")]
    assert "empty file" in problems[str(root / "red" / "empty.png")]
    calls = []
    monkeypatch.setattr(images_module, "image_problem", lambda path: calls.append(path))
    assert scan_images(paths, tmp_path / "scan.json") == problems and calls == []  # all from the cache


def test_a_scan_split_over_processes_fills_every_processs_cache(messy, monkeypatch, tmp_path):
    """Under several processes each checks only its part (``share``, as distributed.split_over_ranks does)
    and stores the merged verdicts in its own cache (node-local caches): the next run there is warm."""
    root, bad = messy
    paths = sorted(str(p) for p in root.rglob("*") if p.is_file())
    real, checked = images_module.image_problem, []
    monkeypatch.setattr(images_module, "image_problem", lambda path: checked.append(path) or real(path))

    def two_processes(items, check):  # this process's part, merged with the other's (the all-gather)
        return {**check(items[1::2]), **check(items[0::2])}

    for node in ("node_a", "node_b"):
        checked.clear()
        verdicts = scan(paths, tmp_path / f"{node}.json", share=two_processes)
        assert list(verdicts) == paths and {p for p, (problem, _) in verdicts.items() if problem} == bad
        assert sorted(checked) == paths, "every file checked once, by one of the processes"
    checked.clear()
    assert set(scan_images(paths, tmp_path / "node_b.json")) == bad and checked == [], "all from the cache"


def test_bad_file_stops_the_run_before_training(messy):
    root, bad = messy
    data = ImageClassificationData.from_folders(str(root), val_split=0.25, image_size=32, batch_size=4, num_workers=0)
    task = ImageClassifier(3, "tiny_resnet", pretrained=False)
    before = {n: p.clone() for n, p in task.named_parameters()}
    with pytest.raises(DataError, match=r"cannot read image .*red/(empty|notes|truncated).*\(2 more unreadable\)"):
        tiny_trainer(max_epochs=1).finetune(task, data, "no_freeze")
    assert all(torch.equal(before[n], p) for n, p in task.named_parameters())


def test_skip_bad_images_trains_on_the_rest(messy, capsys):
    root, bad = messy
    data = ImageClassificationData.from_folders(str(root), val_split=0.25, image_size=32, batch_size=4,
                                                num_workers=0, skip_bad_images=True)
    metrics = tiny_trainer(max_epochs=1).finetune(ImageClassifier(3, "tiny_resnet", pretrained=False), data, "no_freeze")
    assert not bad & set(data.train_paths + data.val_paths)
    assert metrics[0]["train_images"] > 0
    printed = capsys.readouterr().out
    assert "skipping 3 unreadable image(s)" in printed and all(path in printed for path in bad)


def test_decompression_bomb_is_a_bad_image(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    Image.new("RGB", (300, 300)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100 // 2)  # 300x300 is now over twice the limit
    assert "decompression bomb" in scan_images([str(path)])[str(path)]


def test_scan_cache_is_invalidated_by_size_or_mtime(tmp_path, monkeypatch):
    """A cached verdict holds while the file's size and mtime are unchanged; either change rescans that file
    (only that one): same-size garbage with a new mtime is found, a new image with the old mtime is cleared."""
    import os

    good, other = tmp_path / "a.png", tmp_path / "b.png"
    Image.new("RGB", (16, 16), "red").save(good)
    Image.new("RGB", (16, 16), "blue").save(other)
    paths, cache = [str(good), str(other)], tmp_path / "scan.json"
    real = images_module.image_problem
    checked = []
    monkeypatch.setattr(images_module, "image_problem", lambda path: checked.append(path) or real(path))
    assert scan_images(paths, cache) == {} and sorted(checked) == sorted(paths)

    stamp = good.stat()
    good.write_bytes(b"x" * stamp.st_size)  # same size, other bytes
    os.utime(good, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    checked.clear()
    assert scan_images(paths, cache) == {} and checked == [], "size and mtime unchanged: the cached verdict holds"
    os.utime(good, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 1_000_000_000))
    problems = scan_images(paths, cache)
    assert list(problems) == [str(good)] and checked == [str(good)], "a new mtime rescans that file only"

    garbage_mtime = good.stat().st_mtime_ns
    Image.new("RGB", (40, 40), "green").save(good)  # another size
    os.utime(good, ns=(stamp.st_atime_ns, garbage_mtime))
    checked.clear()
    assert scan_images(paths, cache) == {} and checked == [str(good)], "a new size rescans that file"


def test_the_scan_cache_is_stored_as_columns_and_a_per_item_file_still_counts(tmp_path, monkeypatch):
    paths = []
    for name, colour in (("a.png", "red"), ("b.png", "blue")):
        Image.new("RGB", (16, 16), colour).save(tmp_path / name)
        paths.append(str(tmp_path / name))
    cache = tmp_path / "scan.json"
    assert scan_images(paths, cache) == {}
    version, items, sizes, mtimes, problems, digests = json.loads(cache.read_text())
    assert (version, items, problems) == (2, paths, [None, None])
    assert sizes == [(tmp_path / n).stat().st_size for n in ("a.png", "b.png")] and len(digests[0]) == 64

    per_item = {item: [size, mtime, None, digest] for item, size, mtime, digest in zip(items, sizes, mtimes, digests)}
    cache.write_text(json.dumps(per_item))  # the format before columns
    checked = []
    monkeypatch.setattr(images_module, "image_problem", lambda path: checked.append(path))
    assert scan_images(paths, cache) == {} and checked == [], "verdicts of a per-item file hold"


class Rows:
    """A reader whose stamps differ in length (a dataset's rows: a file's size and mtime, or a hash of bytes)."""
    cache_key = "rows"

    def __init__(self):
        self.checked = []

    def stamp(self, item):
        return ["file", 1] if item.endswith(".png") else ["bytes"]

    def check(self, item):
        self.checked.append(item)
        return None, f"digest of {item}"


def test_entries_of_mixed_shapes_are_stored_per_item_and_read_back(tmp_path):
    cache, reader = tmp_path / "scan.json", Rows()
    first = scan(["x.png", "row-1"], cache, reader)
    assert json.loads(cache.read_text()) == {"x.png": ["file", 1, None, "digest of x.png"],
                                             "row-1": ["bytes", None, "digest of row-1"]}
    again = Rows()
    assert scan(["x.png", "row-1"], cache, again) == first == {"x.png": (None, "digest of x.png"),
                                                              "row-1": (None, "digest of row-1")}
    assert again.checked == []


def test_file_stamps_are_taken_in_the_calling_thread(tmp_path, monkeypatch):
    """A stat holds the GIL: spread over a thread pool, 200 k of them took twice as long as in one thread."""
    import threading

    for name in ("a.png", "b.png"):
        Image.new("RGB", (16, 16), "red").save(tmp_path / name)
    threads, real = set(), images_module.file_stamp
    monkeypatch.setattr(images_module, "file_stamp", lambda path: threads.add(threading.get_ident()) or real(path))
    scan_images([str(tmp_path / "a.png"), str(tmp_path / "b.png")], tmp_path / "scan.json")
    assert threads == {threading.get_ident()}


def test_the_scan_runs_with_the_garbage_collector_paused_and_restores_it(tmp_path):
    """Its many small acyclic objects made the collector's passes cost as much as a warm scan itself."""
    import gc

    class Recording(Rows):
        def stamp(self, item):
            self.collecting = gc.isenabled()
            return ["bytes"]

    reader = Recording()
    assert gc.isenabled()
    scan(["row-1"], tmp_path / "scan.json", reader)
    assert reader.collecting is False and gc.isenabled()
