"""The prediction pipeline against a bare inference loop (row (p) of ``speed``).

    python -m benchmarks predict [--quick] [--backbone B --image-size S --batch-size N --device D ...]

The same generated JPEGs and settings as ``python -m benchmarks speed`` (whose options it takes),
only this job, in a fresh process; writes ``benchmark-predict.json``.

(p) dist_finetune's prediction pipeline, in this process: ``prediction.predict_to_file`` over the
generated JPEGs with its default loader workers, writing a CSV, which is what ``dist-finetune
predict`` runs after its imports and the model load; against (q) a bare inference loop over the same
images pre-decoded (the same decode and transform) and already on the device: the upper bound.
Same model (random init), batch size, precision and channels_last in both; each pass after an
untimed warm-up of two batches.
"""

from __future__ import annotations

import os
import tempfile
import time


def job_predict(job: dict, common: dict) -> dict:
    import torch

    from dist_finetune import ImageClassifier, seed_everything
    from dist_finetune.data import default_num_workers, eval_resize_size, eval_transform
    from dist_finetune.images import load_rgb
    from dist_finetune.memory_format import channels_last_by_default
    from dist_finetune.prediction import autocast_dtype, predict_to_file, select_device

    device = select_device(common["device"])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the bare loops of the other rows
    seed_everything(common["seed"])
    size, batch, paths = common["image_size"], common["batch_size"], common["train_paths"]
    task = ImageClassifier(num_classes=common["num_classes"], backbone=common["backbone"], pretrained=False,
                           image_size=size)
    workers = default_num_workers(1)  # what `dist-finetune predict` uses in one process
    settings = {"batch_size": batch, "device": device, "mixed_precision": common["mixed_precision"],
                "num_workers": workers, "tune_cpu_allocator": common["tune_cpu_allocator"]}
    with tempfile.TemporaryDirectory(prefix="benchmark_predict_") as folder:
        output = os.path.join(folder, "predictions.csv")
        predict_to_file(task, paths[:2 * batch], output, progress=False, **settings)  # warm-up
        summary = predict_to_file(task, paths, output, progress=False, **settings)
    if summary.images != len(paths) or summary.unreadable:
        raise SystemExit(f"predict job: {summary.images} rows, {summary.unreadable} unreadable, {len(paths)} files")

    start = time.perf_counter()
    transform, min_side = eval_transform(size), eval_resize_size(size)
    images = torch.stack([transform(load_rgb(path, min_side)) for path in paths]).to(device)
    predecode_s = time.perf_counter() - start
    channels_last = channels_last_by_default(task, device)  # as predict_to_file chose
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    dtype = autocast_dtype(common["mixed_precision"])
    task.to(device).eval()  # (predict_to_file left it there, channels_last too)

    def run(first: int, last: int) -> None:
        for begin in range(first, last, batch):
            with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                task(images[begin:begin + batch]).float().softmax(dim=1).max(dim=1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    run(0, 2 * batch)  # warm-up
    start = time.perf_counter()
    run(0, len(paths))
    bare_s = time.perf_counter() - start
    predict_rate, bare_rate = len(paths) / summary.seconds, len(paths) / bare_s
    return {
        "images": len(paths), "device": str(device), "channels_last": channels_last,
        "num_workers": workers, "torch_threads": torch.get_num_threads(),
        "predict_s": round(summary.seconds, 3), "predict_images_per_s": predict_rate,
        "bare_s": round(bare_s, 3), "bare_images_per_s": bare_rate, "predecode_s": round(predecode_s, 3),
        "predict_over_bare": predict_rate / bare_rate,
    }


def main(argv: list[str] | None = None) -> int:
    from .speed import main as speed

    return speed(argv, only=("p_predict",), prog="python -m benchmarks predict", doc=__doc__,
                 output="benchmark-predict.json")
