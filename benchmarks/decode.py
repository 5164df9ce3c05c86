"""The data pipeline alone: draft vs full JPEG decode, decode time per DCT scale, dataset cost.

    python -m benchmarks data [--quick] [--image-size S --num-images N --num-large L --decode-reps R ...]

Draft-mode vs full JPEG decode of the large images through a DataLoader worker, decode time per
DCT scale, and the per-sample cost of dist_finetune's training dataset against the plain one
(``baselines.FolderImages``). The same generated JPEGs and options as ``python -m benchmarks
speed`` (the ``decode`` row there), only this job, in a fresh process; writes
``benchmark-data.json``.
"""

from __future__ import annotations

import resource
import statistics
import time

import psutil  # an Accelerate dependency

from .baselines import FolderImages, plain_transform

DECODE_MAX_IMAGES = 24      # large JPEGs timed per decode variant (keeps the GPU-sized dataset's run short)
DECODE_BATCH_SIZE = 8       # of the decode job's loaders: a few batches per pass over the large JPEGs
SMALL_EVAL_SIZE = 128       # resize target 146: a 2000x1500 JPEG draft-decodes at 1/8 scale (250x188)
PIPELINE_MAX_IMAGES = 192   # training images timed per dataset in the decode job


def _thread_cpu_s() -> tuple[float, float]:
    """(user, system) CPU seconds of the calling thread (of the process off Linux)."""
    usage = resource.getrusage(getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF))
    return usage.ru_utime, usage.ru_stime


def workers_cpu_s() -> tuple[float, float]:
    """(user, system) CPU seconds of this process's live children, the loader workers."""
    user = system = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
        except psutil.Error:
            continue
        user, system = user + times.user, system + times.system
    return user, system


def _timed(run, cpu_s) -> tuple[float, float, float]:
    """(wall, user CPU, system CPU) seconds of ``run()``, the CPU as counted by ``cpu_s``."""
    cpu_before, start = cpu_s(), time.perf_counter()
    run()
    wall, cpu_after = time.perf_counter() - start, cpu_s()
    return wall, cpu_after[0] - cpu_before[0], cpu_after[1] - cpu_before[1]


def _interleaved_passes(functions: dict, items: list, reps: int) -> dict[str, list[tuple]]:
    """(wall, user, system) seconds per pass over ``items`` for every function, in this thread, the
    functions interleaved per item in a rotating order, so that all of them run under the same
    cache and allocator state. One untimed pass first (file cache, lazy imports)."""
    names = list(functions)
    for item in items:
        for name in names:
            functions[name](item)
    times: dict[str, list] = {name: [] for name in names}
    for rep in range(reps):
        spent = {name: (0.0, 0.0, 0.0) for name in names}
        for position, item in enumerate(items):
            shift = (position + rep) % len(names)
            for name in names[shift:] + names[:shift]:
                took = _timed(lambda: functions[name](item), _thread_cpu_s)
                spent[name] = tuple(a + b for a, b in zip(spent[name], took))
        for name in names:
            times[name].append(spent[name])
    return times


def _loader_passes(loaders: dict, passes: int) -> dict[str, list[tuple]]:
    """(wall, worker user, worker system) seconds per pass through every loader, the loaders
    interleaved in a rotating order so that they share the machine's state; only the loader being
    read has a busy worker. The first pass (worker start, file cache) is dropped."""
    names = list(loaders)
    times: dict[str, list] = {name: [] for name in names}
    for index in range(passes):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(_timed(lambda: sum(1 for _ in loaders[name]), workers_cpu_s))
    return {name: spent[1:] for name, spent in times.items()}


def _per_image_ms(passes: list[tuple], images: int) -> dict[str, float]:
    """Median wall, user and system milliseconds per image over the passes. System time here is
    page faults on fresh decode buffers (~8,800 per full 2000x1500 decode when glibc malloc hands
    freed buffers back to the kernel), which varies between processes; user time does not."""
    wall, user, system = (1000 * statistics.median(column) / images for column in zip(*passes))
    return {"wall": wall, "user": user, "system": system}


def job_decode(job: dict, common: dict) -> dict:
    """In-thread measurements run with one torch thread, like a DataLoader worker."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _decode(job, common)
    finally:
        torch.set_num_threads(threads)  # a later job in the same process trains with the default threads


def _decode(job: dict, common: dict) -> dict:
    """Full vs draft decode of the large JPEGs as training decodes them, in a loader worker (the eval
    path: resize to size/0.875, center crop), at the configured size and at SMALL_EVAL_SIZE, where
    the 1/8 DCT scale applies; decode alone per DCT scale, in one thread, shows the floor left by
    entropy decoding of the whole file, which no scale removes."""
    import torch
    from PIL import Image

    from dist_finetune.data import ImageClassificationData, ImageListDataset, eval_resize_size, eval_transform, load_rgb

    reps = job["reps"]
    large = common["large_paths"][:DECODE_MAX_IMAGES]
    labels = [0] * len(large)
    data = ImageClassificationData(large, labels, [], [], ["large"], batch_size=DECODE_BATCH_SIZE)
    sizes = list(dict.fromkeys([common["image_size"], SMALL_EVAL_SIZE]))
    loaders = {f"{variant}_{size}": data.dataloader(ImageListDataset(large, labels, eval_transform(size), side),
                                                    shuffle=False, num_workers=1)
               for size in sizes for variant, side in (("full", None), ("draft", eval_resize_size(size)))}
    passes = _loader_passes(loaders, reps + 1)  # first, so that the workers fork from a process that decoded nothing
    del loaders  # ends the persistent workers
    eval_sizes = {}
    for size in sizes:
        transform, min_side = eval_transform(size), eval_resize_size(size)
        row = eval_sizes[str(size)] = {"resize": min_side, "draft_size": list(load_rgb(large[0], min_side).size)}
        for variant in ("full", "draft"):  # per image: wall time, and the worker's user and system CPU
            row[f"{variant}_ms"] = _per_image_ms(passes[f"{variant}_{size}"], len(large))
            row[f"{variant}_images_per_s"] = 1000 / row[f"{variant}_ms"]["wall"]
        row["speedup"] = row["draft_images_per_s"] / row["full_images_per_s"]
        row["user_cpu_speedup"] = row["full_ms"]["user"] / row["draft_ms"]["user"]
        differences = [(transform(load_rgb(path)).int() - transform(load_rgb(path, min_side)).int()).abs()
                       for path in large]
        row["mean_abs_diff"] = statistics.mean(d.float().mean().item() for d in differences)
        row["max_abs_diff"] = max(d.max().item() for d in differences)

    with Image.open(large[0]) as image:
        full_size = image.size
    scales = (1, 2, 4, 8)

    def decode_at(scale: int):
        """load_rgb asking for 1/scale of the short side: PIL's draft picks exactly that DCT scale."""
        side = min(full_size) // scale if scale > 1 else None
        return lambda path: load_rgb(path, side)

    decoders = {scale: decode_at(scale) for scale in scales}
    decode_only = _interleaved_passes(decoders, large, reps)
    decode_ms = [{"scale": scale, "decoded_size": list(decoders[scale](large[0]).size),
                  **_per_image_ms(decode_only[scale], len(large))} for scale in scales]

    # per-sample cost of the two training datasets (decode + train transforms), one thread
    size = common["image_size"]
    data = ImageClassificationData(common["train_paths"], common["train_labels"], [], [],
                                   [str(i) for i in range(common["num_classes"])], image_size=size,
                                   batch_size=common["batch_size"])
    library = data.train_dataset(common["seed"])
    plain = FolderImages(common["train_paths"], common["train_labels"], plain_transform(size, train=True))
    stride = max(1, len(library) // PIPELINE_MAX_IMAGES)  # a fixed, evenly spread subset on big datasets
    keys = list(range(0, len(library), stride))
    pipeline = _interleaved_passes({"library": lambda k: library[k], "plain": lambda k: plain[k]}, keys,
                                   max(1, min(3, reps)))
    return {
        "num_large": len(large), "full_size": list(full_size), "timed_passes": reps, "small_eval_size": SMALL_EVAL_SIZE,
        "loader": {"num_workers": 1, "batch_size": DECODE_BATCH_SIZE, "persistent_workers": True},
        "eval_sizes": eval_sizes, "speedup": eval_sizes[str(common["image_size"])]["speedup"],
        "decode_only": decode_ms,
        "draft_ceiling": decode_ms[0]["user"] / decode_ms[-1]["user"],  # user CPU, decode alone: full vs 1/8
        "pipeline_images": len(keys),
        "train_pipeline_images_per_s": {
            "library_dataset": 1000 / _per_image_ms(pipeline["library"], len(keys))["wall"],
            "plain_dataset": 1000 / _per_image_ms(pipeline["plain"], len(keys))["wall"],
        },
        "torch_threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    from .speed import main as speed

    return speed(argv, only=("decode",), prog="python -m benchmarks data", doc=__doc__, output="benchmark-data.json")
