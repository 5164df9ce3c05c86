"""Two real processes (gloo on CPU): every rank holds the same model after every transition.

Each test launches tests/integration/dist_worker.py with ``accelerate launch`` (or torchrun) and compares the
files each rank wrote, never what rank 0 reports about the others.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port
from safetensors.torch import load_file

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("dist_worker.py")
SCAN_WORKER = Path(__file__).with_name("scan_worker.py")
EXIT_WORKER = Path(__file__).with_name("exit_worker.py")
ENV = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}  # the runner must pick gloo itself
ENV.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def launch(scenario: str, data: Path, out: Path, processes: int = 2, batch_size: int = 4, launcher: str = "accelerate",
           check: bool = True, worker: Path = WORKER) -> subprocess.CompletedProcess:
    port = str(free_port())
    if launcher == "torchrun":
        prefix = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                  "--master_port", port]
    elif processes == 1:
        prefix = [sys.executable]
    else:
        prefix = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
                  "--num_processes", str(processes), "--main_process_port", port, "--mixed_precision", "no",
                  "--dynamo_backend", "no"]
    command = [*prefix, str(worker), scenario, str(data), str(out), str(batch_size)]
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def rank_files(folder: Path, name: str) -> list[dict[str, torch.Tensor]]:
    return [load_file(folder / f"rank{r}_{name}.safetensors") for r in (0, 1)]


def assert_identical(first: dict, second: dict, where: str) -> None:
    assert first.keys() == second.keys()
    different = [n for n in first if not torch.equal(first[n], second[n])]
    assert not different, f"{where}: ranks differ in {different[:5]}"


@pytest.fixture(scope="module")
def strategies_run(image_folders, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("strategies")
    launch("strategies", image_folders, out)
    return out


@pytest.mark.parametrize("strategy", ["freeze_unfreeze", "unfreeze_milestones", "custom"])
def test_ranks_bit_identical_after_each_transition_and_at_the_end(strategies_run, strategy):
    folder = strategies_run / strategy
    for epoch in range(3):
        assert_identical(*rank_files(folder, f"epoch{epoch}"), f"{strategy} start of epoch {epoch}")
    assert_identical(*rank_files(folder, "final"), f"{strategy} end (parameters and BN buffers)")
    if strategy == "freeze_unfreeze":  # run with ema_decay: every rank averaged alike, and validated the average
        assert_identical(*rank_files(folder, "ema"), "the weight average at the end")
    start, end = rank_files(folder, "epoch1")[0], rank_files(folder, "final")[0]
    assert not torch.equal(start["backbone.layer4.1.conv2.weight"], end["backbone.layer4.1.conv2.weight"]), \
        "the unfrozen backbone must have trained"
    reports = [json.loads((folder / f"rank{r}_report.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in reports] == [2, 2]
    for epoch, (mine, theirs) in enumerate(zip(reports[0]["local"], reports[1]["local"])):
        # each rank scored its own model on all 12 val images by itself: the ranks agree, and the
        # sharded, gathered metrics every rank reports are exactly that (each image counted once)
        assert mine["count"] == theirs["count"] == 12
        assert (mine["hits"], mine["lr"]) == (theirs["hits"], theirs["lr"]), "every rank holds one model"
        assert mine["loss_sum"] == pytest.approx(theirs["loss_sum"], rel=1e-6)
        for report in reports:
            record = report["metrics"][epoch]
            assert record["val_images"] == 12
            assert record["val_acc"] == pytest.approx(mine["hits"] / 12)
            assert record["val_loss"] == pytest.approx(mine["loss_sum"] / 12, rel=1e-5)


def test_lora_ranks_bit_identical_and_only_adapters_and_head_train(strategies_run):
    """LoRA's adapters join at epoch 1 (a transition: DDP rebuilt, ranks checked): every rank holds the same
    parameters at each epoch start and the same merged model at the end; epoch 1 trained adapters and head only."""
    folder = strategies_run / "lora"
    for epoch in range(3):
        assert_identical(*rank_files(folder, f"epoch{epoch}"), f"lora start of epoch {epoch}")
    assert_identical(*rank_files(folder, "final"), "lora end (merged parameters and BN buffers)")
    before, after = rank_files(folder, "epoch1")[0], rank_files(folder, "epoch2")[0]
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    assert {name for name in moved if "lora_B" in name} and all("lora_" in n or n.startswith("head.") for n in moved)
    assert "backbone.layer4.1.conv2.weight" in rank_files(folder, "final")[0], "merged: the plain model's names"


def test_early_stopping_stops_every_rank_after_the_same_epoch(strategies_run):
    """The decision is every rank's (one all-reduce): a rank that stopped alone would leave the other
    waiting in its next step's all-reduce, and the pair would never finish."""
    reports = [json.loads((strategies_run / "early_stopping" / f"rank{r}_report.json").read_text()) for r in (0, 1)]
    assert [[m["epoch"] for m in report["metrics"]] for report in reports] == [[0, 1], [0, 1]]


def test_a_finished_run_holds_no_process_group_after_shutdown(strategies_run):
    """The worker keeps its three trainers and then calls shutdown: their DDP wrappers (and with them
    the gloo group's threads) must be gone, not left to the interpreter's finalisation."""
    for rank in (0, 1):
        assert json.loads((strategies_run / f"rank{rank}_gloo_threads_after_shutdown.json").read_text()) == []


def test_early_stopping_is_decided_by_all_ranks_together(strategies_run):
    """Rank 1 alone runs out of patience after epoch 1 (rank 0 would go on): both stop there, saying why."""
    reports = [json.loads((strategies_run / "balanced_early_stop" / f"rank{r}_report.json").read_text())
               for r in (0, 1)]
    assert [r["epochs"] for r in reports] == [[0, 1], [0, 1]]
    assert all(r["stop_reason"].startswith("early stopping after epoch 1") for r in reports)


def test_the_balanced_sampler_splits_one_draw_over_the_ranks(strategies_run):
    """Every rank draws the same sequence of 24 (seed, epoch) and trains its own batches of it: the keys
    the two ranks loaded are disjoint and together are that epoch's whole draw, each once."""
    from dist_finetune.data import BalancedSampler

    reports = [json.loads((strategies_run / "balanced_early_stop" / f"rank{r}_report.json").read_text())
               for r in (0, 1)]
    labels = reports[0]["train_labels"]
    assert len(labels) == 24 and reports[1]["train_labels"] == labels
    for epoch in ("0", "1"):
        mine, theirs = reports[0]["keys"][epoch], reports[1]["keys"][epoch]
        assert len(mine) == len(theirs) == 12 and not set(mine) & set(theirs)
        sampler = BalancedSampler(labels, seed=0)
        sampler.set_epoch(int(epoch))
        assert sorted(mine + theirs) == sorted(sampler)


def test_the_lr_sweep_gives_every_rank_one_curve_and_leaves_each_model_as_it_was(strategies_run):
    """Each step's loss is the mean over the ranks, so both stop together and hold the same curve, which the
    main process wrote; the sweep trained copies, so every rank's task still has the weights all ranks
    built from seed 0."""
    folder = strategies_run / "lr_find"
    curves = [json.loads((folder / f"rank{r}_curve.json").read_text()) for r in (0, 1)]
    assert curves[0] == curves[1] and len(curves[0]["losses"]) == 5
    assert json.loads((folder / "lr_find.json").read_text()) == curves[0]
    assert_identical(*rank_files(folder, "after"), "the tasks after the sweep")
    from dist_finetune import ImageClassifier, seed_everything

    seed_everything(0)
    built = ImageClassifier(3, backbone="tiny_resnet", pretrained=False).state_dict()
    assert_identical(rank_files(folder, "after")[0], {n: t.contiguous() for n, t in built.items()}, "before and after")


def test_checkpoint_and_metrics_written_once_by_the_main_process(strategies_run, image_folders):
    from dist_finetune import ImageClassificationData, ImageClassifier, Trainer

    folder = strategies_run / "freeze_unfreeze"
    models = sorted(p.name for p in folder.glob("*.safetensors") if not p.name.startswith("rank"))
    assert models == ["last.safetensors", "model.safetensors"] and not list(folder.glob(".*.tmp"))
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [0, 1, 2]
    best = [m for m in metrics if m.get("best")][-1]
    # the same weights give the same accuracy in one process: no image counted twice or dropped; the run has a
    # weight average (ema_decay): model.safetensors holds it when it was the better, as the record says
    data = ImageClassificationData.from_folders(str(image_folders / "train"), str(image_folders / "val"),
                                                image_size=32, batch_size=4, num_workers=0)
    kept = "_ema" if best["best_weights"] == "ema" else ""
    for name, record, suffix in (("model.safetensors", best, kept), ("last.safetensors", metrics[-1], "")):
        single = Trainer(progress_bar=False).validate(ImageClassifier.load_from_checkpoint(folder / name), data)
        assert single["val_acc"] == pytest.approx(record["val_acc" + suffix]), name
        assert single["val_loss"] == pytest.approx(record["val_loss" + suffix], rel=1e-5), name
    final = ImageClassifier.load_from_checkpoint(folder / "last.safetensors")
    final.load_weights({**final.state_dict(), **load_file(folder / "rank0_ema.safetensors")}, "the average")
    single = Trainer(progress_bar=False).validate(final, data)
    assert single["val_loss"] == pytest.approx(metrics[-1]["val_loss_ema"], rel=1e-5), "the average validated"


@pytest.fixture(scope="module")
def torchrun_pair(image_folders, tmp_path_factory) -> Path:
    """The "equivalence" run, 2 processes x batch 4, started by torchrun without ACCELERATE_USE_CPU."""
    out = tmp_path_factory.mktemp("torchrun_pair")
    launch("equivalence", image_folders, out, launcher="torchrun")
    return out


def test_two_processes_equal_one_process_with_twice_the_batch(image_folders, torchrun_pair, tmp_path):
    """2 x B=4 and 1 x B=8 see the same 8 samples per step in the same order (seeded sampler, no
    augmentation, BatchNorm frozen so batch statistics do not depend on the per-rank batch). They
    differ only in float summation order (per-rank means averaged by DDP vs one mean of 8): ~1e-7
    relative per step, grown by Adam's normalisation over 9 steps; we allow 1e-4 absolute."""
    launch("equivalence", image_folders, tmp_path / "one", processes=1, batch_size=8)
    folders = {"two": torchrun_pair, "one": tmp_path / "one"}
    worlds = [json.loads((folders[d] / "rank0_report.json").read_text())["world_size"] for d in ("two", "one")]
    assert worlds == [2, 1]
    two, one = load_file(folders["two"] / "rank0_final.safetensors"), load_file(folders["one"] / "rank0_final.safetensors")
    worst = max((two[n].double() - one[n].double()).abs().max().item() for n in one if one[n].is_floating_point())
    assert worst < 1e-4, f"max difference {worst}"
    moved = load_file(tmp_path / "one" / "rank0_epoch0.safetensors")
    assert (moved["head.layers.0.weight"] - one["head.layers.0.weight"]).abs().max() > 1e-2, "training happened"
    acc = [json.loads((folders[d] / "rank0_report.json").read_text())["metrics"][-1]["val_acc"] for d in ("two", "one")]
    assert acc[0] == acc[1]


def test_compiled_two_processes_stay_identical_and_match_eager(image_folders, tmp_path):
    """torch.compile wraps the DDP module and is rebuilt with it at the unfreeze: the ranks stay
    bit-identical and the result matches the uncompiled run up to float reordering. With
    augmentation on, the frozen epoch runs the compiled forward too (no feature cache)."""
    launch("compiled", image_folders, tmp_path)  # writes compiled/ and then eager/
    for epoch in range(3):
        assert_identical(*rank_files(tmp_path / "compiled", f"epoch{epoch}"), f"compiled start of epoch {epoch}")
    compiled, eager = rank_files(tmp_path / "compiled", "final"), rank_files(tmp_path / "eager", "final")
    assert_identical(*compiled, "compiled end")
    worst = max((compiled[0][n].double() - eager[0][n].double()).abs().max().item()
                for n in eager[0] if eager[0][n].is_floating_point())
    assert worst < 1e-4, f"compiled vs eager max difference {worst}"
    reports = [json.loads((tmp_path / "compiled" / f"rank{r}_report.json").read_text()) for r in (0, 1)]
    for report in reports:
        start = report["graphs_at_epoch_start"] + [report["compiled_graphs"]]
        assert start[1] > start[0], "the first wrapper was compiled and ran in the frozen epoch"
        assert start[2] > start[1], "the DDP wrapper rebuilt at the unfreeze was compiled again"


@pytest.fixture(scope="module")
def shared_launch(image_folders, tmp_path_factory) -> Path:
    """Three scenarios in one launch of two processes: the rank-mismatch runs, the sharded state round trip and
    (last: it ends the process group) the plain loop without the DDP rebuild; each in its own folder."""
    out = tmp_path_factory.mktemp("shared_launch")
    launch("mismatch+sharded_state+no_resync", image_folders, out)
    return out


@pytest.fixture(scope="module")
def mismatch_run(shared_launch) -> Path:
    return shared_launch / "mismatch"


@pytest.mark.parametrize("case, difference", [
    ("perturb", r"first differing parameter 'head\.layers\.0\.weight'\."),
    # the backbone's 20 conv weights join (its BatchNorms train from the start: train_bn=True): as
    # 15 + 5 on rank 0 and 10 + 10 on rank 1 ("layout"), in one group ("lr")
    ("layout", r"optimizer param group 1 differs \(15 params lr=(\S+) vs 10 lr=(\S+)\)"),
    ("lr", r"optimizer param group 1 differs \(20 params lr=(\S+) vs 20 lr=(\S+)\)"),
], ids=["perturb", "layout", "lr"])
def test_consistency_check_catches_a_rank_that_drifts_on_every_rank(mismatch_run, case, difference):
    """Rank 1 alone nudges a weight, splits the new groups elsewhere, or gives the new group another lr at
    the unfreeze: the check after the transition raises on both ranks, naming what differs."""
    errors = [(mismatch_run / case / f"rank{rank}_error.txt").read_text() for rank in (0, 1)]
    for error in errors:
        found = re.match("rank consistency check failed after the strategy transition at epoch 1: rank 1 differs "
                         f"from rank 0 - {difference}", error)
        assert found, error
        if case != "perturb":  # the layout differs in members only; the lr case in the lr only
            assert (found[1] == found[2]) == (case == "layout")
    assert errors[0] == errors[1]
    assert not list((mismatch_run / case).glob("rank*_final.safetensors")), "training stopped at the check"


def test_without_the_ddp_rebuild_ranks_drift(shared_launch):
    """The trap the runner handles: DDP built while the backbone was frozen never averages its grads."""
    first, second = rank_files(shared_launch / "no_resync", "final")
    assert torch.equal(first["head.layers.0.weight"], second["head.layers.0.weight"])
    assert not torch.equal(first["backbone.layer4.1.conv2.weight"], second["backbone.layer4.1.conv2.weight"])


def test_torchrun_without_cpu_flag_trains_two_synchronised_ranks(torchrun_pair):
    reports = [json.loads((torchrun_pair / f"rank{r}_report.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["world_size"]) for r in reports] == [(0, 2), (1, 2)]
    assert_identical(*rank_files(torchrun_pair, "final"), "torchrun end")


@pytest.mark.parametrize("kind, name", [("FSDP", "FSDP1"), ("DEEPSPEED", "DeepSpeed")])
def test_freezing_strategies_are_refused_under_fsdp1_and_deepspeed(kind, name, tiny_data, monkeypatch):
    """What `accelerate launch --use_fsdp` (FSDP1 unless fsdp_version is 2) or DeepSpeed asks for reaches finetune
    as ACCELERATE_USE_*; a freezing strategy is refused before anything is built, pointing to FSDP2
    (tests/integration/test_fsdp_ranks.py runs every strategy under FSDP2)."""
    from conftest import tiny_trainer

    from dist_finetune import ImageClassifier
    from dist_finetune.errors import DistributedSetupError

    monkeypatch.setenv(f"ACCELERATE_USE_{kind}", "true")
    task = ImageClassifier(tiny_data.num_classes, backbone="tiny_resnet", pretrained=False)
    trainer = tiny_trainer(max_epochs=1)
    with pytest.raises(DistributedSetupError, match=f"freezing strategies are not supported under {name}.*fsdp2"):
        trainer.finetune(task, tiny_data, strategy="freeze_unfreeze")
    assert trainer.accelerator is None, "refused before an Accelerator was made"
    if kind == "FSDP":  # no_freeze is fine (DeepSpeed itself is not installed here)
        assert len(trainer.finetune(task, tiny_data, strategy="no_freeze")) == 1


def test_a_process_outside_the_launched_world_is_refused(tiny_data, monkeypatch):
    """Under a launcher on a CPU machine, code that set accelerate up before the trainer (``PartialState()``,
    as any accelerate script does first) leaves the process "rank 0 of 1" while WORLD_SIZE says 2: finetune
    stops with the fix instead of training alone on all the data."""
    from accelerate import PartialState
    from conftest import tiny_trainer

    from dist_finetune import ImageClassifier
    from dist_finetune.errors import DistributedSetupError

    PartialState()  # this process's accelerate state: one process (nothing launched it yet)
    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    task = ImageClassifier(tiny_data.num_classes, backbone="tiny_resnet", pretrained=False)
    before = {n: p.clone() for n, p in task.named_parameters()}
    trainer = tiny_trainer(max_epochs=1)
    with pytest.raises(DistributedSetupError, match=r"launched with WORLD_SIZE=2 but this process sees 1 process\(es\)"
                                                    r": each rank would train alone .* ACCELERATE_USE_CPU=1"):
        trainer.finetune(task, tiny_data, "freeze")
    assert all(torch.equal(before[n], p) for n, p in task.named_parameters())


def test_fully_sharded_no_freeze_writes_whole_tensors_and_resumes(image_folders, tmp_path):
    """A task the caller fully_shard-ed itself, in one torchrun process (gloo on CPU): every parameter and its
    optimizer state is a DTensor. The model files and the training-state checkpoint hold whole tensors, equal
    to the gathered state; the rank check compares each sharded parameter's layout (its gathered whole is
    the same on every rank by construction); a run resumed from the first epoch's checkpoint ends exactly
    where the uninterrupted one does. (The trainer's own FSDP2 over 2 ranks: tests/integration/test_fsdp_ranks.py.)"""
    from dist_finetune import ImageClassifier
    from dist_finetune.distributed import rank_fingerprint

    launch("fully_sharded", image_folders, tmp_path, processes=1, launcher="torchrun")
    uninterrupted, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    report = json.loads((uninterrupted / "rank0_report.json").read_text())
    assert report["sharded"] == report["parameters"], "fully_shard made every parameter a DTensor"
    gathered, last = load_file(uninterrupted / "rank0_gathered.safetensors"), load_file(uninterrupted / "last.safetensors")
    assert set(gathered) == set(report["parameters"]) and set(gathered) < set(last)
    for name, tensor in gathered.items():
        torch.testing.assert_close(last[name], tensor, rtol=0, atol=1e-7)
    assert last["head.layers.0.weight"].shape == (3, 64)  # whole: 3 classes x tiny_resnet's 64 features
    checkpoint = max((uninterrupted / "checkpoints").glob("step-*"))
    moments = load_file(checkpoint / "optimizer.safetensors")
    parameter_count = sum(last[name].numel() for name in report["parameters"])
    assert sum(t.numel() for k, t in moments.items() if k.endswith(".exp_avg")) == parameter_count
    assert sum(t.numel() for k, t in load_file(checkpoint / "model.safetensors").items()) == \
        sum(t.numel() for t in last.values())
    plain = ImageClassifier.load_from_checkpoint(uninterrupted / "last.safetensors")
    unsharded = rank_fingerprint(plain, torch.optim.SGD(plain.parameters(), lr=1.0))["params"]
    assert [name for name, _ in report["fingerprint"]["params"]] == [name for name, _ in unsharded]
    head = dict(report["fingerprint"]["params"])["head.layers.0.weight"]
    assert head == "sharded (3, 64) (Shard(dim=0),) over 1", "a sharded parameter is compared by its layout"
    first_epoch = min((uninterrupted / "checkpoints").glob("step-*")).name  # kept: keep_last=2, 2 epochs
    assert json.loads((resumed / "run_info.json").read_text())["resumed_from"].endswith(first_epoch)
    resumed_last = load_file(resumed / "last.safetensors")
    assert [n for n in last if not torch.equal(last[n], resumed_last[n])] == [], "resume is bit-exact"


def test_sharded_state_is_gathered_whole_and_loaded_back_into_each_ranks_slice(shared_launch):
    """Two gloo ranks, the task fully_shard-ed over both (its 3-class head splits 2 + 1 rows): every rank
    gathers the whole initial weights; the rank check compares the sharded parameters' layouts (the same
    on both ranks) where it sums the unsharded task's bits;
    whole weights load back into the slices; Adam's moments go into a checkpoint whole and come back
    into each rank's slice unchanged."""
    folder = shared_launch / "sharded_state"
    for rank in (0, 1):
        report = json.loads((folder / f"rank{rank}_report.json").read_text())
        assert report["head_local_rows"] == (2, 1)[rank]
        sharded, plain = report["fingerprints"]["sharded"], report["fingerprints"]["plain"]
        assert [name for name, _ in sharded] == [name for name, _ in plain]
        assert all(isinstance(bits, int) for _, bits in plain)
        assert all(layout.startswith("sharded (") and layout.endswith("over 2") for _, layout in sharded)
        whole = load_file(folder / f"rank{rank}_whole.safetensors")
        for name in ("gathered", "reloaded"):
            held = load_file(folder / f"rank{rank}_{name}.safetensors")
            assert held.keys() == whole.keys() and all(torch.equal(held[k], whole[k]) for k in whole), name
        moments = load_file(folder / f"rank{rank}_moments.safetensors")
        assert moments["head_moment_in_checkpoint"].shape == (3, 64)
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(moments[f"saved.{key}"], moments[f"restored.{key}"]) and moments[f"saved.{key}"].any()
    whole_moment = load_file(folder / "rank0_moments.safetensors")["head_moment_in_checkpoint"]
    assert torch.equal(whole_moment[:2], load_file(folder / "rank0_moments.safetensors")["saved.exp_avg"])
    assert torch.equal(whole_moment[2:], load_file(folder / "rank1_moments.safetensors")["saved.exp_avg"])


@pytest.fixture(scope="module")
def scan_data(image_folders, tmp_path_factory) -> Path:
    """The image folders plus byte-identical copies of train/red/red_0.png in train (red_copy.png) and val."""
    data = tmp_path_factory.mktemp("scan_data")
    shutil.copytree(image_folders, data, dirs_exist_ok=True)
    for copy in (data / "train" / "red" / "red_copy.png", data / "val" / "red" / "copy_of_train.png"):
        shutil.copyfile(data / "train" / "red" / "red_0.png", copy)
    return data


@pytest.fixture(scope="module")
def flaky_scans(scan_data, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """tests/integration/scan_worker.py: what each rank drew and decided, in rank{R}_scan.json and rank{R}_split.json."""
    out = tmp_path_factory.mktemp("flaky_scans")
    return out, launch("flaky_scans", scan_data, out, worker=SCAN_WORKER)


def decisions(out: Path, part: str) -> list[dict]:
    return [json.loads((out / f"rank{rank}_{part}.json").read_text()) for rank in (0, 1)]


def test_the_image_scan_is_split_over_the_ranks_and_every_rank_decides_alike(flaky_scans):
    """2 ranks, a 5 s process-group timeout, a scan one rank alone needs 7.6 s for (38 files x 0.2 s): one
    rank scanning while the other waits in a barrier fails the run (NCCL's default timeout is 10 min);
    split, both scan at once. Rank 1 alone cannot read green_0 and green_1 (adjacent: one falls to each
    rank's share) and has no cache of rank 0's verdicts: every rank still applies the same merged
    verdicts: one file skipped, both copies of red_0 dropped, one summary."""
    out, result = flaky_scans
    first, second = decisions(out, "scan")
    assert "skipping 1 unreadable image(s):" in result.stdout + result.stderr
    assert first["decided"] == second["decided"]
    decided = first["decided"]
    assert len({"green_0.png", "green_1.png"} - {Path(p).name for p in decided["train"]}) == 1
    assert (len(decided["train"]), len(decided["val"])) == (25 - 2, 13 - 1), "one unreadable, two copies left out"
    assert [[Path(p).name for p in group] for group in decided["duplicates"]] == [
        ["red_0.png", "red_copy.png", "copy_of_train.png"]]


def test_a_val_split_drawn_differently_by_one_rank_is_replaced_by_rank_0s(flaky_scans):
    """Without a val folder each process draws the split from content hashes before the ranks meet; rank
    1 cannot read red_copy.png (red_0.png's copy), so its draw differs. Every rank trains on rank 0's."""
    first, second = decisions(flaky_scans[0], "split")
    assert first["drawn"] != second["drawn"], "the ranks drew different splits"
    assert first["decided"] == second["decided"]
    assert set(first["decided"]["train"]) <= set(first["drawn"]["train"])
    assert set(first["decided"]["val"]) <= set(first["drawn"]["val"])


def test_the_process_group_timeout_is_a_setting_passed_to_the_process_group(monkeypatch):
    """``process_group_timeout_s`` / ``--process-group-timeout`` (30 min by default, not NCCL's 10) reaches
    torch's init_process_group through accelerate; the 2-rank run above shows it taking effect."""
    from datetime import timedelta

    from dist_finetune.cli import build_parser, train_config
    from dist_finetune.config import ConfigError, TrainerConfig
    from dist_finetune.distributed import make_accelerator

    assert TrainerConfig().process_group_timeout_s == 1800
    args = build_parser().parse_args(["train", "--train-folder", "x", "--process-group-timeout", "5"])
    assert train_config(args).trainer.process_group_timeout_s == 5
    with pytest.raises(ConfigError, match="process_group_timeout_s must be positive, got 0"):
        TrainerConfig(process_group_timeout_s=0)
    assert make_accelerator(process_group_timeout_s=5).init_handler.timeout == timedelta(seconds=5)


def test_more_processes_per_machine_than_gpus_is_refused_naming_both_numbers(monkeypatch):
    """Instead of a bare "invalid device ordinal" from the third process on a 2-GPU machine: a ConfigError
    before accelerate starts, saying which numbers disagree; CPU processes (ACCELERATE_USE_CPU) are any number."""
    from dist_finetune.distributed import check_gpus_per_machine, make_accelerator
    from dist_finetune.errors import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match=r"4 processes per machine \(LOCAL_WORLD_SIZE\) but this machine shows 2 "
                                          r"GPU\(s\).*Launch 2 process\(es\) per machine"):
        make_accelerator()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    check_gpus_per_machine()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    check_gpus_per_machine()


EXIT_RUNS = 3


def test_two_rank_jobs_exit_cleanly_with_no_gloo_thread_left_after_shutdown(tmp_path):
    """A rank that finished its work now and then died at exit with SIGABRT ("terminate called without
    an active exception"): destroy_process_group does not stop a gloo group's threads, and the DDP
    wrappers in the run's reference cycle kept the group alive into the interpreter's final garbage
    collection, so its threads were stopped during finalisation. tests/integration/exit_worker.py runs the exit
    path 3 times; every rank must exit 0, with no gloo thread left once shutdown has run. The threads are the
    deterministic symptom (before the fix every run left them alive: 30 of 30); the abort was the rare one."""
    result = subprocess.run([sys.executable, str(EXIT_WORKER), str(EXIT_RUNS), str(tmp_path)], capture_output=True,
                            text=True, env=ENV, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary) == EXIT_RUNS
    failed = [(run, job["exit_codes"]) for run, job in enumerate(summary) if job["exit_codes"] != [0, 0]]
    survived = [(run, job["gloo_threads_after_shutdown"]) for run, job in enumerate(summary)
                if job["gloo_threads_after_shutdown"] != [[], []]]
    assert not failed and not survived, f"non-zero exits: {failed}; gloo threads after shutdown: {survived[:3]}"
