"""Measurement jobs of ``python -m benchmarks speed`` (and ``predict``, ``data``), each run in a fresh process.

    python -m benchmarks.jobs SPEC.json RESULT.json

SPEC is ``{"jobs": [job, ...], "common": {...}}``; every job is one measurement (its "kind" picks
the function below) and its result dict goes to RESULT under the job's name. Running each
configuration in its own process makes peak RSS (ru_maxrss) and peak GPU memory per configuration,
and keeps one job's allocator/worker state out of the next job's timings.

Jobs:
- ``trainer``: dist_finetune's Trainer.finetune with one strategy (optionally augment=False and
  cache_frozen_features=False); per-epoch metrics plus peak RSS (and peak GPU memory) per strategy
  phase, read at the strategy's epoch hook.
- ``bare``: the plain loop (``baselines.train_epoch``) over pre-decoded, pre-transformed uint8 tensors
  on the device (the upper bound).
- ``plain``: the plain loop through Accelerate, in the style of accelerate's examples/cv_example.py.
- ``decode`` (in ``decode.py``): the data pipeline alone: draft-mode vs full JPEG decode of
  the large images through a DataLoader worker, decode time per DCT scale, and the per-sample cost of
  both training datasets.
- ``predict`` (in ``predict.py``): the prediction pipeline vs a bare inference loop.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import psutil  # an Accelerate dependency

from dist_finetune.memory_format import channels_last_by_default
from dist_finetune.prediction import autocast_dtype, select_device

from .baselines import FolderImages, cosine, plain_transform, train_epoch
from .decode import job_decode
from .predict import job_predict

MIB = 1024 * 1024


# ------------------------------------------------------------------------------- helpers


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports ru_maxrss in KiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / MIB


def current_rss_mib() -> float:
    return psutil.Process().memory_info().rss / MIB


def workers_uss_mib() -> float:
    """Unique memory (USS) of this process's children, the loader workers.

    Workers are forked: their RSS counts pages shared copy-on-write with this process, so what they
    cost is their USS. Reading it walks their page tables (~5 ms per worker with 2 GiB mapped), so
    it is read only at epoch boundaries, never sampled while an epoch is timed.
    """
    total = 0
    for child in psutil.Process().children(recursive=True):
        try:
            total += child.memory_full_info().uss
        except psutil.Error:
            pass
    return round(total / MIB, 1)


def gpu_peak_mib(device, reset: bool = False) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device) / MIB
    if reset:
        torch.cuda.reset_peak_memory_stats(device)
    return round(peak, 1)


def match_trainer_backend(device) -> None:
    """What the Trainer sets up for CUDA besides channels_last: cuDNN autotuning (fixed input sizes)."""
    import torch

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


# ------------------------------------------------------------------------- (a) the Trainer


def epoch_probe(on_epoch):
    """A trainer callback: ``on_epoch(epoch)`` at the start of every epoch (it reads the clock and the
    memory peaks there), and which epochs trained the head on cached features."""
    from dist_finetune.callbacks import Callback

    class EpochProbe(Callback):
        def __init__(self):
            self.cached_epochs: list[int] = []

        def on_epoch_start(self, trainer, run) -> None:
            on_epoch(run.position.epoch)

        def on_epoch_end(self, trainer, run, record) -> None:
            if run.feature_loader is not None:
                self.cached_epochs.append(record["epoch"])

    return EpochProbe()


def job_trainer(job: dict, common: dict) -> dict:
    import torch

    from dist_finetune import ImageClassificationData, ImageClassifier, Trainer, seed_everything
    from dist_finetune.finetuning import resolve_strategy

    device = select_device(common["device"])
    rss_at_start = current_rss_mib()
    seed_everything(common["seed"])
    data = ImageClassificationData.from_folders(
        common["train_dir"], common["val_dir"], image_size=common["image_size"], batch_size=common["batch_size"],
        augment=job.get("augment", True), seed=common["seed"],
    )
    task = ImageClassifier(num_classes=data.num_classes, backbone=common["backbone"], pretrained=False)
    strategy_spec = job["strategy"] if isinstance(job["strategy"], str) else tuple(job["strategy"])
    marks: list[dict] = []

    def on_epoch(epoch: int) -> None:
        now = time.perf_counter()
        marks.append({"epoch": epoch, "t": now, "peak_rss_mib": round(peak_rss_mib(), 1),
                      "rss_mib": round(current_rss_mib(), 1), "peak_gpu_mib": gpu_peak_mib(device, reset=True),
                      "workers_uss_mib": workers_uss_mib()})

    strategy = resolve_strategy(strategy_spec, train_bn=job["train_bn"])
    probe = epoch_probe(on_epoch)
    trainer = Trainer(max_epochs=job["epochs"], lr=common["lr"], progress_bar=False,
                      mixed_precision=common["mixed_precision"], seed=common["seed"],
                      cache_frozen_features=job.get("cache_frozen_features", True), compile=common["compile"],
                      tune_cpu_allocator=job.get("tune_cpu_allocator", common["tune_cpu_allocator"]),
                      load_best_model_at_end=False, callbacks=[probe])
    rss_before_finetune = current_rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    metrics = trainer.finetune(task, data, strategy=strategy, train_bn=job["train_bn"])
    end = time.perf_counter()
    final_gpu = gpu_peak_mib(device)
    final_workers = workers_uss_mib()  # the prepared loaders (and their persistent workers) are still alive

    epochs = []
    for index, record in enumerate(metrics):
        mark = marks[index]
        wall = (marks[index + 1]["t"] if index + 1 < len(marks) else end) - mark["t"]
        # peak memory of this epoch: read at the next epoch's hook (ru_maxrss is monotonic, so an epoch's
        # value is the peak of everything up to its end); the GPU peak is reset at every hook
        next_mark = marks[index + 1] if index + 1 < len(marks) else None
        epochs.append({
            "epoch": record["epoch"],
            "images_per_s": record["images_per_s"],
            "epoch_time_s": record["epoch_time_s"],
            "train_images": record["train_images"],
            "wall_with_val_s": round(wall, 3),
            "train_loss": record["train_loss"],
            "val_acc": record["val_acc"],
            "peak_rss_mib_to_end": next_mark["peak_rss_mib"] if next_mark else round(peak_rss_mib(), 1),
            "peak_gpu_mib": next_mark["peak_gpu_mib"] if next_mark else final_gpu,
            "workers_uss_mib_at_end": next_mark["workers_uss_mib"] if next_mark else final_workers,
        })
    return {
        "strategy": job["strategy"], "train_bn": job["train_bn"], "augment": data.augment, "epochs": epochs,
        "feature_cache_used": bool(probe.cached_epochs),  # a cache row that trained on features
        "device": str(device), "torch_threads": torch.get_num_threads(),
        "num_workers": _resolved_workers(data),
        "channels_last": channels_last_by_default(task, device),
        "setup_s": round(marks[0]["t"] - start, 3) if marks else None,
        "finetune_wall_s": round(end - start, 3),
        "rss_at_start_mib": round(rss_at_start, 1),
        "rss_before_finetune_mib": round(rss_before_finetune, 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "peak_gpu_mib": max([m["peak_gpu_mib"] for m in marks] + [final_gpu]) if final_gpu is not None else None,
        "workers_uss_mib_at_end": final_workers,
    }


def _resolved_workers(data) -> int:
    from dist_finetune.data import default_num_workers

    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return data.num_workers if data.num_workers is not None else default_num_workers(local)


# ------------------------------------------------------------------- (b) bare PyTorch loop


def job_bare(job: dict, common: dict) -> dict:
    """Upper bound: the plain loop over pre-decoded, pre-transformed uint8 images already on the device."""
    import torch

    from dist_finetune import ImageClassifier, seed_everything
    from dist_finetune.data import eval_resize_size, eval_transform, load_rgb

    device = select_device(common["device"])
    match_trainer_backend(device)
    seed_everything(common["seed"])
    size, batch = common["image_size"], common["batch_size"]
    paths, labels = common["train_paths"], common["train_labels"]
    start = time.perf_counter()
    transform, min_side = eval_transform(size), eval_resize_size(size)
    images = torch.stack([transform(load_rgb(path, min_side)) for path in paths])  # uint8 [N, 3, S, S]
    predecode_s = time.perf_counter() - start
    targets = torch.tensor(labels, dtype=torch.long)
    task = ImageClassifier(num_classes=common["num_classes"], backbone=common["backbone"], pretrained=False)
    channels_last = channels_last_by_default(task, device)
    if channels_last:
        task = task.to(memory_format=torch.channels_last)
    task = task.to(device).train()
    model = torch.compile(task) if common["compile"] else task
    images, targets = images.to(device), targets.to(device)
    optimizer = torch.optim.AdamW([{"params": task.parameters(), "base_lr": common["lr"]}], lr=common["lr"],
                                  weight_decay=common["weight_decay"])
    loop = {"device": device, "autocast_dtype": autocast_dtype(common["mixed_precision"]),
            "channels_last": channels_last,
            "scaler": torch.amp.GradScaler(device.type) if common["mixed_precision"] == "fp16" else None}
    steps = len(paths) // batch  # drop_last, like the Trainer's train loader
    generator = torch.Generator().manual_seed(common["seed"])

    def batches(count: int):
        order = torch.randperm(len(paths), generator=generator).to(device)
        return [(images[index], targets[index]) for index in order[:count * batch].split(batch)]

    warmup_steps = min(steps, job.get("warmup_steps", 2))
    train_epoch(model, batches(warmup_steps), optimizer, **loop)  # allocator, AdamW state, kernels/autotuning
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    epochs = []
    for epoch in range(job["epochs"]):
        record, _ = train_epoch(model, batches(steps), optimizer, **loop)
        epochs.append({"epoch": epoch, **record})
    return {
        "epochs": epochs, "warmup_steps": warmup_steps, "predecode_s": round(predecode_s, 3),
        "device": str(device), "torch_threads": torch.get_num_threads(), "channels_last": channels_last,
        "peak_rss_mib": round(peak_rss_mib(), 1), "peak_gpu_mib": gpu_peak_mib(device),
    }


# ------------------------------------------------------ (c) plain Accelerate (cv_example style)


def job_plain(job: dict, common: dict) -> dict:
    """The plain loop through Accelerate: a folder Dataset in DataLoader workers, prepare, backward."""
    import torch
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from dist_finetune import ImageClassifier, seed_everything

    device = select_device(common["device"])
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=common["mixed_precision"],
                              dynamo_backend="inductor" if common["compile"] else "no")
    match_trainer_backend(accelerator.device)
    seed_everything(common["seed"])
    size, batch = common["image_size"], common["batch_size"]
    dataset = FolderImages(common["train_paths"], common["train_labels"], plain_transform(size, train=True))
    workers = job.get("num_workers")
    if workers is None:  # the Trainer's own default for one process, so both loops get the same workers
        from dist_finetune.data import default_num_workers

        workers = default_num_workers(1)
    loader = DataLoader(dataset, shuffle=True, batch_size=batch, num_workers=workers,
                        pin_memory=accelerator.device.type == "cuda", drop_last=True)
    model = ImageClassifier(num_classes=common["num_classes"], backbone=common["backbone"], pretrained=False)
    channels_last = channels_last_by_default(model, accelerator.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = model.to(accelerator.device)
    optimizer = torch.optim.AdamW([{"params": model.parameters(), "base_lr": common["lr"]}], lr=common["lr"],
                                  weight_decay=common["weight_decay"])
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    total = job["epochs"] * len(loader)

    epochs, step = [], 0
    for epoch in range(job["epochs"]):
        model.train()
        record, step = train_epoch(model, loader, optimizer, device=accelerator.device, step=step,
                                   lr_factor=lambda s: cosine(s, total), backward=accelerator.backward,
                                   channels_last=channels_last)
        epochs.append({"epoch": epoch, **record})
    return {
        "epochs": epochs, "num_workers": workers, "device": str(accelerator.device),
        "torch_threads": torch.get_num_threads(), "channels_last": channels_last,
        "peak_rss_mib": round(peak_rss_mib(), 1), "peak_gpu_mib": gpu_peak_mib(accelerator.device),
    }


JOBS = {"trainer": job_trainer, "bare": job_bare, "plain": job_plain, "decode": job_decode, "predict": job_predict}


def main(argv: list[str]) -> int:
    spec_path, result_path = argv
    spec = json.loads(Path(spec_path).read_text())
    common = spec["common"]
    if all(job.get("tune_cpu_allocator", common["tune_cpu_allocator"]) for job in spec["jobs"]):
        from dist_finetune.host_memory import keep_freed_memory  # process-wide: the same for every job here

        if select_device(common["device"]).type == "cpu":
            keep_freed_memory()
    results = {}
    for job in spec["jobs"]:
        start = time.perf_counter()
        result = JOBS[job["kind"]](job, spec["common"])
        result["job_wall_s"] = round(time.perf_counter() - start, 3)
        results[job["name"]] = result
        Path(result_path).write_text(json.dumps(results, indent=1))  # partial results survive a later crash
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
