"""Exact resume: a run killed (SIGKILL) or preempted (SIGUSR1, SIGTERM) at any step ends bit-identical to
an uninterrupted one, also around the unfreeze transition, with 1 and 2 processes; another process count
resumes (not bit-exactly) or is refused; a damaged or foreign checkpoint is never used."""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from conftest import free_port
from test_distributed import ENV

from dist_finetune.errors import CheckpointError
from dist_finetune.preemption import PREEMPTED_EXIT_CODE

WORKER = Path(__file__).with_name("resume_worker.py")


def run(data: Path, out: Path, *args: str, processes: int = 1) -> subprocess.CompletedProcess:
    prefix = [sys.executable]
    if processes > 1:
        prefix = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
                  "--num_processes", str(processes), "--main_process_port", str(free_port()),
                  "--mixed_precision", "no", "--dynamo_backend", "no"]
    return subprocess.run([*prefix, str(WORKER), str(data), str(out), *args], capture_output=True, text=True,
                          env=ENV, timeout=600)


def final_weights(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The last epoch's model and the best epoch's."""
    return {name: load_file(out / name) for name in ("last.safetensors", "model.safetensors")}


def assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys()
        different = [n for n in a[name] if not torch.equal(a[name][n], b[name][n])]
        assert not different, f"{name} differs in {different[:5]}"


@pytest.fixture(scope="module")
def baselines(image_folders, tmp_path_factory) -> dict[int, Path]:
    """Uninterrupted runs, one per process count."""
    outs = {}
    for processes in (1, 2):
        out = tmp_path_factory.mktemp(f"baseline{processes}")
        result = run(image_folders, out, processes=processes)
        assert result.returncode == 0, result.stderr[-3000:]
        outs[processes] = out
    return outs


@pytest.fixture(scope="module")
def killed(image_folders, tmp_path_factory):
    """``copy(processes, kill_at, dest)``: a run SIGKILLed after step ``kill_at``, copied to ``dest``.

    Each killed run is made once and kept pristine; every test resumes its own copy of it."""
    made: dict[tuple[int, int], Path] = {}

    def copy(processes: int, kill_at: int, dest: Path) -> Path:
        if (processes, kill_at) not in made:
            out = tmp_path_factory.mktemp(f"killed{processes}x{kill_at}")
            result = run(image_folders, out, "--kill-at", str(kill_at), processes=processes)
            assert result.returncode != 0 and not (out / "last.safetensors").exists(), result.stderr[-3000:]
            made[processes, kill_at] = out
        shutil.copytree(made[processes, kill_at], dest)
        return dest

    return copy


def first_steps(out: Path, processes: int) -> list[dict]:
    """The first optimizer step each rank of the latest run in ``out`` ran, and what it resumed from."""
    return [json.loads((out / f"first_step_rank{rank}.json").read_text()) for rank in range(processes)]


# 1 process: 6 steps an epoch, the backbone unfreezes between steps 6 and 7; 2 processes: 3 steps an
# epoch, the unfreeze between steps 3 and 4. A kill after step N resumes from step N - 1: (1, 5) and
# (2, 2) before the unfreeze, mid-epoch (the resumed run unfreezes, and with 2 processes rebuilds DDP);
# (1, 9) and (2, 5) after it, mid-epoch (the resumed run replays the unfreeze before the optimizer state
# is loaded and DDP is built). At the unfreeze itself, from the checkpoint of the last frozen step: the
# corrupt-checkpoint test (1 process, from step 6) and the SIGUSR1 test (2 processes, from step 3, where
# the resumed run's first act is the unfreeze: new param groups and the DDP rebuild).
@pytest.mark.parametrize("processes, kill_at", [(1, 5), pytest.param(1, 9, marks=pytest.mark.slow), (2, 2), (2, 5)])
def test_sigkill_then_resume_is_bit_identical(image_folders, baselines, killed, tmp_path, processes, kill_at):
    out = killed(processes, kill_at, tmp_path / "run")
    resumed = run(image_folders, out, "--resume", "latest", processes=processes)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"step {kill_at - 1}" in resumed.stdout  # resumed from the last checkpoint before the kill
    # the resumed processes went on from there, not through a silent retraining from step 1
    assert [(f["step"], Path(f["resumed_from"]).name) for f in first_steps(out, processes)] == \
        [(kill_at, f"step-{kill_at - 1:08d}")] * processes
    assert_bit_identical(final_weights(out), final_weights(baselines[processes]))
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2]


@pytest.mark.parametrize("saved, resumed_with, checkpoint, first_step, last_step, schedule_step, horizon", [
    (2, 1, "latest", 2, 17, 2, 18),  # 8 samples done = 2 one-process batches; 4 + 6 + 6 steps to go
    (1, 2, "step-00000004", 5, 11, 2, 9),  # 16 samples done = 2 two-process batches; 1 + 3 + 3 steps to go
])
def test_resume_with_another_process_count_warns_and_finishes(image_folders, killed, tmp_path, saved, resumed_with,
                                                              checkpoint, first_step, last_step, schedule_step,
                                                              horizon):
    """A 2-process checkpoint continued by 1 process and a 1-process one by 2 (named by path): the position
    in the epoch maps onto the new global batch, with a warning; the run finishes every epoch, its head's lr
    on a cosine over this run's 3 epochs from the mapped step (never at lr 0 before the last step)."""
    out = killed(saved, 2 if saved == 2 else 5, tmp_path / "run")
    resume = checkpoint if checkpoint == "latest" else str(out / "checkpoints" / checkpoint)
    result = run(image_folders, out, "--resume", resume, processes=resumed_with)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming a checkpoint of batch_size 4 x {saved} process(es) x 1 accumulation step(s) with batch_size 4 " \
           f"x {resumed_with} process(es)" in result.stderr
    assert [f["step"] for f in first_steps(out, resumed_with)] == [first_step] * resumed_with
    assert sorted(p.name for p in (out / "checkpoints").iterdir())[-1] == f"step-{last_step:08d}"
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2] and (out / "last.safetensors").is_file()
    head_lrs = {s["step"]: s["lr"][0] for s in map(json.loads, (out / "steps.jsonl").read_text().splitlines())}
    mapped = schedule_step - (first_step - 1)  # this run's schedule step at global step s is s + mapped
    assert sorted(head_lrs) == list(range(1, last_step + 1))
    for step in range(first_step, last_step + 1):
        expected = 1e-2 * 0.5 * (1 + math.cos(math.pi * (step + mapped) / horizon))
        assert head_lrs[step] == pytest.approx(expected, abs=1e-12), step


def test_resume_position_that_does_not_divide_the_new_global_batch_is_refused(image_folders, killed, tmp_path):
    """12 samples into an epoch cannot be continued by 2 processes x batch 4."""
    out = killed(1, 5, tmp_path / "run")
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    result = run(image_folders, out, "--resume", str(out / "checkpoints" / "step-00000003"), processes=2)
    assert result.returncode != 0
    assert "stopped 12 samples into epoch 0, not a multiple of this run's 8 samples per optimizer step (batch_size 4 " \
           "x 2 process(es) x 1 accumulation step(s)): resume with the checkpoint's batch_size 4 x 1 process(es)" \
        in result.stderr, result.stderr[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before


CLI_TRAIN = ["--backbone", "timm:test_resnet", "--no-pretrained", "--image-size", "32", "--batch-size", "4",
             "--max-epochs", "3", "--strategy", "freeze_unfreeze", "--unfreeze-epoch", "1", "--num-workers", "0",
             "--seed", "0", "--save-every-n-steps", "1", "--check-every-n-steps", "1", "--log-every-n-steps", "1",
             "--no-progress-bar"]


class CliTrain:
    """``python -m dist_finetune train`` on the test folders in the background; output to files (never a
    full pipe that would stall it)."""

    def __init__(self, data: Path, out: Path, *args: str):
        self.out, self.logs = out, [tempfile.TemporaryFile("w+") for _ in range(2)]
        command = [sys.executable, "-m", "dist_finetune", "train", "--train-folder", str(data / "train"),
                   "--val-folder", str(data / "val"), "--output-dir", str(out), *CLI_TRAIN, *args]
        self.process = subprocess.Popen(command, stdout=self.logs[0], stderr=self.logs[1], text=True, env=ENV)

    def finish(self) -> tuple[int, str, str]:
        """(exit code, stdout, stderr) once it has ended."""
        code = self.process.wait(timeout=600)
        stdout, stderr = (log.seek(0) or log.read() for log in self.logs)
        return code, stdout, stderr

    def signal_when_past(self, step: int, signum: int) -> tuple[int, str, str]:
        """Send ``signum`` once steps.jsonl shows a step after ``step``, then :meth:`finish`."""
        deadline = time.monotonic() + 300
        while not any(s > step for s in logged_steps(self.out)):
            assert self.process.poll() is None, self.finish()[2][-3000:]
            assert time.monotonic() < deadline, "training never got under way"
            time.sleep(0.005)
        self.process.send_signal(signum)
        return self.finish()


def logged_steps(out: Path) -> list[int]:
    path = out / "steps.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(line)["step"] for line in lines if line.endswith("}")]


@pytest.fixture(scope="module")
def cli_uninterrupted(image_folders, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli_uninterrupted")
    code, _, stderr = CliTrain(image_folders, out).finish()
    assert code == 0, stderr[-3000:]
    return out


def test_cli_exits_42_on_sigusr1_and_sigterm_and_resumes_exactly(image_folders, cli_uninterrupted, tmp_path):
    """``dist-finetune train`` itself: SIGUSR1 in the first epoch, then SIGTERM to the run resumed from
    the checkpoint it saved (``--resume PATH``); each time exit code 42 after a checkpoint. ``--resume
    latest`` then finishes bit-identical to the uninterrupted run."""
    out, stopped_at = tmp_path / "run", 0
    for signum in (signal.SIGUSR1, signal.SIGTERM):
        resume = ["--resume", str(out / "checkpoints" / f"step-{stopped_at:08d}")] if stopped_at else []
        code, stdout, stderr = CliTrain(image_folders, out, *resume).signal_when_past(stopped_at, signum)
        assert code == PREEMPTED_EXIT_CODE, stderr[-3000:]
        if resume:
            assert f"resumed from {resume[1]} at epoch" in stdout and f"step {stopped_at}\n" in stdout
        saved = re.search(rf"stopped by {signum.name}; state saved in ([^;\s]+);", stderr)
        assert saved, stderr[-3000:]
        step = int(Path(saved[1]).name.removeprefix("step-"))
        assert step > stopped_at and not (out / "last.safetensors").exists()
        stopped_at = step
    assert stopped_at < 18, "stopped before the run's last step"
    code, stdout, stderr = CliTrain(image_folders, out, "--resume", "latest").finish()
    assert code == 0, stderr[-3000:]
    assert f"step {stopped_at}\n" in stdout
    assert logged_steps(out) == list(range(1, 19)), "every step logged once"
    assert_bit_identical(final_weights(out), final_weights(cli_uninterrupted))


def test_sigusr1_to_one_rank_stops_both_and_resumes_exactly(image_folders, baselines, tmp_path):
    """SIGUSR1 to rank 0 only: both ranks agree to stop, save together and exit 42 (accelerate launch
    reports 1); the resumed pair ends bit-identical. The stop is at the unfreeze boundary: the checkpoint
    is epoch 0's last (frozen) step, so the resumed pair starts by unfreezing the backbone, adding its param
    group at the ramp's start and rebuilding DDP, all as the uninterrupted pair did. (One process: the CLI
    test above.)"""
    stopped = run(image_folders, tmp_path, "--signal-at", "2", processes=2)  # noticed at the epoch's end, step 3
    assert stopped.returncode in (PREEMPTED_EXIT_CODE, 1), stopped.stderr[-3000:]
    saved = tmp_path / "checkpoints" / "step-00000003"
    assert f"stopped by SIGUSR1; state saved in {saved}" in stopped.stderr
    assert f"stopped by a peer rank; state saved in {saved}" in stopped.stderr
    assert not (tmp_path / "checkpoints" / "step-00000004").exists()
    assert [(f["param_groups"], f["ddp_covers_trainable"]) for f in first_steps(tmp_path, 2)] == [(1, True)] * 2
    resumed = run(image_folders, tmp_path, "--resume", "latest", processes=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # the resumed ranks' first step is the first unfrozen one: head and backbone groups, in DDP
    assert [(f["step"], f["param_groups"], f["ddp_covers_trainable"]) for f in first_steps(tmp_path, 2)] == \
        [(4, 2, True)] * 2
    assert_bit_identical(final_weights(tmp_path), final_weights(baselines[2]))


def test_corrupt_latest_checkpoint_falls_back_to_an_intact_one(image_folders, baselines, killed, tmp_path):
    out = killed(1, 9, tmp_path / "run")
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-00000006", "step-00000007", "step-00000008"]  # keep_last=3
    model = root / "step-00000008" / "model.safetensors"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])  # truncated by a crash or a full disk
    altered = root / "step-00000007" / "model.safetensors"  # one bit flipped in the weights: same size
    content = bytearray(altered.read_bytes())
    content[-1] ^= 0x01
    altered.write_bytes(bytes(content))
    (root / ".step-00000009.partial").mkdir()  # a write that never finished
    resumed = run(image_folders, out, "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{root / 'step-00000008'} is corrupt" in resumed.stderr
    assert f"{root / 'step-00000007'} is corrupt" in resumed.stderr and "step 6" in resumed.stdout
    assert [(f["step"], Path(f["resumed_from"]).name) for f in first_steps(out, 1)] == [(7, "step-00000006")]
    assert_bit_identical(final_weights(out), final_weights(baselines[1]))
    # the checkpoint resumed from is kept; the corrupt ones, newer than it, are set aside
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000006", "step-00000016", "step-00000017",
                                                          "step-00000018"]
    assert sorted(p.name for p in next(root.glob("abandoned-*")).iterdir()) == ["step-00000007", "step-00000008"]


def test_resume_latest_without_checkpoints_starts_fresh(image_folders, tmp_path):
    """``resume="latest"`` over an output dir without checkpoints is the same run as no resume at all."""
    from conftest import tiny_trainer

    from dist_finetune import ImageClassificationData, ImageClassifier, seed_everything

    data = ImageClassificationData.from_folders(str(image_folders / "train"), str(image_folders / "val"),
                                                image_size=32, batch_size=4, num_workers=0)
    weights = []
    for name, resume in (("latest", "latest"), ("plain", None)):
        seed_everything(0)
        task = ImageClassifier(3, "tiny_resnet", pretrained=False)
        trainer = tiny_trainer(max_epochs=2, output_dir=str(tmp_path / name), load_best_model_at_end=False)
        trainer.finetune(task, data, ("freeze_unfreeze", 1), resume=resume)
        assert trainer.run.resumed_from is None
        weights.append(task.state_dict())
    assert all(torch.equal(weights[0][n], weights[1][n]) for n in weights[1])


def test_resume_refuses_another_run(image_folders, tmp_path):
    """A checkpoint of a tiny_resnet, 3-class, 32 px "freeze" run is continued by nothing else: another
    backbone, strategy, class set, image size, image list, seed, optimizer, layer decay, dedupe, class
    weights or balanced sampler is refused
    before anything trains; so is a fresh run over it; a checkpoint folder without its manifest is
    incomplete. The same images in a moved folder are the same image list."""
    from conftest import tiny_trainer, write_image_folder

    from dist_finetune import ImageClassificationData, ImageClassifier
    from dist_finetune.training_state import find_checkpoint, image_lists

    def data(train=image_folders / "train", size=32, **options):
        return ImageClassificationData.from_folders(str(train), val_split=0.25, image_size=size, batch_size=4,
                                                    num_workers=0, augment=False, **options)

    out = str(tmp_path / "run")
    tiny_trainer(max_epochs=1, output_dir=out).finetune(ImageClassifier(3, "tiny_resnet", pretrained=False), data(),
                                                        "freeze")
    other_classes = write_image_folder(tmp_path / "other", classes=("blue", "green", "violet"), per_class=8)
    fewer = shutil.copytree(image_folders / "train", tmp_path / "fewer" / "train")
    (fewer / "red" / "red_7.png").unlink()
    moved = shutil.copytree(image_folders / "train", tmp_path / "moved" / "train")
    lists = [image_lists(d.train_paths, d.train_labels, d.val_paths, d.val_labels) for d in (data(), data(moved))]
    assert lists[0] == lists[1]
    for backbone, strategy, dataset, settings, difference in (
        ("resnet18", "freeze", data(), {}, r"backbone: checkpoint has 'tiny_resnet', this run has 'resnet18'"),
        ("tiny_resnet", "no_freeze", data(), {}, r"strategy: checkpoint has \{[^}]*'name': 'Freeze'[^}]*\}, "
                                                 r"this run has \{[^}]*'name': 'NoFreeze'"),
        ("tiny_resnet", "freeze", data(other_classes), {},
         r"classes: checkpoint has \['blue', 'green', 'red'\], this run has \['blue', 'green', 'violet'\]"),
        ("tiny_resnet", "freeze", data(size=48), {}, r"image_size: checkpoint has 32, this run has 48"),
        ("tiny_resnet", "freeze", data(fewer), {},
         r"train_images: checkpoint has '18 images [0-9a-f]{16}', this run has '17 images [0-9a-f]{16}'"),
        ("tiny_resnet", "freeze", data(), {"seed": 1}, r"seed: checkpoint has 0, this run has 1"),
        ("tiny_resnet", "freeze", data(), {"optimizer": "sgd"},
         r"optimizer: checkpoint has 'adamw', this run has 'sgd'"),
        ("tiny_resnet", "freeze", data(), {"layer_decay": 0.5}, r"layer_decay: checkpoint has None, this run has 0.5"),
        # README: a resume must keep dedupe, class_weights and balanced_sampler
        ("tiny_resnet", "freeze", data(dedupe=True), {}, r"data: checkpoint has None, this run has \{'dedupe': True"),
        ("tiny_resnet", "freeze", data(class_weights="auto"), {},
         r"data: checkpoint has None, this run has \{[^}]*'class_weights': 'auto'"),
        ("tiny_resnet", "freeze", data(balanced_sampler=True), {},
         r"data: checkpoint has None, this run has \{[^}]*'balanced_sampler': True"),
    ):
        task = ImageClassifier(3, backbone, pretrained=False)
        before = {n: p.clone() for n, p in task.named_parameters()}
        with pytest.raises(CheckpointError, match="belongs to a different run") as refused:
            tiny_trainer(max_epochs=2, output_dir=out, **settings).finetune(task, dataset, strategy, resume="latest")
        assert re.search(difference, str(refused.value)), str(refused.value)
        assert all(torch.equal(before[n], p) for n, p in task.named_parameters()), "refused before training"
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        tiny_trainer(max_epochs=2, output_dir=out).finetune(ImageClassifier(3, "tiny_resnet", pretrained=False),
                                                            data(), "freeze")
    broken = tmp_path / "run" / "checkpoints" / "step-00000099"
    broken.mkdir()
    with pytest.raises(CheckpointError, match="incomplete"):
        find_checkpoint(str(broken), None)


def test_a_checkpoint_from_before_initial_denom_lr_is_read_as_lr_over_10(tmp_path):
    """Built-in strategies' checkpoints written before ``initial_denom_lr`` was a setting added groups at
    lr / 10: they resume with --initial-denom-lr 10 and are refused, naming the setting, under the new 100."""
    from dist_finetune.finetuning import FreezeUnfreeze, UnfreezeMilestones
    from dist_finetune.training_state import check_signature

    for strategy in (FreezeUnfreeze, UnfreezeMilestones):
        old = {k: v for k, v in strategy().describe().items() if k != "initial_denom_lr"}
        check_signature({"strategy": old}, {"strategy": strategy(initial_denom_lr=10).describe()}, tmp_path)
        with pytest.raises(CheckpointError, match=r"'initial_denom_lr': 10.0\}, this run has \{.*'initial_denom_lr'"
                                                  r": 100.0\}"):
            check_signature({"strategy": old}, {"strategy": strategy().describe()}, tmp_path)
        assert "initial_denom_lr" not in old  # the checkpoint's own record is left as it was read


def test_a_longer_max_epochs_extends_the_schedule(tiny_data, tmp_path, capsys):
    """A finished 2-epoch run (6 steps an epoch) resumed with max_epochs 4: the cosine runs over 24 steps,
    continuing at step 13 (it did not train the added epochs at lr 0); resumed again, nothing is left."""
    from test_model_selection import StopAt, finetune

    finetune(tiny_data, tmp_path, "no_freeze", max_epochs=2)
    probe = StopAt()
    finetune(tiny_data, tmp_path, "no_freeze", callbacks=[probe], resume="latest", max_epochs=4)
    assert sorted(probe.lrs) == list(range(13, 25))
    for step, lrs in probe.lrs.items():
        assert lrs == [pytest.approx(1e-2 * 0.5 * (1 + math.cos(math.pi * step / 24)), abs=1e-12)], step
    assert "schedule horizon: 24 steps (checkpoint had 12)" in capsys.readouterr().out
    with pytest.warns(UserWarning, match="at the end of epoch 3: with max_epochs 4 nothing is left to train"):
        finetune(tiny_data, tmp_path, "no_freeze", resume="latest", max_epochs=4)


def test_another_batch_size_continues_by_samples_done_or_is_refused(image_folders, tiny_data, tmp_path):
    """Stopped after step 3 of batch 4 (checkpoints at 8 and 12 samples into epoch 0): batch 8 cannot continue
    at 12 samples (refused, naming both layouts); batch 2 continues at 8 samples = batch 4 of 12 an epoch,
    every image of epoch 0 once, on a cosine over 2 x 12 steps from its step 4 (global steps 3-22)."""
    from dist_finetune import ImageClassificationData
    from test_model_selection import Interrupt, StopAt, finetune

    def data(batch_size):
        return ImageClassificationData.from_folders(str(image_folders / "train"), str(image_folders / "val"),
                                                    image_size=32, batch_size=batch_size, num_workers=0)

    settings = dict(max_epochs=2, save_every_n_steps=1)
    with pytest.raises(Interrupt):
        finetune(tiny_data, tmp_path, "no_freeze", callbacks=[StopAt(4)], **settings)
    root = tmp_path / "checkpoints"
    with pytest.raises(CheckpointError, match=re.escape(
            "stopped 12 samples into epoch 0, not a multiple of this run's 8 samples per optimizer step (batch_size 8 "
            "x 1 process(es) x 1 accumulation step(s)): resume with the checkpoint's batch_size 4 x 1 process(es) x 1 "
            "accumulation step(s)")):
        finetune(data(8), tmp_path, "no_freeze", resume=str(root / "step-00000003"), **settings)
    probe = StopAt()
    with pytest.warns(UserWarning, match="resuming a checkpoint of batch_size 4 x 1 process.* with batch_size 2"):
        _, _, metrics = finetune(data(2), tmp_path, "no_freeze", callbacks=[probe],
                                 resume=str(root / "step-00000002"), **settings)
    assert sorted(probe.lrs) == list(range(3, 23))
    for step, lrs in probe.lrs.items():
        assert lrs == [pytest.approx(1e-2 * 0.5 * (1 + math.cos(math.pi * (step + 2) / 24)), abs=1e-12)], step
    assert [m["train_images"] for m in metrics] == [24, 24]


def test_a_changed_lr_weight_decay_and_momentum_apply_from_the_resume_point(tiny_data, tmp_path, capsys):
    """SGD, constant schedule, the backbone joined at epoch 1 at lr / initial_denom_lr; resumed at step 8 with
    a 10x lower lr, another weight decay and momentum: both groups train at the new lr, keeping their ratio."""
    from test_model_selection import Interrupt, StopAt, finetune

    from dist_finetune.finetuning import DEFAULT_INITIAL_DENOM_LR, FreezeUnfreeze

    settings = dict(max_epochs=2, optimizer="sgd", scheduler="constant", unfreeze_warmup_epochs=0,
                    save_every_n_steps=1)
    with pytest.raises(Interrupt):
        finetune(tiny_data, tmp_path, FreezeUnfreeze(unfreeze_epoch=1), callbacks=[StopAt(9)], lr=1e-2,
                 weight_decay=1e-4, momentum=0.9, **settings)
    probe = StopAt()
    trainer, _, _ = finetune(tiny_data, tmp_path, FreezeUnfreeze(unfreeze_epoch=1), callbacks=[probe],
                             resume="latest", lr=1e-3, weight_decay=5e-4, momentum=0.5, **settings)
    assert sorted(probe.lrs) == list(range(9, 13))
    assert all(lrs == pytest.approx([1e-3, 1e-3 / DEFAULT_INITIAL_DENOM_LR]) for lrs in probe.lrs.values())
    groups = trainer.run.optimizer.param_groups
    assert [(g["weight_decay"], g["momentum"]) for g in groups] == [pytest.approx((5e-4, 0.5))] * 2
    out = capsys.readouterr().out
    for line in ("lr 0.001 applied from the resume point on (checkpoint had 0.01): every param group's initial_lr "
                 "scaled by 0.1", "weight_decay 0.0005 applied from the resume point on (checkpoint had 0.0001)",
                 "momentum 0.5 applied from the resume point on (checkpoint had 0.9)"):
        assert line in out


def test_resuming_an_older_checkpoint_sets_the_newer_ones_aside(tiny_data, tmp_path):
    """Resumed from step 10 of a finished run (steps 10-12 kept), the abandoned 11 and 12 move to
    checkpoints/abandoned-*/; the new step 11 survives keep_last=1 and so does the checkpoint resumed from;
    after a stop at step 12, "latest" is the new 11."""
    from test_model_selection import Interrupt, StopAt, finetune

    finetune(tiny_data, tmp_path, "no_freeze", max_epochs=2, save_every_n_steps=1, keep_last=3)
    root = tmp_path / "checkpoints"
    with pytest.raises(Interrupt):
        finetune(tiny_data, tmp_path, "no_freeze", callbacks=[StopAt(12)], resume=str(root / "step-00000010"),
                 max_epochs=2, save_every_n_steps=1, keep_last=1)
    aside = list(root.glob("abandoned-*"))
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == ["step-00000011", "step-00000012"]
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000010", "step-00000011"]
    trainer, _, _ = finetune(tiny_data, tmp_path, "no_freeze", resume="latest", max_epochs=2, save_every_n_steps=1,
                             keep_last=1)
    assert trainer.run.resumed_from.name == "step-00000011" and trainer.run.last_checkpoint.is_dir()
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000011", "step-00000012"]


def test_a_checkpoint_from_before_the_seed_optimizer_and_image_records_is_not_refused_for_lacking_them(tmp_path):
    """Older checkpoints' signatures lack the seed, optimizer and image lists: those are not compared; a
    recorded one that differs is refused."""
    from dist_finetune.training_state import check_signature

    current = {"backbone": "tiny_resnet", "seed": 0, "optimizer": "adamw", "train_images": "18 images 0123456789abcdef",
               "val_images": "6 images fedcba9876543210"}
    check_signature({"backbone": "tiny_resnet"}, current, tmp_path)
    with pytest.raises(CheckpointError, match="seed: checkpoint has 1, this run has 0"):
        check_signature({"backbone": "tiny_resnet", "seed": 1}, current, tmp_path)


class FakeCudaRng:
    """torch.cuda's RNG functions on a node with ``count`` GPUs and no real one: device i's state is i."""

    def __init__(self, monkeypatch, count: int, current: int):
        self.restored: list[tuple[int, int]] = []  # (device, the state's value)
        for name, value in {"is_available": lambda: True, "device_count": lambda: count,
                            "current_device": lambda: current, "get_rng_state": self.get,
                            "get_rng_state_all": lambda: [self.get(i) for i in range(count)],
                            "set_rng_state": self.set,
                            "set_rng_state_all": lambda states: [self.set(s, i) for i, s in enumerate(states)]}.items():
            monkeypatch.setattr(torch.cuda, name, value)
        self.count = count

    def get(self, device="cuda") -> torch.Tensor:
        index = torch.device(device).index if not isinstance(device, int) else device
        return torch.full((8,), index, dtype=torch.uint8)

    def set(self, state: torch.Tensor, device="cuda") -> None:
        index = torch.device(device).index if not isinstance(device, int) else device
        if index >= self.count:
            raise IndexError(f"no GPU {index} among {self.count}")
        self.restored.append((index, int(state[0])))


def test_rng_saves_and_restores_only_this_process_cuda_device(monkeypatch):
    """Rank 3 of a 1 x 8 node saves its own GPU's state and no other; restored on another node layout
    (its device is cuda:1 of 4 there) it lands on its own device."""
    from dist_finetune.training_state import capture_rng, restore_rng

    FakeCudaRng(monkeypatch, count=8, current=3)
    tensors, extra = capture_rng(torch.device("cuda", 3))
    assert sorted(tensors) == ["cuda", "numpy", "torch"]
    assert tensors["cuda"].tolist() == [3] * 8
    fake = FakeCudaRng(monkeypatch, count=4, current=1)
    restore_rng(tensors, extra, torch.device("cuda", 1))
    assert fake.restored == [(1, 3)]


def test_rng_of_an_old_checkpoint_with_every_gpu_state(monkeypatch):
    """Checkpoints that held every visible GPU's state (cuda0..cuda11, where text order puts cuda10
    before cuda2) restore this process's device's entry on a machine of as many GPUs; on another layout
    (1 x 12 resumed as 3 x 4: device 2 is now another rank's) a warning and no restore."""
    from dist_finetune.training_state import capture_rng, restore_rng

    FakeCudaRng(monkeypatch, count=12, current=0)
    tensors, extra = capture_rng(torch.device("cpu"))
    assert "cuda" not in tensors, "a CPU process saves no CUDA state"
    old = {**tensors, **{f"cuda{i}": torch.full((8,), 100 + i, dtype=torch.uint8) for i in range(12)}}
    fake = FakeCudaRng(monkeypatch, count=12, current=10)
    restore_rng(old, extra, torch.device("cuda", 10))
    assert fake.restored == [(10, 110)]
    fake = FakeCudaRng(monkeypatch, count=4, current=2)
    with pytest.warns(UserWarning, match=r"no CUDA RNG state for this process's device cuda:2 .*12 GPU.*shows 4"
                                         r".*not bit-exact"):
        restore_rng(old, extra, torch.device("cuda", 2))
    assert fake.restored == []


def test_a_checkpoint_written_again_at_its_step_is_replaced_never_missing(tiny_data, tmp_path, monkeypatch):
    """A preemption at an epoch's last step and the resumed run's epoch-end save share a step number: the
    second write replaces the folder (perhaps the one resumed from). It was deleted before its
    replacement was in place; a crash between the two now leaves it aside, and the next write restores it."""
    import os

    from conftest import tiny_trainer

    from dist_finetune import ImageClassifier, seed_everything
    from dist_finetune.training_state import verify

    seed_everything(0)
    trainer = tiny_trainer(max_epochs=1, output_dir=str(tmp_path))
    trainer.finetune(ImageClassifier(3, backbone="tiny_resnet", pretrained=False), tiny_data)
    checkpoint = tmp_path / "checkpoints" / "step-00000006"
    first = (checkpoint / "manifest.json").read_text()
    real_replace, calls = os.replace, []

    def crash_on_the_second_rename(source, target):
        calls.append(Path(target).name)
        if len(calls) == 2:  # the old folder is aside, the new one not yet in place
            raise OSError("killed")
        real_replace(source, target)

    trainer.run.saved_position = None
    monkeypatch.setattr(os, "replace", crash_on_the_second_rename)
    with pytest.raises(OSError, match="killed"):
        trainer.save_training_state(trainer.run)
    monkeypatch.setattr(os, "replace", real_replace)
    assert calls == [".step-00000006.replaced", "step-00000006"] and not checkpoint.exists()
    assert (tmp_path / "checkpoints" / ".step-00000006.replaced" / "manifest.json").read_text() == first  # kept
    trainer.save_training_state(trainer.run)  # restores the one aside, then replaces it whole
    verify(checkpoint)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000006"]
