"""Throughput and memory of the Trainer against a bare loop and a plain Accelerate loop.

    python -m benchmarks speed                       # reference setting: resnet18, 224 px, batch 32, fp32
    python -m benchmarks speed --quick               # tiny sizes, a smoke test (about two minutes)
    python -m benchmarks speed --device cuda --mixed-precision bf16      # on a GPU machine

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
  (p) the prediction pipeline (``prediction.predict_to_file``, in the job process: what
      ``dist-finetune predict`` runs after its imports and model load) over the train JPEGs, vs (q) a
      bare inference loop over the same images pre-decoded on the device;
  (a') the Trainer as (a) but with glibc's default malloc (``tune_cpu_allocator=False``): on a CPU
      every other row runs with malloc keeping freed memory (``dist_finetune.host_memory``, the
      Trainer's default; the bare and plain loops get the same setting so the ratios compare loops,
      not allocators; ``--default-malloc`` runs every row without it);
  the ratios a/b, a/c, a/a' and p/q; epoch time and peak RSS (peak GPU memory on GPU) of no_freeze,
  freeze and both phases of freeze_unfreeze, each configuration in a fresh process; the per-epoch
  speedup of the frozen-feature cache (augment=False); and draft-mode ``load_rgb`` vs a full decode
  of the large JPEGs + the eval transform in a persistent DataLoader worker, as training decodes, at
  two sizes, with the pixel difference and the decode time per DCT scale, whose floor is entropy
  decoding.

The generated data is ``synthetic.py``'s; the jobs run in fresh processes through ``jobs.py`` (the
decode and predict jobs in ``decode.py`` and ``predict.py``, which also run alone as the ``data`` and
``predict`` subcommands); the (b) and (c) loops are ``baselines.train_epoch``; ``report.py`` sums
them up and prints the table.

Prints a table with targets (PASS/MISS) and writes every figure to ``--output`` (JSON). Timings on
a shared machine are only as good as its idle time: the CPU used by other processes during every
job is measured (from /proc/stat minus this benchmark's own processes) and reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .report import FOREIGN_CPU_LIMIT, LOAD_LIMIT, TARGETS, format_report, summarize
from .synthetic import CLASSES, GENERATOR_VERSION, LARGE_SIZE, dataset_spec, describe_dataset, prepare_dataset

REPO_ROOT = Path(__file__).resolve().parents[1]


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
        process = subprocess.run([sys.executable, "-m", "benchmarks.jobs", str(spec_path), str(result_path)],
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


# ----------------------------------------------------------------------------------- main


def parse_args(argv=None, prog: str = "python -m benchmarks speed", doc: str = __doc__,
               output: str = "benchmark.json") -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    parser.add_argument("--default-malloc", action="store_true",
                        help="every row with glibc's default malloc (the Trainer's tune_cpu_allocator=False)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--data-dir", default=None,
                        help="dataset folder (generated once, reused while its settings match); "
                             "default: <tmp>/dist_finetune_benchmark/<settings>")
    parser.add_argument("--output", default=output, help="JSON file with every figure")
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


def main(argv=None, only: tuple[str, ...] = (), prog: str = "python -m benchmarks speed", doc: str = __doc__,
         output: str = "benchmark.json") -> int:
    """Every row, or with ``only`` just those jobs (the ``predict`` and ``data`` subcommands): their
    results are written and printed as JSON, without the summary, which needs every row."""
    args = parse_args(argv, prog, doc, output)
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
        "seed": args.seed, "num_classes": len(CLASSES), "tune_cpu_allocator": not args.default_malloc,
        "train_dir": str(root / "train"), "val_dir": str(root / "val"),
        "train_paths": [str(root / e["path"]) for e in train], "train_labels": [e["label"] for e in train],
        "large_paths": [str(root / e["path"]) for e in train if e["large"]],
    }
    w, t = args.warmup_epochs, args.timed_epochs
    jobs = {
        "decode": {"kind": "decode", "reps": args.decode_reps},
        "p_predict": {"kind": "predict"},
        "a_trainer_no_freeze": {"kind": "trainer", "strategy": "no_freeze", "train_bn": True, "epochs": w + t},
        "a_default_malloc": {"kind": "trainer", "strategy": "no_freeze", "train_bn": True, "epochs": w + t,
                             "tune_cpu_allocator": False},
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
    if only:
        jobs = {name: jobs[name] for name in only}
    # one process per configuration (peak RSS per configuration); --quick, a smoke test whose peaks and
    # speeds mean nothing, runs every row in one process, except the row whose malloc setting is per process
    if args.quick:
        groups = [["a_default_malloc"], [name for name in jobs if name != "a_default_malloc"]]
    else:
        groups = [[name] for name in jobs]
    groups = [[name for name in group if name in jobs] for group in groups]
    groups = [group for group in groups if group]

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
    if only:
        Path(args.output).write_text(json.dumps(report, indent=2))
        print(json.dumps(results, indent=1))
        print(f"\nwrote {args.output}")
        return 0
    report["summary"] = summarize(results, args)
    text = format_report(report)
    report["table"] = text
    Path(args.output).write_text(json.dumps(report, indent=2))
    print()
    print(text)
    print(f"\nwrote {args.output} (total {report['total_wall_s']:.0f} s of jobs)")
    return 0
