"""The built-in default run: a generated patterns dataset, finetuned offline in a couple of minutes.

Four classes (horizontal stripes, vertical stripes, checkerboard, dots) drawn as patches of random
position, size, period and colours over random backgrounds with distractor blobs, blur and noise,
so the task needs local spatial features, not a colour histogram, and a randomly initialised CNN
learns it in minutes. No network: pretrained weights are used only if torchvision's cache already
holds them.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

PATTERNS = ("horizontal", "vertical", "checker", "dots")


def _random_colour(rng: random.Random, avoid: tuple[int, int, int] | None = None) -> tuple[int, int, int]:
    while True:
        colour = tuple(rng.randrange(256) for _ in range(3))
        if avoid is None or sum(abs(a - b) for a, b in zip(colour, avoid)) > 180:
            return colour  # type: ignore[return-value]


def draw_pattern(pattern: str, size: int, rng: random.Random) -> Image.Image:
    """A patch of ``pattern`` at a random place and scale, random colours, clutter, blur and noise."""
    background = _random_colour(rng)
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randrange(0, 4)):  # distractor blobs
        x, y, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(size * 0.03, size * 0.08)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=_random_colour(rng))
    width, height = (int(size * rng.uniform(0.45, 0.8)) for _ in range(2))
    left, top = rng.randrange(0, size - width + 1), rng.randrange(0, size - height + 1)
    ink = _random_colour(rng, avoid=background)
    period = rng.randrange(max(4, size // 16), max(6, size // 6))
    half = period // 2
    for y in range(top, top + height, period if pattern != "vertical" else height):
        for x in range(left, left + width, period if pattern != "horizontal" else width):
            if pattern == "horizontal":
                draw.rectangle((left, y, left + width - 1, min(y + half - 1, top + height - 1)), fill=ink)
            elif pattern == "vertical":
                draw.rectangle((x, top, min(x + half - 1, left + width - 1), top + height - 1), fill=ink)
            elif pattern == "checker":
                for dx, dy in ((0, 0), (half, half)):
                    if x + dx < left + width and y + dy < top + height:
                        draw.rectangle((x + dx, y + dy, min(x + dx + half - 1, left + width - 1),
                                        min(y + dy + half - 1, top + height - 1)), fill=ink)
            elif pattern == "dots":
                draw.ellipse((x, y, x + half, y + half), fill=ink)
            else:
                raise ValueError(f"unknown pattern {pattern!r}")
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.6)))
    noise = Image.effect_noise((size, size), rng.uniform(5, 30)).convert("RGB")
    return Image.blend(image, noise, rng.uniform(0.05, 0.2))


def make_patterns_dataset(root: str | os.PathLike, train_per_class: int = 150, val_per_class: int = 40,
                        size: int = 64, seed: int = 0, holdout_per_class: int = 2) -> Path:
    """Write ``root/{train,val,holdout}/<shape>/*.jpg``; returns ``root``. Deterministic in ``seed``."""
    rng = random.Random(seed)
    root = Path(root)
    splits = {"train": train_per_class, "val": val_per_class, "holdout": holdout_per_class}
    for split, count in splits.items():
        for pattern in PATTERNS:
            folder = root / split / pattern
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                draw_pattern(pattern, size, rng).save(folder / f"{pattern}_{index:04d}.jpg", quality=90)
    return root


def cached_pretrained_weights_available(backbone: str) -> bool:
    """True when torchvision's cache already holds the backbone's default weights (no download)."""
    import torch
    import torchvision

    weights = torchvision.models.get_model_weights(backbone).DEFAULT
    filename = os.path.basename(weights.url)
    return os.path.isfile(os.path.join(torch.hub.get_dir(), "checkpoints", filename))


def run_demo(output_dir: str | os.PathLike = "demo_output", max_epochs: int = 8, backbone: str = "resnet18") -> dict:
    """Generate the shapes data, finetune with freeze_unfreeze, save, and predict held-out images."""
    from .config import DataConfig, ModelConfig, RunConfig, StrategyConfig, TrainerConfig
    from .task import ImageClassifier
    from .recipe import finetune_from_config
    from .plots import CURVES_FILENAME
    from .trainer import MODEL_FILENAME

    output_dir = Path(output_dir)
    data_root = make_patterns_dataset(output_dir / "data")
    pretrained = cached_pretrained_weights_available(backbone)
    print(f"demo: {'pretrained' if pretrained else 'randomly initialised (no cached pretrained weights, offline)'} "
          f"{backbone} on 4 generated pattern classes in {data_root}")
    config = RunConfig(
        data=DataConfig(train_folder=str(data_root / "train"), val_folder=str(data_root / "val"),
                        image_size=64, batch_size=32),
        model=ModelConfig(backbone=backbone, pretrained=pretrained),
        # offline the backbone is random: it must learn, not be preserved (lr / 10, BatchNorm training)
        strategy=StrategyConfig(name="freeze_unfreeze", unfreeze_epoch=1, train_bn=True, initial_denom_lr=10),
        trainer=TrainerConfig(max_epochs=max_epochs, lr=3e-3, output_dir=str(output_dir), warmup_epochs=0.5),
    )
    trainer, _, metrics = finetune_from_config(config)
    if not trainer.accelerator.is_main_process:
        return metrics[-1]
    model = ImageClassifier.load_from_checkpoint(output_dir / MODEL_FILENAME)
    holdout = sorted(str(p) for p in (data_root / "holdout").rglob("*.jpg"))
    print(f"demo: saved {output_dir / MODEL_FILENAME}; predictions on held-out images:")
    for path, (label, score) in zip(holdout, model.predict_with_scores(holdout)):
        print(f"  {Path(path).parent.name:>9} -> {label:<9} ({score:.2f})")
    kept = next((record for record in reversed(metrics) if record.get("best")), metrics[-1])
    print(f"demo: final val_acc {metrics[-1]['val_acc']:.3f}; {MODEL_FILENAME} is epoch {kept['epoch']}'s, "
          f"val_acc {kept['val_acc']:.3f} (chance 0.25)")
    shown = {"training curves": CURVES_FILENAME, "confusion matrix": "confusion_matrix.png",
             "per-class report": "report.json"}
    for what, name in shown.items():
        if (output_dir / name).is_file():
            print(f"demo: {what}: {output_dir / name}")
    print(f"demo: the same for any run: dist-finetune plot RUN_DIR, dist-finetune evaluate --checkpoint "
          f"{output_dir / MODEL_FILENAME} --data-folder {data_root / 'val'}")
    return metrics[-1]
