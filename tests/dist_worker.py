"""Launched as N processes by test_distributed.py; every rank writes what it holds, for the test to compare.

    python dist_worker.py SCENARIO DATA_ROOT OUT_DIR [BATCH_SIZE]

Scenarios: strategies (freeze_unfreeze, unfreeze_milestones, the guide's custom strategy, in turn),
equivalence (one deterministic run), perturb (rank 1 alters a weight at a transition), no_resync
(the DDP rebuild switched off, to show the drift it prevents), compiled (equivalence under
torch.compile, aot_eager backend).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from dist_finetune import ImageClassificationData, ImageClassifier, Trainer, seed_everything
from dist_finetune.distributed import DDPResync
from dist_finetune.finetuning import BaseFinetuning, FreezeUnfreeze, UnfreezeMilestones
from test_strategies import FeatureExtractorFreezeUnfreeze as GuideStrategy  # the Flash guide's example


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


class PerturbRankOne(FreezeUnfreeze):
    """Unfreezes at epoch 1 and, on rank 1 only, nudges one head weight: the check must catch it."""

    def finetune_function(self, model, epoch, optimizer):
        super().finetune_function(model, epoch, optimizer)
        if epoch == self.unfreeze_epoch and rank() == 1:
            with torch.no_grad():
                model.head.layers[-1].weight[0, 0] += 1e-3


def snapshotting(strategy: BaseFinetuning, out: Path) -> BaseFinetuning:
    """Save this rank's parameters at the start of every epoch (before any transition)."""
    original = strategy.call_finetune_function

    def call(model, epoch, optimizer):
        params = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters()}
        save_file(params, out / f"rank{rank()}_epoch{epoch}.safetensors")
        original(model, epoch, optimizer)

    strategy.call_finetune_function = call
    return strategy


def train(strategy: BaseFinetuning, data_root: Path, out: Path, batch_size: int, epochs: int = 3, **settings):
    out.mkdir(parents=True, exist_ok=True)
    data = ImageClassificationData.from_folders(str(data_root / "train"), str(data_root / "val"), image_size=32,
                                                batch_size=batch_size, num_workers=0, augment=False)
    seed_everything(0)
    task = ImageClassifier(data.num_classes, backbone="resnet18", pretrained=False)
    trainer = Trainer(max_epochs=epochs, lr=1e-2, seed=0, progress_bar=False, output_dir=str(out), **settings)
    metrics = trainer.finetune(task, data, strategy=snapshotting(strategy, out))
    state = {n: t.detach().cpu().contiguous() for n, t in task.state_dict().items()}
    save_file(state, out / f"rank{rank()}_final.safetensors")
    report = {"rank": rank(), "world_size": trainer.accelerator.num_processes, "metrics": metrics,
              "device": str(trainer.accelerator.device),
              "compiled_graphs": torch._dynamo.utils.counters["aot_autograd"]["ok"]}
    (out / f"rank{rank()}_report.json").write_text(json.dumps(report))


def main() -> None:
    scenario, data_root, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    batch_size = int(sys.argv[4]) if len(sys.argv) > 4 else 4
    if scenario == "strategies":
        train(FreezeUnfreeze(unfreeze_epoch=1), data_root, out / "freeze_unfreeze", batch_size)
        train(UnfreezeMilestones((1, 2), num_layers=2), data_root, out / "unfreeze_milestones", batch_size)
        train(GuideStrategy(unfreeze_epoch=1), data_root, out / "custom", batch_size)
    elif scenario == "equivalence":
        # contiguous layout: oneDNN's channels_last kernels depend on the batch size, and their other
        # summation order outgrows the 1e-4 bound over 9 Adam steps; this compares the data split
        train(FreezeUnfreeze(unfreeze_epoch=1, train_bn=False), data_root, out, batch_size, channels_last=False)
    elif scenario == "compiled":
        train(FreezeUnfreeze(unfreeze_epoch=1, train_bn=False), data_root, out, batch_size, channels_last=False,
              compile=True, compile_backend="aot_eager")
    elif scenario == "perturb":
        train(PerturbRankOne(unfreeze_epoch=1), data_root, out, batch_size)
    elif scenario == "no_resync":
        DDPResync.__call__ = lambda self: self.wrapped  # what a runner without the rebuild does
        train(FreezeUnfreeze(unfreeze_epoch=1), data_root, out, batch_size, check_rank_consistency=False)
    else:
        raise SystemExit(f"unknown scenario {scenario}")


if __name__ == "__main__":
    main()
