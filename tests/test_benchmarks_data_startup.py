"""The data start-up benchmark's generated folder: ImageNet-shaped, every file a distinct readable PNG."""

from __future__ import annotations

import hashlib

from PIL import Image

from benchmarks.data_startup import generate


def test_the_generated_folder_has_the_asked_files_all_distinct(tmp_path):
    root = generate(tmp_path / "folder", 300)  # 100 classes: 2 train + 1 val each
    train, val = sorted((root / "train").rglob("*.png")), sorted((root / "val").rglob("*.png"))
    assert (len(train), len(val)) == (200, 100)
    assert len({path.parent.name for path in train}) == 100 and train[0].name == "img_000000.png"
    assert len({hashlib.sha256(path.read_bytes()).hexdigest() for path in train + val}) == 300
    assert Image.open(val[0]).size == (16, 16)
    assert generate(tmp_path / "folder", 300) == root  # kept while its size matches
