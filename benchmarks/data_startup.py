"""Data start-up at scale: how long before the first training step on a folder of N small images.

Generates an ImageNet-shaped folder (``train/<class>/*.png`` and ``val/<class>/*.png``, 1,000 classes
from 100 k files on, 100 below; 16x16 PNGs of noise, every file distinct) under ``--root``, then measures,
each in a fresh interpreter (imports included where said):

- torchvision ``ImageFolder(train)``: import, and listing (the reference);
- our listing, cold (no index) and warm (the index of the first), ``from_folders(train, val)``;
- the image scan, cold (no cache) and warm;
- ``dist-finetune train`` to its first logged step, with 1 and 2 processes (warm caches);
- ``dist-finetune pack`` of the folder, and the first step when training from the packed dataset.

The machine may be shared: the torchvision figures are taken in the same run, so compare ratios.
``python -m benchmarks data-startup --files 10000 100000 --out results/data-startup.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image

VAL_PER_CLASS_SHARE = 1 / 21  # 200 train + 10 val per class, as in the 210 k folder
ENV = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def _write_class(task: tuple[str, int, int]) -> None:
    folder, count, seed = task
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        handle = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(handle, "PNG", compress_level=1)
        with open(os.path.join(folder, f"img_{index:06d}.png"), "wb") as file:
            file.write(handle.getvalue())


def generate(root: Path, files: int) -> Path:
    """``root/train`` and ``root/val`` with ``files`` images in all (kept while ``root/.files`` says so)."""
    marker = root / ".files"
    if marker.is_file() and marker.read_text() == str(files):
        return root
    shutil.rmtree(root, ignore_errors=True)
    classes = 1000 if files >= 100_000 else 100
    val = max(1, round(files / classes * VAL_PER_CLASS_SHARE))
    train = files // classes - val
    tasks = [(str(root / split / f"n{label:08d}"), count, label * 2 + (split == "val"))
             for split, count in (("train", train), ("val", val)) for label in range(classes)]
    with Pool(os.cpu_count() or 1) as pool:
        pool.map(_write_class, tasks, chunksize=4)
    marker.write_text(str(files))
    return root


def _timed_python(code: str, env: dict) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON object of its timings."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


TORCHVISION = """
import json, sys, time
start = time.perf_counter()
from torchvision.datasets import ImageFolder
imported = time.perf_counter()
ImageFolder({train!r})
print(json.dumps({{"import_s": imported - start, "listing_s": time.perf_counter() - imported}}))
"""

OURS = """
import json, time
start = time.perf_counter()
from dist_finetune import ImageClassificationData
imported = time.perf_counter()
data = ImageClassificationData.from_folders({train!r}, {val!r})
listed = time.perf_counter()
data.check_images()
print(json.dumps({{"import_s": imported - start, "listing_s": listed - imported,
                  "scan_s": time.perf_counter() - listed}}))
"""


def _process_tree(pid: int) -> list[int]:
    """``pid`` and every process below it (Linux /proc): the launcher starts ranks in sessions of their own."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        try:
            parent = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            children.setdefault(parent, []).append(int(entry.name))
        except (ValueError, OSError):
            continue
    tree, pending = [], [pid]
    while pending:
        tree.append(pending.pop())
        pending += children.get(tree[-1], [])
    return tree


def _first_step(arguments: list[str], processes: int, output: Path, env: dict) -> float:
    """Seconds from launching ``dist-finetune train`` until its first step is in steps.jsonl."""
    shutil.rmtree(output, ignore_errors=True)
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1", "--num_processes",
        str(processes), "--mixed_precision", "no", "--dynamo_backend", "no"]
    command = [*launcher, "-m", "dist_finetune", "train", *arguments, "--backbone", "resnet18", "--no-pretrained",
               "--image-size", "32", "--batch-size", "32", "--max-epochs", "1", "--log-every-n-steps", "1",
               "--no-progress-bar", "--output-dir", str(output)]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                               start_new_session=True)
    steps = output / "steps.jsonl"
    try:
        while not (steps.is_file() and steps.stat().st_size > 0):
            if process.poll() is not None:
                raise RuntimeError(process.stderr.read().decode()[-3000:])
            time.sleep(0.05)
        return time.perf_counter() - start
    finally:
        for member in _process_tree(process.pid):
            try:
                os.kill(member, 9)
            except ProcessLookupError:
                pass
        process.wait()
        time.sleep(1)  # the ranks' files closed before the next run removes the folder


def measure(root: Path, files: int, work: Path, processes: tuple[int, ...]) -> dict:
    data = generate(root, files)
    train, val = str(data / "train"), str(data / "val")
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    env = {**ENV, "XDG_CACHE_HOME": str(cache), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    row: dict = {"files": files, "load_average_1min": os.getloadavg()[0]}
    row["torchvision"] = _timed_python(TORCHVISION.format(train=train), env)
    row["cold"] = _timed_python(OURS.format(train=train, val=val), env)
    row["warm"] = _timed_python(OURS.format(train=train, val=val), env)
    folders = ["--train-folder", train, "--val-folder", val]
    row["first_step_s"] = {str(n): _first_step(folders, n, work / "run", env) for n in processes}
    packed = work / "packed"
    shutil.rmtree(packed, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dist_finetune", "pack", *folders, "--output", str(packed)],
                   check=True, env=env, capture_output=True)
    row["pack_s"] = time.perf_counter() - start
    row["packed_first_step_s"] = {str(n): _first_step(["--dataset", str(packed)], n, work / "run", env)
                                  for n in processes}
    shutil.rmtree(packed, ignore_errors=True)
    reference = row["torchvision"]["import_s"] + row["torchvision"]["listing_s"]
    row["ratios"] = {"listing_vs_torchvision": row["cold"]["listing_s"] / row["torchvision"]["listing_s"],
                     "warm_first_step_vs_torchvision_import_and_listing": row["first_step_s"]["1"] / reference,
                     "packed_first_step_vs_torchvision_import_and_listing": row["packed_first_step_s"]["1"] / reference}
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks data-startup", description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, nargs="+", default=[10_000, 100_000], help="folder sizes to measure")
    parser.add_argument("--quick", action="store_true", help="one small folder (2,000 files), 1 process")
    parser.add_argument("--root", default="/tmp/dist_finetune_data_startup", help="where folders are generated")
    parser.add_argument("--out", help="JSON file to write the rows to (else printed)")
    parser.add_argument("--keep", action="store_true", help="keep the generated folders")
    args = parser.parse_args(argv)
    sizes, processes = ([2_000], (1,)) if args.quick else (args.files, (1, 2))
    root = Path(args.root)
    rows = []
    for files in sizes:
        row = measure(root / f"files_{files}", files, root / "work", processes)
        print(json.dumps(row), flush=True)
        rows.append(row)
        if not args.keep:
            shutil.rmtree(root / f"files_{files}", ignore_errors=True)
        if args.out:  # after every row: the large ones take long
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            result = {"machine": f"{os.cpu_count()} cores, shared (see load_average_1min)", "rows": rows}
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
