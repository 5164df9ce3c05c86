#!/usr/bin/env python
"""Throughput and memory benchmark of dist_finetune against a bare loop and a plain Accelerate loop.

    python scripts/benchmark.py                       # reference setting: resnet18, 224 px, batch 32, fp32
    python scripts/benchmark.py --quick               # tiny sizes, a smoke test (about a minute)
    python scripts/benchmark.py --device cuda --mixed-precision bf16      # on a GPU machine

On a generated image folder of photo-sized JPEGs (mostly 500x375, some 2000x1500; random but
structured content so decoding costs what it costs on photos; cached between runs), with the same
model, batch size, image size and precision for every row, it measures:

  (a) dist_finetune's Trainer, no_freeze: images/s from the metrics' ``images_per_s`` and
      ``epoch_time_s``, over ``--timed-epochs`` epochs after ``--warmup-epochs`` untimed ones (the
      first epoch also pays for starting loader workers, first-touch allocations and AdamW's state:
      it is reported, not used);
  (b) a bare PyTorch loop over pre-decoded, pre-transformed uint8 tensors on the device: the upper
      bound for that model on that machine (same ImageClassifier(pretrained=False), AdamW, loss);
  (c) a plain Accelerate loop written like accelerate's examples/cv_example.py (PIL open + RGB +
      the same transforms in a Dataset, DataLoader, accelerator.prepare/backward);
  the ratios a/b and a/c; epoch time and peak RSS (peak GPU memory on GPU) of no_freeze, freeze and
  both phases of freeze_unfreeze, each configuration in a fresh process; the per-epoch speedup of
  the frozen-feature cache (augment=False); and draft-mode ``load_rgb`` vs a full decode of the large
  JPEGs + the eval transform in a persistent DataLoader worker, as training decodes, at two sizes,
  with the pixel difference and the decode time per DCT scale, whose floor is entropy decoding.

Prints a table with targets (PASS/MISS) and writes every figure to ``--output`` (JSON). Timings on
a shared machine are only as good as its idle time: the CPU used by other processes during every
job is measured (from /proc/stat minus this benchmark's own processes) and reported.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

REPO_ROOT = Path(__file__).resolve().parents[1]
JOBS_SCRIPT = Path(__file__).resolve().with_name("benchmark_jobs.py")

GENERATOR_VERSION = 2
CLASSES = ("class_a", "class_b", "class_c", "class_d")
CLASS_TINTS = ((30, -10, -20), (-20, 25, -10), (-15, -10, 30), (20, 20, -25))
SMALL_SIZE = (500, 375)     # width, height: a typical web photo
LARGE_SIZE = (2000, 1500)   # a 3-megapixel camera photo
PORTRAIT_FRACTION = 0.2     # of the small images, 375x500
JPEG_QUALITY = 90

TARGETS = {"a_over_b": 0.90, "a_over_c": 1.0, "freeze_speedup": 2.5, "draft_speedup": 3.0}
LOAD_LIMIT = 1.5            # 1-minute load average above which timings are called contaminated
FOREIGN_CPU_LIMIT = 0.25    # cores used by other processes during a job, on average
UNCACHED, CACHED = "freeze (train_bn=False, augment=False), no cache", "freeze (train_bn=False, augment=False), cached"


# ---------------------------------------------------------------------------------- dataset


def synth_photo(width: int, height: int, seed: int, class_index: int) -> Image.Image:
    """A photo-like image: smooth colour field, objects with soft edges, textured patches, sensor noise."""
    rng = np.random.default_rng(seed)
    scale = width / SMALL_SIZE[0] if width >= height else height / SMALL_SIZE[0]
    field = np.zeros((height, width, 3), dtype=np.float32)
    for cell, amplitude in ((160, 50.0), (40, 15.0)):  # lighting / large regions, then mid-size detail
        cells = (max(2, round(height / (cell * scale))), max(2, round(width / (cell * scale))), 3)
        octave = np.clip(128 + 40 * rng.standard_normal(cells), 0, 255).astype(np.uint8)
        octave = np.asarray(Image.fromarray(octave).resize((width, height), Image.BICUBIC), dtype=np.float32)
        field += (octave - 128) * (amplitude / 40)
    field += 128 + np.asarray(CLASS_TINTS[class_index], dtype=np.float32)
    image = Image.fromarray(np.clip(field, 0, 255).astype(np.uint8))

    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(15, 35))):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x, y = float(rng.uniform(0, width)), float(rng.uniform(0, height))
        w, h = float(rng.uniform(0.03, 0.3) * width), float(rng.uniform(0.03, 0.3) * height)
        shape = rng.integers(0, 4)
        if shape == 0:
            draw.ellipse([x, y, x + w, y + h], fill=colour)
        elif shape == 1:
            draw.rectangle([x, y, x + w, y + h], fill=colour)
        elif shape == 2:
            corners = int(rng.integers(3, 7))
            points = [(x + float(rng.uniform(-w, w)), y + float(rng.uniform(-h, h))) for _ in range(corners)]
            draw.polygon(points, fill=colour)
        else:
            draw.line([x, y, x + w, y + h], fill=colour, width=max(1, int(rng.integers(1, 6) * scale)))
    image = image.filter(ImageFilter.GaussianBlur(radius=0.8 * scale))

    pixels = np.asarray(image, dtype=np.float32).copy()
    for _ in range(int(rng.integers(3, 8))):  # textured regions: fabric, foliage, brickwork
        ph, pw = int(rng.uniform(0.15, 0.5) * height), int(rng.uniform(0.15, 0.5) * width)
        y0, x0 = int(rng.integers(0, height - ph)), int(rng.integers(0, width - pw))
        angle, period = rng.uniform(0, np.pi), rng.uniform(3, 14) * scale
        yy, xx = np.mgrid[0:ph, 0:pw].astype(np.float32)
        wave = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * (2 * np.pi / period))
        wave *= 1 + 0.5 * rng.standard_normal((ph, pw), dtype=np.float32)
        pixels[y0:y0 + ph, x0:x0 + pw] += float(rng.uniform(8, 25)) * wave[..., None]
    pixels += 4.0 * rng.standard_normal((height, width, 1), dtype=np.float32)   # luminance noise
    pixels += 1.5 * rng.standard_normal((height, width, 3), dtype=np.float32)   # chroma noise
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _write_image(task: tuple) -> None:
    path, width, height, seed, class_index = task
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    temporary = f"{path}.tmp{os.getpid()}"
    synth_photo(width, height, seed, class_index).save(temporary, format="JPEG", quality=JPEG_QUALITY)
    os.replace(temporary, path)


def dataset_spec(args) -> dict:
    val_large = round(args.num_val * args.num_large / args.num_images)
    return {"version": GENERATOR_VERSION, "num_images": args.num_images, "num_large": args.num_large,
            "num_val": args.num_val, "num_val_large": val_large, "seed": args.seed, "classes": list(CLASSES),
            "small_size": list(SMALL_SIZE), "large_size": list(LARGE_SIZE), "portrait_fraction": PORTRAIT_FRACTION,
            "jpeg_quality": JPEG_QUALITY}


def plan_split(split: str, count: int, large: int, seed: int) -> list[dict]:
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    large_indices = set(rng.choice(count, size=large, replace=False).tolist()) if large else set()
    entries = []
    for index in range(count):
        label = index % len(CLASSES)
        if index in large_indices:
            size = LARGE_SIZE
        else:
            size = SMALL_SIZE[::-1] if rng.random() < PORTRAIT_FRACTION else SMALL_SIZE
        # file names must not start with a split name ("train_", "val_", "test_"): `datasets`' imagefolder
        # builder, which dist_finetune uses to list folders, would read them as split names
        entries.append({"path": f"{split}/{CLASSES[label]}/img_{index:05d}.jpg", "label": label,
                        "size": list(size), "large": index in large_indices,
                        "seed": int(rng.integers(0, 2**31))})
    return entries


def prepare_dataset(root: Path, spec: dict) -> dict:
    """Generate (or reuse, when the manifest matches) ``root/train/<class>/*.jpg`` and ``root/val/...``."""
    manifest_path = root / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        entries = manifest["train"] + manifest["val"]
        if manifest.get("spec") == spec and all((root / e["path"]).is_file() for e in entries):
            manifest["generated"] = False
            return manifest
    for split in ("train", "val"):
        shutil.rmtree(root / split, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    manifest = {"spec": spec,
                "train": plan_split("train", spec["num_images"], spec["num_large"], spec["seed"]),
                "val": plan_split("val", spec["num_val"], spec["num_val_large"], spec["seed"])}
    tasks = [(str(root / e["path"]), *e["size"], e["seed"], e["label"]) for e in manifest["train"] + manifest["val"]]
    tasks.sort(key=lambda task: -task[1] * task[2])  # large ones first: better balance over the pool
    start = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(os.cpu_count() or 1) as pool:
        for _ in pool.imap_unordered(_write_image, tasks, chunksize=2):
            pass
    manifest["generation_s"] = round(time.perf_counter() - start, 2)
    temporary = manifest_path.with_suffix(".tmp")
    temporary.write_text(json.dumps(manifest))
    os.replace(temporary, manifest_path)
    manifest["generated"] = True
    return manifest


def describe_dataset(root: Path, manifest: dict) -> dict:
    def stats(entries):
        sizes = [os.path.getsize(root / e["path"]) for e in entries]
        return {"images": len(entries), "mean_kib": round(sum(sizes) / max(1, len(sizes)) / 1024, 1)}

    train = manifest["train"]
    return {"root": str(root), "generated_now": manifest["generated"], "generation_s": manifest.get("generation_s"),
            "train": stats(train), "val": stats(manifest["val"]),
            "small_jpeg": stats([e for e in train if not e["large"]]),
            "large_jpeg": stats([e for e in train if e["large"]])}


# --------------------------------------------------------------------------- job processes


def _cpu_ticks() -> tuple[float, float] | None:
    """(busy, steal) CPU seconds of the whole machine so far, from /proc/stat; None off Linux."""
    try:
        with open("/proc/stat") as handle:
            fields = [int(v) for v in handle.readline().split()[1:]]
    except OSError:
        return None
    hz = os.sysconf("SC_CLK_TCK")
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq) / hz, steal / hz


def _own_cpu() -> float:
    """CPU seconds of this process and its reaped descendants (job processes and their loader workers)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def run_jobs(name: str, jobs: list[dict], common: dict, workdir: Path, device: str, verbose: bool) -> tuple[dict, dict]:
    """Run ``jobs`` in one fresh Python process; returns (results by job name, contamination record)."""
    spec_path, result_path, log_path = (workdir / f"{name}.{suffix}" for suffix in ("spec.json", "result.json", "log"))
    spec_path.write_text(json.dumps({"jobs": jobs, "common": common}))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the Trainer picks its device through Accelerate: hide GPUs
    load_before = os.getloadavg()[0]
    ticks_before, own_before, start = _cpu_ticks(), _own_cpu(), time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.run([sys.executable, str(JOBS_SCRIPT), str(spec_path), str(result_path)],
                                 cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    ticks_after, own = _cpu_ticks(), _own_cpu() - own_before
    output = log_path.read_text()
    if verbose:
        print(output, end="")
    if process.returncode != 0:
        print(output[-6000:], file=sys.stderr)
        raise SystemExit(f"benchmark job process {name!r} failed (exit {process.returncode}); its output is above")
    record = {"process": name, "wall_s": round(wall, 2), "load_before": round(load_before, 2),
              "own_cores": round(own / wall, 2)}
    if ticks_before and ticks_after:
        busy, steal = ticks_after[0] - ticks_before[0], ticks_after[1] - ticks_before[1]
        record["foreign_cores"] = round(max(0.0, busy - own) / wall, 2)
        record["steal_cores"] = round(steal / wall, 2)
    return json.loads(result_path.read_text()), record


# ------------------------------------------------------------------------------- summary


def aggregate(epochs: list[dict]) -> dict:
    """Images/s over several timed epochs (all their images / all their time) and the per-epoch spread."""
    images = sum(e["train_images"] for e in epochs)
    seconds = sum(e["epoch_time_s"] for e in epochs)
    rates = [e["images_per_s"] for e in epochs]
    return {"images_per_s": images / seconds, "epoch_time_s": seconds / len(epochs), "train_images": images,
            "epochs": [e["epoch"] for e in epochs], "min_images_per_s": min(rates), "max_images_per_s": max(rates)}


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def summarize(results: dict, args) -> dict:
    w, t = args.warmup_epochs, args.timed_epochs
    a_run, b_run, c_run = results["a_trainer_no_freeze"], results["b_bare"], results["c_plain_accelerate"]
    a, b, c = aggregate(a_run["epochs"][w:w + t]), aggregate(b_run["epochs"]), aggregate(c_run["epochs"][w:w + t])
    a["first_epoch_images_per_s"] = a_run["epochs"][0]["images_per_s"]
    a["num_workers"] = a_run["num_workers"]
    c["first_epoch_images_per_s"] = c_run["epochs"][0]["images_per_s"]
    c["num_workers"] = c_run["num_workers"]
    b["predecode_s"] = b_run["predecode_s"]
    throughput = {"a_trainer": a, "b_bare": b, "c_plain_accelerate": c}
    a_over_b = a["images_per_s"] / b["images_per_s"]
    a_over_c = a["images_per_s"] / c["images_per_s"]

    def row(run: dict, epochs: list[dict], peak_rss: float, peak_gpu) -> dict:
        workers = [e.get("workers_uss_mib_at_end") for e in epochs]
        return {**aggregate(epochs), "wall_with_val_s": sum(e["wall_with_val_s"] for e in epochs) / len(epochs),
                "peak_rss_mib": peak_rss, "rss_before_finetune_mib": run["rss_before_finetune_mib"],
                "peak_gpu_mib": peak_gpu, "workers_uss_mib": max(filter(None, workers), default=None),
                "setup_s": run["setup_s"]}

    strategies = {}
    for key, label in (("a_trainer_no_freeze", "no_freeze"), ("s_freeze", "freeze (train_bn=False)"),
                       ("s_freeze_train_bn", "freeze (train_bn=True, the default)"),
                       ("f_no_cache", UNCACHED), ("f_cache", CACHED)):
        run = results[key]
        strategies[label] = row(run, run["epochs"][w:w + t], run["peak_rss_mib"], run["peak_gpu_mib"])
    fu = results["s_freeze_unfreeze"]
    frozen, unfrozen = fu["epochs"][w:w + t], fu["epochs"][w + t:w + 2 * t]
    gpu_peak = (lambda es: max(e["peak_gpu_mib"] for e in es) if es[0]["peak_gpu_mib"] is not None else None)
    # phase 1: ru_maxrss read at the hook that starts the first unfrozen epoch (nothing unfrozen ran yet)
    strategies["freeze_unfreeze phase 1 (frozen, train_bn=False)"] = row(
        fu, frozen, frozen[-1]["peak_rss_mib_to_end"], gpu_peak(frozen))
    strategies["freeze_unfreeze phase 2 (unfrozen)"] = row(fu, unfrozen, fu["peak_rss_mib"], gpu_peak(unfrozen))

    no_freeze, freeze = strategies["no_freeze"], strategies["freeze (train_bn=False)"]
    freeze_speedup = freeze["images_per_s"] / no_freeze["images_per_s"]
    freeze_bn_speedup = strategies["freeze (train_bn=True, the default)"]["images_per_s"] / no_freeze["images_per_s"]
    phase_speedup = (strategies["freeze_unfreeze phase 1 (frozen, train_bn=False)"]["images_per_s"]
                     / strategies["freeze_unfreeze phase 2 (unfrozen)"]["images_per_s"])
    rss_saving = no_freeze["peak_rss_mib"] - freeze["peak_rss_mib"]
    decode = results["decode"]

    cached, uncached = strategies[CACHED], strategies[UNCACHED]
    feature_cache = {"used": results["f_cache"]["feature_cache_used"],  # epoch 0, which encodes, is untimed
                     "train_speedup": uncached["epoch_time_s"] / cached["epoch_time_s"],
                     "epoch_speedup": uncached["wall_with_val_s"] / cached["wall_with_val_s"],
                     "first_epoch_s": {label: results[key]["epochs"][0]["wall_with_val_s"]
                                       for key, label in (("f_cache", "cached"), ("f_no_cache", "uncached"))}}
    targets = [
        {"name": "a/b (Trainer / bare loop)", "value": a_over_b, "target": f">= {TARGETS['a_over_b']:.2f}",
         "pass": a_over_b >= TARGETS["a_over_b"], "by": a_over_b - TARGETS["a_over_b"]},
        {"name": "a/c (Trainer / plain Accelerate)", "value": a_over_c, "target": f">= {TARGETS['a_over_c']:.2f}",
         "pass": a_over_c >= TARGETS["a_over_c"], "by": a_over_c - TARGETS["a_over_c"]},
        {"name": "freeze speedup over no_freeze (train_bn=False)", "value": freeze_speedup,
         "target": f">= {TARGETS['freeze_speedup']:.1f}x and lower peak RSS (saves {rss_saving:.0f} MiB)",
         "pass": freeze_speedup >= TARGETS["freeze_speedup"] and rss_saving > 0,
         "by": freeze_speedup - TARGETS["freeze_speedup"]},
        {"name": f"draft decode speedup ({args.image_size} px eval path, loader worker)", "value": decode["speedup"],
         "target": f">= {TARGETS['draft_speedup']:.1f}x", "pass": decode["speedup"] >= TARGETS["draft_speedup"],
         "by": decode["speedup"] - TARGETS["draft_speedup"]},
    ]
    return {"throughput": throughput, "a_over_b": a_over_b, "a_over_c": a_over_c, "strategies": strategies,
            "freeze_speedup": freeze_speedup, "freeze_train_bn_speedup": freeze_bn_speedup,
            "freeze_unfreeze_phase_speedup": phase_speedup, "freeze_rss_saving_mib": rss_saving,
            "feature_cache": feature_cache, "decode": decode, "targets": targets}


def format_report(report: dict) -> str:
    s, summary, ds = report["settings"], report["summary"], report["dataset"]
    lines: list[str] = []
    add = lines.append
    w, t = s["warmup_epochs"], s["timed_epochs"]
    add(f"dist_finetune benchmark: {s['backbone']}, {s['image_size']} px, batch {s['batch_size']}, "
        f"precision {s['mixed_precision']}{', torch.compile' if s['compile'] else ''}, device {report['environment']['device_name']}"
        + ("  [QUICK: smoke-test sizes, figures not meaningful]" if s["quick"] else ""))
    add(f"data: {ds['train']['images']} train JPEGs ({s['num_large']} of {LARGE_SIZE[0]}x{LARGE_SIZE[1]}, mean "
        f"{ds['large_jpeg']['mean_kib']:.0f} KiB; the rest {SMALL_SIZE[0]}x{SMALL_SIZE[1]} or portrait, mean "
        f"{ds['small_jpeg']['mean_kib']:.0f} KiB), {ds['val']['images']} val; {ds['root']}")
    add(f"timing: epochs {w}..{w + t - 1} ({t} timed) after {w} untimed warm-up epoch(s); epoch 0 also pays for "
        "starting loader workers and first allocations. (b): 2 untimed warm-up steps, then the same epochs.")
    add("")
    tp = summary["throughput"]
    add(f"{'throughput':<46}{'img/s':>9}{'epoch s':>10}   {'per-epoch range':<17}notes")

    def spread(r: dict) -> str:
        return f"{r['min_images_per_s']:.2f}-{r['max_images_per_s']:.2f}"

    a, b, c = tp["a_trainer"], tp["b_bare"], tp["c_plain_accelerate"]
    add(f"{'(a) dist_finetune Trainer, no_freeze':<46}{a['images_per_s']:>9.2f}{a['epoch_time_s']:>10.2f}   "
        f"{spread(a):<17}epoch 0: {a['first_epoch_images_per_s']:.2f} img/s; {a['num_workers']} loader worker(s)")
    add(f"{'(b) bare PyTorch, in-memory uint8 tensors':<46}{b['images_per_s']:>9.2f}{b['epoch_time_s']:>10.2f}   "
        f"{spread(b):<17}upper bound: no decoding, no loader")
    add(f"{'(c) plain Accelerate (cv_example style)':<46}{c['images_per_s']:>9.2f}{c['epoch_time_s']:>10.2f}   "
        f"{spread(c):<17}epoch 0: {c['first_epoch_images_per_s']:.2f} img/s; {c['num_workers']} loader worker(s), "
        "full-size decode")
    add("")
    gpu = report["environment"]["device"] == "cuda"
    add(f"{'strategy (a fresh process each)':<50}{'epoch s':>9}{'img/s':>9}{'vs no_freeze':>14}{'peak RSS MiB':>14}"
        f"{'workers MiB':>13}" + (f"{'peak GPU MiB':>14}" if gpu else ""))
    base = summary["strategies"]["no_freeze"]["images_per_s"]
    for label, r in summary["strategies"].items():
        workers = r["workers_uss_mib"]
        add(f"{label:<50}{r['epoch_time_s']:>9.2f}{r['images_per_s']:>9.2f}{r['images_per_s'] / base:>13.2f}x"
            f"{r['peak_rss_mib']:>14.0f}{(f'{workers:.0f}' if workers is not None else 'n/a'):>13}"
            + (f"{r['peak_gpu_mib'] or 0:>14.0f}" if gpu else ""))
    before = summary["strategies"]["no_freeze"]["rss_before_finetune_mib"]
    add(f"  peak RSS: the training process (ru_maxrss); {before:.0f}"
        " MiB of it is interpreter + libraries + model before finetune(). workers: unique memory (USS) of")
    add("  the live loader workers (the persistent train ones; val workers exit after each validation) at the end of"
        " the phase's last epoch.")
    fc, first = summary["feature_cache"], summary["feature_cache"]["first_epoch_s"]
    add(f"  frozen-feature cache{'' if fc['used'] else ' (NOT USED)'}: {fc['train_speedup']:.1f}x per epoch's training "
        f"loop, {fc['epoch_speedup']:.2f}x with validation (which runs the backbone); its epoch 0 encodes the train")
    add(f"  images: {first['cached']:.2f} s with validation (no cache: {first['uncached']:.2f} s)")
    add("")
    d, cpu = summary["decode"], "{user:.1f}+{system:.1f}".format_map
    add(f"{'JPEG decode + eval transform, 1 persistent DataLoader worker':<62}{'full':>8}{'draft':>8}{'speedup':>9}"
        f"   img/s; worker CPU ms/image, user+system; {d['num_large']} JPEGs of {'x'.join(map(str, d['full_size']))}")
    for size, r in d["eval_sizes"].items():
        label = f"  {size} px (resize {r['resize']}, crop): draft min_side={r['resize']} -> " + "x".join(
            map(str, r["draft_size"]))
        add(f"{label:<62}{r['full_images_per_s']:>8.1f}{r['draft_images_per_s']:>8.1f}{r['speedup']:>8.2f}x   "
            f"full {cpu(r['full_ms'])}, draft {cpu(r['draft_ms'])}: {r['user_cpu_speedup']:.2f}x in user CPU")
    add("  decode alone, 1 thread, ms/image (user+system CPU): " + ", ".join(
        f"{'full' if r['scale'] == 1 else '1/' + str(r['scale'])} {'x'.join(map(str, r['decoded_size']))} "
        f"{r['wall']:.1f} ({cpu(r)})" for r in d["decode_only"]))
    add("  system CPU: page faults on fresh decode buffers; how often glibc malloc re-faults them varies between "
        "processes, and with it the full decode's time")
    add("  pixel difference, draft vs full after the transform: " + "; ".join(
        f"{size} px mean |d| {r['mean_abs_diff']:.2f}/255 (max {r['max_abs_diff']})"
        for size, r in d["eval_sizes"].items()))
    pipe = d["train_pipeline_images_per_s"]
    add(f"  training datasets alone (decode + train transforms per sample, {d['pipeline_images']} train images, "
        f"1 thread): dist_finetune {pipe['library_dataset']:.1f} img/s, plain (c) {pipe['plain_dataset']:.1f} img/s")
    add("")
    add(f"{'target':<56}{'measured':>10}   {'goal':<48}result")
    for target in summary["targets"]:
        add(f"{target['name']:<56}{target['value']:>10.2f}   {target['target']:<48}{verdict(target['pass'])} "
            f"({target['by']:+.2f})")
    small = d["eval_sizes"][str(d["small_eval_size"])]
    add(f"  draft decode: entropy decoding of the whole file is a floor no DCT scale removes: decoding alone at 1/8 "
        f"scale saves only {d['draft_ceiling']:.2f}x user CPU; at {d['small_eval_size']} px (1/8 scale) the loader "
        f"speedup is {small['speedup']:.2f}x ({small['user_cpu_speedup']:.2f}x in user CPU)")
    add(f"  also: freeze with train_bn=True (finetune()'s default) is {summary['freeze_train_bn_speedup']:.2f}x "
        f"no_freeze; freeze_unfreeze phase 1 is {summary['freeze_unfreeze_phase_speedup']:.2f}x its phase 2")
    add("")
    cont = report["contamination"]
    add(f"machine load: 1-min load average {cont['load_at_start']:.2f} at start (limit {LOAD_LIMIT}); other "
        f"processes used up to {cont['max_foreign_cores']:.2f} cores during a job (limit {FOREIGN_CPU_LIMIT}) -> "
        + ("CONTAMINATED: timings are not reliable" if cont["contaminated"] else "clean"))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet18", help="any dist_finetune backbone (random init)")
    parser.add_argument("--image-size", type=int, default=None, help="default 224 (quick: 64)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 32 (quick: 8)")
    parser.add_argument("--num-images", type=int, default=None,
                        help="training images; default 192 on CPU, 2048 on GPU (quick: 32)")
    parser.add_argument("--num-large", type=int, default=None,
                        help=f"of which {LARGE_SIZE[0]}x{LARGE_SIZE[1]}; default num_images/8 (quick: 4)")
    parser.add_argument("--num-val", type=int, default=None, help="validation images; default 32 on CPU, 256 on GPU")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no",
                        help="the same for every row; 'no' is fp32")
    parser.add_argument("--compile", action="store_true", help="torch.compile (inductor) in every training row")
    parser.add_argument("--warmup-epochs", type=int, default=1, help="untimed epochs before the timed ones")
    parser.add_argument("--timed-epochs", type=int, default=None, help="epochs timed per row (default 3; quick: 1)")
    parser.add_argument("--plain-workers", type=int, default=None,
                        help="loader workers of (c); default: the Trainer's own default, for the same work")
    parser.add_argument("--decode-reps", type=int, default=None, help="timed passes over the large JPEGs (default 5)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--data-dir", default=None,
                        help="dataset folder (generated once, reused while its settings match); "
                             "default: <tmp>/dist_finetune_benchmark/<settings>")
    parser.add_argument("--output", default="benchmark.json", help="JSON file with every figure")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, not a measurement")
    parser.add_argument("--verbose", action="store_true", help="show the job processes' output")
    args = parser.parse_args(argv)
    if args.warmup_epochs < 0:
        parser.error("--warmup-epochs must be >= 0")
    if args.timed_epochs is not None and args.timed_epochs < 1:
        parser.error("--timed-epochs must be >= 1")
    return args


def resolve_defaults(args, device: str) -> None:
    gpu = device == "cuda"
    quick = {"image_size": 64, "batch_size": 8, "num_images": 32, "num_val": 8, "decode_reps": 2, "timed_epochs": 1}
    full = {"image_size": 224, "batch_size": 32, "num_images": 2048 if gpu else 192,
            "num_val": 256 if gpu else 32, "decode_reps": 5, "timed_epochs": 3}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.num_large is None:
        args.num_large = 4 if args.quick else max(1, args.num_images // 8)
    if not 1 <= args.num_large <= args.num_images:
        raise SystemExit("--num-large must be between 1 and --num-images (the decode benchmark needs one)")
    if args.num_images < args.batch_size or args.num_val < 1:
        raise SystemExit("--num-images must be >= --batch-size, --num-val >= 1")


def environment(device: str) -> dict:
    import accelerate
    import PIL
    import torch
    import torchvision

    name = torch.cuda.get_device_name(0) if device == "cuda" else (platform.processor() or platform.machine())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"device": device, "device_name": f"{name} ({cores} CPU cores)" if device == "cpu" else name,
            "cpu_cores": cores, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "accelerate": accelerate.__version__, "pillow": PIL.__version__,
            "platform": platform.platform()}


def main(argv=None) -> int:
    args = parse_args(argv)
    load_at_start = os.getloadavg()[0]
    import torch  # after the numbers above; the dataset pool below only runs numpy and PIL

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    resolve_defaults(args, device)

    spec = dataset_spec(args)
    root = Path(args.data_dir) if args.data_dir else Path(tempfile.gettempdir()) / "dist_finetune_benchmark" / (
        f"n{args.num_images}_l{args.num_large}_v{args.num_val}_s{args.seed}_g{GENERATOR_VERSION}")
    print(f"dataset: {root} ...", flush=True)
    manifest = prepare_dataset(root, spec)
    dataset = describe_dataset(root, manifest)
    print(f"dataset: {'generated in ' + str(dataset['generation_s']) + ' s' if manifest['generated'] else 'reused'}; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)

    train = manifest["train"]
    common = {
        "device": device, "mixed_precision": args.mixed_precision, "compile": args.compile, "backbone": args.backbone,
        "image_size": args.image_size, "batch_size": args.batch_size, "lr": args.lr, "weight_decay": 1e-4,
        "seed": args.seed, "num_classes": len(CLASSES),
        "train_dir": str(root / "train"), "val_dir": str(root / "val"),
        "train_paths": [str(root / e["path"]) for e in train], "train_labels": [e["label"] for e in train],
        "large_paths": [str(root / e["path"]) for e in train if e["large"]],
    }
    w, t = args.warmup_epochs, args.timed_epochs
    jobs = {
        "decode": {"kind": "decode", "reps": args.decode_reps},
        "a_trainer_no_freeze": {"kind": "trainer", "strategy": "no_freeze", "train_bn": True, "epochs": w + t},
        "b_bare": {"kind": "bare", "warmup_steps": 2, "epochs": t},
        "c_plain_accelerate": {"kind": "plain", "epochs": w + t, "num_workers": args.plain_workers},
        "s_freeze": {"kind": "trainer", "strategy": "freeze", "train_bn": False, "epochs": w + t},
        "s_freeze_train_bn": {"kind": "trainer", "strategy": "freeze", "train_bn": True, "epochs": w + t},
        "s_freeze_unfreeze": {"kind": "trainer", "strategy": ["freeze_unfreeze", w + t], "train_bn": False,
                              "epochs": w + 2 * t},
        "f_cache": {"kind": "trainer", "strategy": "freeze", "train_bn": False, "augment": False, "epochs": w + t},
    }
    jobs["f_no_cache"] = {**jobs["f_cache"], "cache_frozen_features": False}
    for name, job in jobs.items():
        job["name"] = name
    # one process per configuration (peak RSS per configuration); --quick groups the non-Trainer rows
    # and the two feature-cache rows
    if args.quick:
        groups = [["b_bare", "c_plain_accelerate", "decode"], ["a_trainer_no_freeze"], ["s_freeze"],
                  ["s_freeze_train_bn"], ["s_freeze_unfreeze"], ["f_cache", "f_no_cache"]]
    else:
        groups = [[name] for name in jobs]

    results, records = {}, []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dist_finetune_benchmark_") as workdir:
        for group in groups:
            label = "+".join(group)
            print(f"running {label} ...", flush=True)
            found, record = run_jobs(label, [jobs[name] for name in group], common, Path(workdir), device, args.verbose)
            results.update(found)
            records.append(record)
            print(f"  done in {record['wall_s']:.1f} s (other processes: {record.get('foreign_cores', 'n/a')} cores)",
                  flush=True)

    foreign = [r.get("foreign_cores", 0.0) for r in records]
    contamination = {
        "load_at_start": round(load_at_start, 2), "load_limit": LOAD_LIMIT,
        "max_foreign_cores": max(foreign), "foreign_cpu_limit": FOREIGN_CPU_LIMIT, "per_process": records,
        "contaminated": load_at_start > LOAD_LIMIT or max(foreign) > FOREIGN_CPU_LIMIT,
    }
    settings = {k: v for k, v in vars(args).items() if k not in ("verbose",)}
    settings["device"] = device
    report = {"settings": settings, "environment": environment(device), "dataset": dataset,
              "contamination": contamination, "total_wall_s": round(time.perf_counter() - started, 1),
              "targets_reference": TARGETS, "results": results}
    report["summary"] = summarize(results, args)
    text = format_report(report)
    report["table"] = text
    Path(args.output).write_text(json.dumps(report, indent=2))
    print()
    print(text)
    print(f"\nwrote {args.output} (total {report['total_wall_s']:.0f} s of jobs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
