"""The image scan's cache file: columns (fast to read back at a million images), older files still read."""

import json

from PIL import Image

from dist_finetune import images as images_module
from dist_finetune.images import scan, scan_images


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
