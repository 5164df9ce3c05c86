"""Launched as N gloo processes by test_fsdp_ranks.py; every rank writes what it holds, for the test to compare.

    python fsdp_worker.py SCENARIO DATA_ROOT OUT_DIR [BATCH_SIZE]

Scenarios: strategies (under FSDP2: no_freeze, freeze, freeze_unfreeze, unfreeze_milestones, the guide's
custom strategy; under DDP: freeze_unfreeze and unfreeze_milestones, the same seeds; freeze_unfreeze with a
weight average both ways; FSDP2 freeze_unfreeze with activation checkpointing; then the FSDP2 freeze_unfreeze
run resumed from its epoch-1 checkpoint), resume_elsewhere (that checkpoint resumed by this launch's process
count, with the optimizer state it loaded written whole).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import tiny_resnet  # noqa: F401  (registers the test backbone)
import torch
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from dist_finetune import ImageClassificationData, ImageClassifier, Trainer, seed_everything
from dist_finetune.callbacks import Callback
from dist_finetune.distributed import shutdown
from dist_finetune.finetuning import Freeze, FreezeUnfreeze, NoFreeze, UnfreezeMilestones
from dist_finetune.sharding import full_state_dict, full_tensor
from test_finetuning import FeatureExtractorFreezeUnfreeze as GuideStrategy  # the Flash guide's example

EPOCHS = 3
EMA_DECAY = 0.5  # the freeze_unfreeze runs keep a weight average (sharded under FSDP2)


class Holdings(Callback):
    """At every epoch end: which parameters train, which got a gradient's optimizer state, what this rank
    holds of each (local elements), and the whole Adam moments (gathered: collective)."""

    def __init__(self, out: Path):
        self.out, self.epochs = out, []

    def on_epoch_end(self, trainer, run, record) -> None:
        names = {id(p): n for n, p in run.task.named_parameters()}
        optimizer = run.optimizer
        with_state = sorted(names[id(p)] for p in optimizer.state if optimizer.state[p])
        self.epochs.append({
            "trainable": sorted(n for n, p in run.task.named_parameters() if p.requires_grad),
            "frozen": sorted(n for n, p in run.task.named_parameters() if not p.requires_grad),
            "optimizer_state": with_state,
            "in_optimizer": sorted(names[id(p)] for g in optimizer.param_groups for p in g["params"]),
            "local_elements": sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel()
                                  for p in run.task.parameters()),
            "train_loss": record["train_loss"],
        })
        moments = {f"{names[id(p)]}.{key}": full_tensor(value).contiguous()
                   for p, state in optimizer.state.items() for key, value in state.items() if key == "exp_avg"}
        if run.accelerator.is_main_process:
            save_file(moments, self.out / f"moments_epoch{record['epoch']}.safetensors")


class LoadedMoments(Callback):
    """Right after a resume: the Adam moments this run holds, gathered whole (collective)."""

    def __init__(self, out: Path):
        self.out = out

    def on_fit_start(self, trainer, run) -> None:
        names = {id(p): n for n, p in run.task.named_parameters()}
        moments = {f"{names[id(p)]}.{key}": full_tensor(value).contiguous()
                   for p, state in run.optimizer.state.items() for key, value in state.items() if key == "exp_avg"}
        if run.accelerator.is_main_process:
            save_file(moments, self.out / "moments_loaded.safetensors")


def train(strategy, sharding: str, data_root: Path, out: Path, batch_size: int, resume: str | None = None,
          callback: Callback | None = None, checkpoints: bool = False, **settings) -> Trainer:
    """One 3-epoch run; with ``checkpoints`` (or ``resume``) into ``out`` as its output_dir (checkpoints, model
    files, reports), else writing only what this worker records."""
    out.mkdir(parents=True, exist_ok=True)
    data = ImageClassificationData.from_folders(str(data_root / "train"), str(data_root / "val"), image_size=32,
                                                batch_size=batch_size, num_workers=0, augment=False)
    seed_everything(0)
    task = ImageClassifier(data.num_classes, backbone="tiny_resnet", pretrained=False)
    holdings = Holdings(out)
    # the feature cache is off so that DDP's frozen epochs run the same forward as FSDP2's (which never caches)
    output_dir = str(out) if checkpoints or resume else None
    trainer = Trainer(max_epochs=EPOCHS, lr=1e-2, seed=0, progress_bar=False, output_dir=output_dir, keep_last=3,
                      load_best_model_at_end=False, channels_last=False, cache_frozen_features=False,
                      sharding=sharding, callbacks=[holdings, *([callback] if callback else [])], **settings)
    metrics = trainer.finetune(task, data, strategy=strategy, resume=resume)
    rank = trainer.accelerator.process_index
    state = full_state_dict(task.state_dict())  # collective under FSDP2
    save_file({n: t.cpu().contiguous() for n, t in state.items()}, out / f"rank{rank}_final.safetensors")
    if trainer.run.ema is not None:  # the weight average, gathered whole (collective)
        average = full_state_dict(trainer.run.ema.weights)
        save_file({n: t.cpu().contiguous() for n, t in average.items()}, out / f"rank{rank}_ema.safetensors")
    report = {"rank": rank, "world_size": trainer.accelerator.num_processes, "metrics": metrics,
              "sharded": sorted(n for n, p in task.named_parameters() if isinstance(p, DTensor)),
              "parameters": sorted(n for n, _ in task.named_parameters()),
              "total_elements": sum(t.numel() for n, t in state.items() if n in dict(task.named_parameters())),
              "epochs": holdings.epochs}
    (out / f"rank{rank}_report.json").write_text(json.dumps(report))
    return trainer


def strategies() -> dict:
    return {"no_freeze": NoFreeze(), "freeze": Freeze(),
            "freeze_unfreeze": FreezeUnfreeze(unfreeze_epoch=1, train_bn=True),
            "unfreeze_milestones": UnfreezeMilestones((1, 2), num_layers=2, train_bn=True),
            "custom": GuideStrategy(unfreeze_epoch=1)}


def main() -> None:
    scenario, data_root, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    batch_size = int(sys.argv[4]) if len(sys.argv) > 4 else 4
    if scenario == "strategies":
        for name, strategy in strategies().items():
            train(strategy, "fsdp2", data_root, out / "fsdp2" / name, batch_size, checkpoints=name == "freeze_unfreeze",
                  ema_decay=EMA_DECAY if name == "freeze_unfreeze" else None)
        for name in ("freeze_unfreeze", "unfreeze_milestones"):
            train(strategies()[name], "ddp", data_root, out / "ddp" / name, batch_size,
                  ema_decay=EMA_DECAY if name == "freeze_unfreeze" else None)
        train(strategies()["freeze_unfreeze"], "fsdp2", data_root, out / "fsdp2" / "recomputed", batch_size,
              activation_checkpointing=True)
        epoch_one = sorted((out / "fsdp2" / "freeze_unfreeze" / "checkpoints").glob("step-*"))[1]
        train(strategies()["freeze_unfreeze"], "fsdp2", data_root, out / "fsdp2" / "resumed", batch_size,
              resume=str(epoch_one), ema_decay=EMA_DECAY)
    elif scenario == "resume_elsewhere":  # DATA_ROOT/../fsdp2/freeze_unfreeze holds the 2-rank run
        epoch_one = sorted((out.parent / "fsdp2" / "freeze_unfreeze" / "checkpoints").glob("step-*"))[1]
        train(strategies()["freeze_unfreeze"], "fsdp2", data_root, out, batch_size, resume=str(epoch_one),
              callback=LoadedMoments(out), ema_decay=EMA_DECAY)
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    shutdown()


if __name__ == "__main__":
    main()
