"""Per-rank memory of DDP vs FSDP2 vs FSDP2 + activation checkpointing, counted in tensor bytes (2 CPU ranks).

Launches 2 gloo ranks (torchrun) that finetune through the package's own path (``Trainer(sharding=...,
activation_checkpointing=...).finetune``) for 2 epochs of ``--steps`` optimizer steps, with ``no_freeze`` and
with ``FreezeUnfreeze(unfreeze_epoch=1)``; the measured step is the run's last, so after the unfreeze.

Process RSS is a poor measure of FSDP2 on CPU (glibc keeps the freed all-gather buffers, so RSS stays
level with DDP's while the parameters held halve), so each rank counts tensor bytes, at the measured step:

- parameters: bytes of every parameter of the task this rank holds (a DTensor: its local shard);
- gradients: bytes of the ``.grad`` tensors (local shards) just before ``optimizer.step()``;
- optimizer: bytes of the AdamW state tensors (``exp_avg``, ``exp_avg_sq``, ``step``; local shards) just
  after it;
- peak live: torch's own tensor memory tracker over the whole step (``torch.distributed._tools``:
  ``MemTracker`` for DDP, ``FSDPMemTracker`` for FSDP2), a TorchDispatchMode that follows every storage
  created in the step until it is freed (storage resizes included, which is how FSDP2 frees a gathered
  layer). At its peak it splits the live bytes by kind; "activations" is everything there that is not a
  parameter, gradient or optimizer state of the model (saved activations, temporaries, gathered FSDP2
  parameters and collective buffers, the batch), i.e. what training holds on top of the model's states.

Not counted: DDP's gradient buckets (allocated when the wrapper is built, one more gradient's worth unless
``gradient_as_bucket_view``): the DDP figures are a lower bound, the ratios favour DDP. RSS (VmHWM, the
process's peak resident set) is reported too, as a secondary column.

``python -m benchmarks fsdp-memory --out results/fsdp2-memory.json`` (ViT-B/16, timm, random init, 224 px).
``--quick``: a 0.3 M-parameter timm ViT at 32 px, all runs in one launch, for a smoke test.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPOSITORY = Path(__file__).resolve().parents[1]
RUNS = {  # name -> (sharding, activation checkpointing, strategy)
    "ddp/no_freeze": ("ddp", False, "no_freeze"),
    "fsdp2/no_freeze": ("fsdp2", False, "no_freeze"),
    "fsdp2+ac/no_freeze": ("fsdp2", True, "no_freeze"),
    "ddp/unfrozen": ("ddp", False, "freeze_unfreeze"),
    "fsdp2/unfrozen": ("fsdp2", False, "freeze_unfreeze"),
    "fsdp2+ac/unfrozen": ("fsdp2", True, "freeze_unfreeze"),
}
STATES = ("parameters", "gradients", "optimizer")
PROCESSES = 2
CLASSES = 2


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks fsdp-memory", description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="timm:vit_base_patch16_224")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=2, help="per rank")
    parser.add_argument("--steps", type=int, default=3,
                        help="optimizer steps per epoch (2 epochs); the last is measured, the median of epoch 1's "
                             "others is the step time (so 3 or more for a time)")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--out", default="results/fsdp2-memory.json")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per launch")
    parser.add_argument("--quick", action="store_true",
                        help="timm:test_vit at 32 px, batch 2, 2 steps, every run in one launch (seconds)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # a rank: the runs to do, comma-separated
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.backbone, args.image_size, args.batch_size, args.steps = "timm:test_vit", 32, 2, 2
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the measured step follows one untracked step of its epoch)")
    return args


# ------------------------------------------------------------------------------ on every rank


def local_bytes(tensor) -> int:
    """Bytes this rank holds of ``tensor``: a DTensor's local shard, else the tensor."""
    from torch.distributed.tensor import DTensor

    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.numel() * local.element_size()


def held_bytes(task, optimizer) -> dict[str, int]:
    """Parameters, trainable parameters, gradients and optimizer state this rank holds now."""
    parameters = list(task.parameters())
    return {"parameters": sum(local_bytes(p) for p in parameters),
            "trainable": sum(local_bytes(p) for p in parameters if p.requires_grad),
            "gradients": sum(local_bytes(p.grad) for p in parameters if p.grad is not None),
            "optimizer": sum(local_bytes(v) for state in optimizer.state.values() for v in state.values()
                             if hasattr(v, "element_size"))}


def memory_status() -> dict[str, int]:
    """This process's resident set now and its peak (VmRSS, VmHWM), bytes."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {"rss": int(fields["VmRSS"].split()[0]) * 1024, "rss_peak": int(fields["VmHWM"].split()[0]) * 1024}


def release_memory() -> None:
    """Between runs of one launch: memory back to the OS and the peak resident set reset (Linux)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def activation_tracker():
    """torch's ``MemTracker`` that also keeps the peak, outside the optimizer step, of the bytes it files as
    activations (made in forward), temporaries (made in backward: activation gradients, unreduced gradients,
    collective buffers) and other: what a forward and backward hold beyond the model's states."""
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    class ActivationPeak(MemTracker):
        activation_peak = 0

        def _update_peak_stats(self, peak_state) -> None:
            super()._update_peak_stats(peak_state)
            if not self._in_opt:
                for snapshot in self._curr_mem_snap.values():
                    held = sum(snapshot.get(kind, 0) for kind in (_MemRefType.ACT, _MemRefType.TEMP, _MemRefType.OTH))
                    self.activation_peak = max(self.activation_peak, held)

    return ActivationPeak()


def make_probe(measured_step: int):
    from dist_finetune.callbacks import Callback

    class StepProbe(Callback):
        """Holdings at every optimizer step (gradients just before it, optimizer state just after), step
        times, and torch's tensor memory tracker over the measured step (``measured_step``)."""

        def __init__(self):
            self.steps: list[dict] = []
            self.tracker = None
            self.peak: dict[str, int] = {}

        def on_fit_start(self, trainer, run) -> None:
            optimizer = getattr(run.optimizer, "optimizer", run.optimizer)  # inside accelerate's wrapper
            optimizer.register_step_pre_hook(lambda *_: self.steps.append(held_bytes(run.task, optimizer)))
            optimizer.register_step_post_hook(
                lambda *_: self.steps[-1].update(optimizer=held_bytes(run.task, optimizer)["optimizer"]))

        def on_step_end(self, trainer, run) -> None:
            self.steps[-1].update(epoch=run.position.epoch, end=time.perf_counter())
            if run.position.global_step == measured_step - 1:
                self.tracker = self._tracker(run)
                self.tracker.__enter__()
            elif self.tracker is not None and run.position.global_step == measured_step:
                self.tracker.__exit__(None, None, None)
                peak = next(iter(self.tracker.get_tracker_snapshot("peak").values()))
                self.peak = {str(getattr(kind, "value", kind)): int(size) for kind, size in peak.items()}
                self.peak["activations"] = self.tracker.activation_peak
                self.tracker = None

        @staticmethod
        def _tracker(run):
            tracker = activation_tracker()
            tracker.track_external(run.model, getattr(run.optimizer, "optimizer", run.optimizer))
            return tracker

    return StepProbe()


def train_once(name: str, args: argparse.Namespace) -> dict:
    """One run of ``RUNS[name]`` through ``Trainer.finetune``; what this rank held and how long its steps took."""
    from dist_finetune import ImageClassificationData, ImageClassifier, Trainer, seed_everything
    from dist_finetune.finetuning import FreezeUnfreeze, NoFreeze

    sharding, recompute, strategy = RUNS[name]
    data = ImageClassificationData.from_folders(str(Path(args.data) / "train"), str(Path(args.data) / "val"),
                                                image_size=args.image_size, batch_size=args.batch_size,
                                                num_workers=0, augment=False)
    seed_everything(0)
    task = ImageClassifier(data.num_classes, backbone=args.backbone, pretrained=False)
    probe = make_probe(measured_step=2 * args.steps)
    trainer = Trainer(max_epochs=2, lr=1e-4, seed=0, progress_bar=False, output_dir=None, channels_last=False,
                      load_best_model_at_end=False, cache_frozen_features=False, sharding=sharding,
                      activation_checkpointing=recompute, callbacks=[probe])
    trainer.finetune(task, data, strategy=NoFreeze() if strategy == "no_freeze" else FreezeUnfreeze(unfreeze_epoch=1))
    if len(probe.steps) != 2 * args.steps:
        raise RuntimeError(f"{len(probe.steps)} optimizer steps instead of 2 x {args.steps}: the measured step must "
                           "be the last one of epoch 1 (train images = ranks x batch size x steps)")
    last_epoch = [s for s in probe.steps if s["epoch"] == 1]
    times = [after["end"] - before["end"] for before, after in zip(last_epoch[:-2], last_epoch[1:-1])]
    return {"measured": probe.steps[-1], "before_unfreeze": [s for s in probe.steps if s["epoch"] == 0][-1],
            "peak_live": probe.peak, "step_time_s": statistics.median(times) if times else None,
            "total_parameter_elements": sum(p.numel() for p in task.parameters()),
            "local_parameter_elements": sum(local_bytes(p) // p.element_size() for p in task.parameters()),
            **memory_status()}


def worker(args: argparse.Namespace) -> int:
    import torch

    from dist_finetune.distributed import shutdown

    rank = int(os.environ.get("RANK", "0"))
    for name in args.worker.split(","):
        release_memory()
        result = train_once(name, args)
        result["torch_threads"] = torch.get_num_threads()
        path = Path(args.out) / f"{name.replace('/', '__')}.rank{rank}.json"
        path.write_text(json.dumps(result))
    shutdown()
    return 0


# ------------------------------------------------------------------------------ the launcher


def write_images(root: Path, count: int, size: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for index in range(count):
        folder = root / f"class{index % CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{index}.png")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(runs: list[str], args: argparse.Namespace, data: Path, out: Path) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(PROCESSES),
               "--master_port", str(free_port()), "-m", "benchmarks.fsdp_memory", "--worker", ",".join(runs),
               "--data", str(data), "--out", str(out), "--backbone", args.backbone,
               "--image-size", str(args.image_size), "--batch-size", str(args.batch_size), "--steps", str(args.steps)]
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(REPOSITORY), env.get("PYTHONPATH")])),
               OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(runs)} failed (exit {result.returncode}):\n{result.stderr[-6000:]}")


def summarize(ranks: list[dict]) -> dict:
    """Per-rank figures of one run: the largest over the ranks (what a device must hold)."""
    row = {kind: max(r["measured"][kind] for r in ranks) for kind in (*STATES, "trainable")}
    row["states"] = max(sum(r["measured"][kind] for kind in STATES) for r in ranks)
    row["activations"] = max(r["peak_live"]["activations"] for r in ranks)
    row["peak_live"] = max(r["peak_live"]["Total"] for r in ranks)
    row["total"] = max(sum(r["measured"][kind] for kind in STATES) + r["peak_live"]["activations"] for r in ranks)
    row["step_time_s"] = max((r["step_time_s"] for r in ranks if r["step_time_s"] is not None), default=None)
    row["rss_peak"] = max(r["rss_peak"] for r in ranks)
    return row


def table(rows: dict[str, dict]) -> str:
    header = (f"{'per rank, MB':<19}{'params':>7}{'grads':>7}{'optim':>7}{'states':>7}{'x DDP':>6}{'activ':>7}"
              f"{'total':>7}{'x DDP':>6}{'live pk':>8}{'x DDP':>6}{'step s':>7}{'RSS pk*':>8}")
    lines = [header]
    for name, row in rows.items():
        ddp = rows.get("ddp/" + name.split("/")[1])
        ratios = [f"{row[k] / ddp[k]:.2f}" if ddp else "-" for k in ("states", "total", "peak_live")]
        step = f"{row['step_time_s']:.2f}" if row["step_time_s"] is not None else "-"
        lines.append(f"{name:<19}" + "".join(f"{row[k] / 1e6:>7.1f}" for k in (*STATES, "states"))
                     + f"{ratios[0]:>6}{row['activations'] / 1e6:>7.1f}{row['total'] / 1e6:>7.1f}{ratios[1]:>6}"
                     + f"{row['peak_live'] / 1e6:>8.1f}{ratios[2]:>6}{step:>7}{row['rss_peak'] / 1e6:>8.0f}")
    lines.append("states = params + grads + optim; total = states + activ (peak, forward/backward); live pk = the "
                 "tracker's peak of all live tensor bytes in the step; * RSS: secondary, glibc keeps freed buffers")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.worker:
        return worker(args)
    import torch

    with tempfile.TemporaryDirectory(prefix="fsdp_memory_") as scratch:
        data, out = Path(scratch) / "images", Path(scratch) / "ranks"
        out.mkdir()
        write_images(data / "train", PROCESSES * args.batch_size * args.steps, args.image_size, seed=0)
        write_images(data / "val", PROCESSES * CLASSES, args.image_size, seed=1)
        started = time.perf_counter()
        for group in [args.runs] if args.quick else [[name] for name in args.runs]:
            launch(group, args, data, out)
        results = {name: [json.loads((out / f"{name.replace('/', '__')}.rank{r}.json").read_text())
                          for r in range(PROCESSES)] for name in args.runs}
    rows = {name: summarize(ranks) for name, ranks in results.items()}
    print(table(rows))
    report = {"command": "python -m benchmarks fsdp-memory " + " ".join(sys.argv[1:] if argv is None else argv),
              "torch": torch.__version__,
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
              "processes": PROCESSES, "backbone": args.backbone, "image_size": args.image_size,
              "batch_size_per_rank": args.batch_size, "steps_per_epoch": args.steps, "optimizer": "adamw, fp32",
              "seconds": round(time.perf_counter() - started, 1), "rows": rows, "ranks": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
