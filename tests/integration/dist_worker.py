"""Launched as N processes by test_distributed_ranks.py; every rank writes what it holds, for the test to compare.

    python dist_worker.py SCENARIO DATA_ROOT OUT_DIR [BATCH_SIZE]

Scenarios: strategies (freeze_unfreeze with a weight average, unfreeze_milestones, the guide's custom strategy,
lora, in turn; then early stopping; then the balanced sampler with one rank that alone would stop early; then a
short lr sweep),
equivalence (one deterministic run), mismatch (at a transition rank 1 alone alters a weight, adds its
groups in another layout, or gives a group another lr; each rank writes the error it got), no_resync
(a plain Accelerate loop that unfreezes after ``prepare`` without rebuilding DDP: the drift the
trainer prevents), compiled (torch.compile, aot_eager backend, augmentation on so the compiled
forward runs before and after the DDP rebuild; then the same run uncompiled, for comparison).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import tiny_resnet  # noqa: F401  (registers the test backbone)
from exit_worker import gloo_threads
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from dist_finetune import ImageClassificationData, ImageClassifier, Trainer, seed_everything
from dist_finetune.callbacks import Callback
from dist_finetune.distributed import make_accelerator, shutdown
from dist_finetune.errors import RankMismatchError
from dist_finetune.finetuning import BaseFinetuning, FreezeUnfreeze, UnfreezeMilestones
from dist_finetune.lora import LoRA
from dist_finetune.lr_finder import LRSweep
from test_finetuning import FeatureExtractorFreezeUnfreeze as GuideStrategy  # the Flash guide's example

BACKBONE = "tiny_resnet"


class PerturbRankOne(FreezeUnfreeze):
    """Unfreezes at epoch 1 and, on rank 1 only, nudges one head weight: the check must catch it."""

    def finetune_function(self, model, epoch, optimizer):
        super().finetune_function(model, epoch, optimizer)
        if epoch == self.unfreeze_epoch and torch.distributed.get_rank() == 1:
            with torch.no_grad():
                model.head.layers[-1].weight[0, 0] += 1e-3


class LayoutOnRankOne(FreezeUnfreeze):
    """At the unfreeze the backbone joins as two param groups, the last layer and the rest; rank 1 alone
    puts the last two layers in the second group: the same parameters, group count and lrs, other members."""

    def finetune_function(self, model, epoch, optimizer):
        if epoch == self.unfreeze_epoch:
            layers = model.backbone_layers()
            split = -2 if torch.distributed.get_rank() == 1 else -1
            self.unfreeze_and_add_param_group(layers[:split], optimizer, train_bn=self.train_bn)
            self.unfreeze_and_add_param_group(layers[split:], optimizer, train_bn=self.train_bn)


class LrOnRankOne(FreezeUnfreeze):
    """At the unfreeze rank 1 alone gives the backbone's group another lr."""

    def finetune_function(self, model, epoch, optimizer):
        if epoch != self.unfreeze_epoch or torch.distributed.get_rank() != 1:
            return super().finetune_function(model, epoch, optimizer)
        self.unfreeze_and_add_param_group(model.backbone, optimizer, lr=5e-4, train_bn=self.train_bn)


class Snapshots(Callback):
    """Each rank saves its own parameters at every epoch start (after the strategy's transition,
    before the trainer rebuilds DDP, whose broadcast from rank 0 would hide a drift), its locally
    computed validation metrics, and the lrs of every group."""

    def __init__(self, out: Path):
        self.out = out
        self.local: list[dict] = []
        self.graphs_at_epoch_start: list[int] = []  # torch.compile graphs compiled so far

    def on_epoch_start(self, trainer, run) -> None:
        rank = run.accelerator.process_index
        self.graphs_at_epoch_start.append(torch._dynamo.utils.counters["aot_autograd"]["ok"])
        params = {n: p.detach().cpu().contiguous() for n, p in run.task.named_parameters()}
        save_file(params, self.out / f"rank{rank}_epoch{run.position.epoch}.safetensors")

    def on_validation_end(self, trainer, run, record) -> None:
        """What this rank's own model scores on the whole val set, evaluated here alone (no sharding,
        no gathering): compared across ranks and with the gathered metrics by the test."""
        task, hits, losses, count = run.task.eval(), 0, 0.0, 0
        with torch.no_grad():
            for images, labels in torch.utils.data.DataLoader(run.data.val_dataset(), batch_size=5):
                logits = task(images).float()
                hits += int((logits.argmax(1) == labels).sum())
                losses += float(F.cross_entropy(logits, labels, reduction="sum"))
                count += len(labels)
        self.local.append({"epoch": record["epoch"], "hits": hits, "loss_sum": losses, "count": count,
                           "lr": record["lr"]})


def train(strategy: BaseFinetuning, data_root: Path, out: Path, batch_size: int, epochs: int = 3, augment=False,
          **settings):
    out.mkdir(parents=True, exist_ok=True)
    data = ImageClassificationData.from_folders(str(data_root / "train"), str(data_root / "val"), image_size=32,
                                                batch_size=batch_size, num_workers=0, augment=augment)
    seed_everything(0)
    task = ImageClassifier(data.num_classes, backbone=BACKBONE, pretrained=False)
    snapshots = Snapshots(out)
    # the last epoch's weights stay in the task (rank_final files); model.safetensors is the best epoch's
    trainer = Trainer(max_epochs=epochs, lr=1e-2, seed=0, progress_bar=False, output_dir=str(out),
                      load_best_model_at_end=False, callbacks=[snapshots], **settings)
    metrics = trainer.finetune(task, data, strategy=strategy)
    rank = trainer.accelerator.process_index
    state = {n: t.detach().cpu().contiguous() for n, t in task.state_dict().items()}
    save_file(state, out / f"rank{rank}_final.safetensors")
    if trainer.run.ema is not None:
        save_file({n: t.cpu().contiguous() for n, t in trainer.run.ema.weights.items()},
                  out / f"rank{rank}_ema.safetensors")
    report = {"rank": rank, "world_size": trainer.accelerator.num_processes, "metrics": metrics,
              "local": snapshots.local, "device": str(trainer.accelerator.device),
              "graphs_at_epoch_start": snapshots.graphs_at_epoch_start,
              "compiled_graphs": torch._dynamo.utils.counters["aot_autograd"]["ok"]}
    (out / f"rank{rank}_report.json").write_text(json.dumps(report))
    return trainer


def train_balanced_with_a_rank_that_would_stop(data_root: Path, out: Path, batch_size: int) -> None:
    """The balanced sampler under 2 ranks, and early stopping decided together: lr ~0 so nothing improves
    after epoch 0; rank 1 alone has patience 1 (it would stop after epoch 1), rank 0 patience 5. Each rank
    writes the train keys it loaded per epoch, the epochs it ran and why it stopped."""
    from dist_finetune.data import ImageListDataset

    out.mkdir(parents=True, exist_ok=True)
    data = ImageClassificationData.from_folders(str(data_root / "train"), str(data_root / "val"), image_size=32,
                                                batch_size=batch_size, num_workers=0, balanced_sampler=True)
    loaded: dict[int, list[int]] = {}
    epoch = [0]

    class EpochMarker(Callback):
        def on_epoch_start(self, trainer, run) -> None:
            epoch[0] = run.position.epoch

    original = ImageListDataset.__getitem__

    def recording(self, key):
        if self.random_transform:  # the train set (augmentation on); val items are not sampled
            loaded.setdefault(epoch[0], []).append(key)
        return original(self, key)

    ImageListDataset.__getitem__ = recording
    try:
        rank = torch.distributed.get_rank()
        seed_everything(0)
        task = ImageClassifier(data.num_classes, backbone=BACKBONE, pretrained=False)
        trainer = Trainer(max_epochs=4, lr=1e-12, seed=0, progress_bar=False, output_dir=str(out),
                          early_stopping_patience=1 if rank == 1 else 5, callbacks=[EpochMarker()])
        metrics = trainer.finetune(task, data, strategy="no_freeze")
    finally:
        ImageListDataset.__getitem__ = original
    report = {"epochs": [m["epoch"] for m in metrics], "stop_reason": trainer.run.stop_reason, "keys": loaded,
              "train_labels": data.train_labels}
    (out / f"rank{rank}_report.json").write_text(json.dumps(report))


def find_lr(data_root: Path, out: Path, batch_size: int) -> None:
    """A short lr sweep (``Trainer.lr_find``): each rank writes the curve it got and its task's weights after."""
    out.mkdir(parents=True, exist_ok=True)
    data = ImageClassificationData.from_folders(str(data_root / "train"), str(data_root / "val"), image_size=32,
                                                batch_size=batch_size, num_workers=0, augment=False)
    seed_everything(0)
    task = ImageClassifier(data.num_classes, backbone=BACKBONE, pretrained=False)
    trainer = Trainer(seed=0, progress_bar=False, output_dir=str(out))
    sweep = LRSweep(start_lr=1e-4, end_lr=1e-2, num_steps=5)  # no divergence: five points
    result = trainer.lr_find(task, data, FreezeUnfreeze(unfreeze_epoch=1), sweep=sweep)
    rank = trainer.accelerator.process_index
    (out / f"rank{rank}_curve.json").write_text(json.dumps(dataclasses.asdict(result)))
    save_file({n: t.detach().cpu().contiguous() for n, t in task.state_dict().items()},
              out / f"rank{rank}_after.safetensors")


def train_without_resync(data_root: Path, out: Path, batch_size: int) -> None:
    """The trap, in a plain Accelerate loop: DDP wrapped while the backbone was frozen, then unfrozen."""
    out.mkdir(parents=True, exist_ok=True)
    data = ImageClassificationData.from_folders(str(data_root / "train"), str(data_root / "val"), image_size=32,
                                                batch_size=batch_size, num_workers=0, augment=False)
    accelerator = make_accelerator("no")
    seed_everything(0)
    task = ImageClassifier(data.num_classes, backbone=BACKBONE, pretrained=False)
    task.backbone.requires_grad_(False)
    optimizer = torch.optim.AdamW(task.parameters(), lr=1e-2)  # frozen params get no grad until unfrozen
    loader = data.dataloader(data.train_dataset(), shuffle=True, drop_last=True, seed=0)
    model, optimizer, loader = accelerator.prepare(task, optimizer, loader)
    for epoch in range(3):
        if epoch == 1:
            task.backbone.requires_grad_(True)  # what an unfreeze after prepare does, with no DDP rebuild
        loader.set_epoch(epoch)
        for images, labels in loader:
            loss = F.cross_entropy(model(images), labels)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
    state = {n: t.detach().cpu().contiguous() for n, t in task.state_dict().items()}
    save_file(state, out / f"rank{accelerator.process_index}_final.safetensors")
    accelerator.end_training()


def train_fully_sharded(data_root: Path, out: Path, batch_size: int, resume: str | None) -> None:
    """no_freeze on a task whose parameters are DTensors (what FSDP2 makes of it): each backbone stage and
    then the whole task ``fully_shard``-ed on a CPU mesh of every rank, before finetune."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from dist_finetune.distributed import rank_fingerprint

    data = ImageClassificationData.from_folders(str(data_root / "train"), str(data_root / "val"), image_size=32,
                                                batch_size=batch_size, num_workers=0, augment=False)
    accelerator = make_accelerator("no")  # the process group the mesh is built on
    seed_everything(0)
    task = ImageClassifier(data.num_classes, backbone=BACKBONE, pretrained=False)
    mesh = init_device_mesh(accelerator.device.type, (torch.distributed.get_world_size(),))  # gloo here
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        fully_shard(getattr(task.backbone, stage), mesh=mesh)
    fully_shard(task, mesh=mesh)
    trainer = Trainer(max_epochs=2, lr=1e-2, seed=0, progress_bar=False, output_dir=str(out), channels_last=False,
                      load_best_model_at_end=False, deterministic=True)  # a resume is bit-exact on a GPU too
    trainer.finetune(task, data, strategy="no_freeze", resume=resume)
    rank = trainer.accelerator.process_index
    gathered = {n: t.full_tensor().contiguous() for n, t in task.state_dict().items() if isinstance(t, DTensor)}
    save_file(gathered, out / f"rank{rank}_gathered.safetensors")
    report = {"sharded": [n for n, p in task.named_parameters() if isinstance(p, DTensor)],
              "parameters": [n for n, _ in task.named_parameters()],
              "fingerprint": rank_fingerprint(task, trainer.run.optimizer)}
    (out / f"rank{rank}_report.json").write_text(json.dumps(report))


def sharded_state_round_trip(out: Path) -> None:
    """What the model files and checkpoints do with a task sharded over every rank (3 classes over 2 ranks
    shard unevenly): each rank writes what it gathered, reloaded and restored, for the test to compare."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from dist_finetune.distributed import rank_fingerprint
    from dist_finetune.sharding import full_state_dict, shard_optimizer_state
    from dist_finetune.training_state import join_optimizer_state, split_optimizer_state

    out.mkdir(parents=True, exist_ok=True)
    accelerator = make_accelerator("no")
    rank = accelerator.process_index
    seed_everything(0)
    task = ImageClassifier(3, backbone=BACKBONE, pretrained=False)
    whole = {n: t.clone() for n, t in task.state_dict().items()}
    fingerprints = {"plain": rank_fingerprint(task, torch.optim.SGD(task.parameters(), lr=1.0))["params"]}
    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    fully_shard(task.backbone.layer4, mesh=mesh)
    fully_shard(task, mesh=mesh)
    fingerprints["sharded"] = rank_fingerprint(task, torch.optim.SGD(task.parameters(), lr=1.0))["params"]
    head = task.head.layers[0].weight
    save_file(full_state_dict(task.state_dict()), out / f"rank{rank}_gathered.safetensors")
    optimizer = torch.optim.AdamW(task.parameters(), lr=1e-2)
    torch.manual_seed(rank)
    F.cross_entropy(task(torch.rand(2, 3, 32, 32)), torch.tensor([0, 2])).backward()
    optimizer.step()  # weights and moments now differ from ``whole``
    tensors, structure = split_optimizer_state(optimizer.state_dict())  # what a checkpoint holds
    restored = torch.optim.AdamW(task.parameters(), lr=1e-2)
    restored.load_state_dict(shard_optimizer_state(join_optimizer_state(tensors, structure), restored))
    index = [i for i, p in enumerate(task.parameters()) if p is head][0]
    local = {f"{name}.{key}": state[key].to_local().contiguous()
             for name, state in (("saved", optimizer.state[head]), ("restored", restored.state[head]))
             for key in ("exp_avg", "exp_avg_sq")}
    save_file({**local, "head_moment_in_checkpoint": tensors[f"{index}.exp_avg"]}, out / f"rank{rank}_moments.safetensors")
    task.load_weights(whole, "the weights before the step")
    save_file(full_state_dict(task.state_dict()), out / f"rank{rank}_reloaded.safetensors")
    save_file(whole, out / f"rank{rank}_whole.safetensors")
    report = {"fingerprints": fingerprints, "head_local_rows": head.to_local().shape[0]}
    (out / f"rank{rank}_report.json").write_text(json.dumps(report))


def main() -> None:
    """``SCENARIO[+SCENARIO...] DATA OUT [BATCH]``: several scenarios share one launch (and its start-up), each
    writing to ``OUT/<scenario>``; a scenario that ends the process group (``no_resync``) goes last."""
    scenarios, data_root, out = sys.argv[1].split("+"), Path(sys.argv[2]), Path(sys.argv[3])
    batch_size = int(sys.argv[4]) if len(sys.argv) > 4 else 4
    for scenario in scenarios:
        run_scenario(scenario, data_root, out / scenario if len(scenarios) > 1 else out, batch_size)


def run_scenario(scenario: str, data_root: Path, out: Path, batch_size: int) -> None:
    if scenario == "strategies":
        # the trainers stay referenced, as in a script that keeps its trainer: after shutdown no gloo
        # thread may be left (a finished run holds no DDP wrapper, and so not the process group)
        # the first trainer makes the process group: a rank left waiting by another (a decision only one rank
        # took) fails after 4 minutes instead of hanging until the test's own timeout
        trainers = [
            train(FreezeUnfreeze(unfreeze_epoch=1, train_bn=True), data_root, out / "freeze_unfreeze", batch_size,
                  process_group_timeout_s=240, ema_decay=0.5),  # with a weight average, in the rank checks too
            train(UnfreezeMilestones((1, 2), num_layers=2, train_bn=True), data_root, out / "unfreeze_milestones",
                  batch_size),
            train(GuideStrategy(unfreeze_epoch=1), data_root, out / "custom", batch_size),
            train(LoRA(rank=2, alpha=4.0, unfreeze_epoch=1), data_root, out / "lora", batch_size),
            # no val_acc can improve by more than 1: patience 1 stops every rank after epoch 1 of 3
            train("no_freeze", data_root, out / "early_stopping", batch_size, early_stopping_patience=1,
                  early_stopping_min_delta=1.0),
        ]
        train_balanced_with_a_rank_that_would_stop(data_root, out / "balanced_early_stop", batch_size)
        find_lr(data_root, out / "lr_find", batch_size)
        rank = trainers[0].accelerator.process_index
        shutdown()
        (out / f"rank{rank}_gloo_threads_after_shutdown.json").write_text(json.dumps(gloo_threads()))
    elif scenario == "equivalence":
        # contiguous layout: oneDNN's channels_last kernels depend on the batch size, and their other
        # summation order outgrows the 1e-4 bound over 9 Adam steps; this compares the data split
        train(FreezeUnfreeze(unfreeze_epoch=1, train_bn=False), data_root, out, batch_size, channels_last=False)
    elif scenario == "compiled":  # then the same run uncompiled, in the same pair of processes (one launch)
        train(FreezeUnfreeze(unfreeze_epoch=1, train_bn=False), data_root, out / "compiled", batch_size, augment=True,
              channels_last=False, compile=True, compile_backend="aot_eager")
        train(FreezeUnfreeze(unfreeze_epoch=1, train_bn=False), data_root, out / "eager", batch_size, augment=True,
              channels_last=False)
    elif scenario == "mismatch":  # each rank records what the rank check told it
        for name, strategy in (("perturb", PerturbRankOne), ("layout", LayoutOnRankOne), ("lr", LrOnRankOne)):
            try:
                train(strategy(unfreeze_epoch=1, train_bn=True), data_root, out / name, batch_size, epochs=2)
                outcome = "no error"
            except RankMismatchError as error:
                outcome = str(error)
            (out / name / f"rank{torch.distributed.get_rank()}_error.txt").write_text(outcome)
    elif scenario == "fully_sharded":
        train_fully_sharded(data_root, out / "uninterrupted", batch_size, resume=None)
        first_epoch = sorted((out / "uninterrupted" / "checkpoints").glob("step-*"))[0]
        train_fully_sharded(data_root, out / "resumed", batch_size, resume=str(first_epoch))
    elif scenario == "sharded_state":
        sharded_state_round_trip(out)
    elif scenario == "no_resync":
        train_without_resync(data_root, out, batch_size)
    else:
        raise SystemExit(f"unknown scenario {scenario}")


if __name__ == "__main__":
    main()
