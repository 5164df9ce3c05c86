"""The lr finder (``Trainer.lr_find``, ``dist-finetune lr-find``): its schedule, smoothing and suggestion from
first principles, one short sweep that must leave the model as it was and stop where the loss diverges, a
non-finite first loss refused with nothing written, and the command end to end."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from conftest import BACKBONE, task as make_task, tiny_trainer

from dist_finetune.cli import main
from dist_finetune.finetuning import FreezeUnfreeze
from dist_finetune.lr_finder import LR_FIND_JSON, LR_FIND_PNG, LRSweep, smooth, steepest_lr, sweep_lrs
from dist_finetune.plots import matplotlib_available


def test_the_sweep_is_exponential_from_exactly_the_first_to_exactly_the_last_lr():
    lrs = sweep_lrs(1e-7, 10.0, 9)
    assert lrs[0] == 1e-7 and lrs[-1] == 10.0  # the literal endpoints, not 9.999999999999998
    assert lrs == pytest.approx([1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0], rel=1e-12)


def test_the_smoothed_loss_is_bias_corrected_and_the_suggestion_is_the_steepest_descent():
    # with beta 0.5: the averages are 0.5 x 0 + 0.5 x 3 = 1.5 and 0.5 x 1.5 + 0.5 x 0 = 0.75, divided by
    # 1 - 0.5 and 1 - 0.25; a constant loss stays itself (uncorrected it would start at 0.02 x 2)
    assert smooth([3.0, 0.0], 0.5) == pytest.approx([3.0, 1.0])
    assert smooth([2.0, 2.0, 2.0], 0.98) == pytest.approx([2.0, 2.0, 2.0])
    # loss = 2 - tanh(log10(lr) + 3) falls fastest (slope -1 per decade) at lr 1e-3, flattens on both sides
    lrs = sweep_lrs(1e-7, 10.0, 33)  # a quarter decade apart: 1e-3 is the 17th
    curve = [2 - math.tanh(math.log10(lr) + 3) for lr in lrs]
    assert steepest_lr(lrs, curve) == pytest.approx(1e-3, rel=1e-9)
    assert steepest_lr(lrs[:1], curve[:1]) is None


class RecordingFreezeUnfreeze(FreezeUnfreeze):
    """freeze_unfreeze, recording what trains when the first epoch's hook runs and on which model."""

    def finetune_function(self, model, epoch, optimizer):
        super().finetune_function(model, epoch, optimizer)
        self.seen = {"epoch": epoch, "model": model, "trainable": sorted(
            {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}),
            "optimizer": type(optimizer).__name__, "weight_decay": optimizer.param_groups[0]["weight_decay"]}


@pytest.fixture(scope="module")
def sweep_run(tiny_data, tmp_path_factory):
    """One sweep of a freeze_unfreeze model from lr 0.1 to 1000 in 8 steps (the head diverges well before),
    and what the task and the random generators held before it."""
    task = make_task(tiny_data)
    task.train()
    before = {name: tensor.clone() for name, tensor in task.state_dict().items()}
    flags = {name: p.requires_grad for name, p in task.named_parameters()}
    modes = {name: module.training for name, module in task.named_modules()}
    rngs = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    strategy = RecordingFreezeUnfreeze(unfreeze_epoch=1)
    output = tmp_path_factory.mktemp("lr_find") / "out"
    trainer = tiny_trainer(output_dir=str(output), weight_decay=0.05)
    result = trainer.lr_find(task, tiny_data, strategy, sweep=LRSweep(start_lr=0.1, end_lr=1000.0, num_steps=8))
    after_rngs = (torch.get_rng_state(), np.random.get_state()[1], random.getstate())
    return dict(task=task, before=before, flags=flags, modes=modes, rngs=rngs, after_rngs=after_rngs,
                strategy=strategy, result=result, output=output)


def test_the_sweep_trains_a_copy_and_leaves_the_model_and_the_random_generators_as_they_were(sweep_run):
    task, result = sweep_run["task"], sweep_run["result"]
    state = task.state_dict()
    assert state.keys() == sweep_run["before"].keys()
    changed = [name for name, tensor in sweep_run["before"].items() if not torch.equal(state[name], tensor)]
    assert not changed, changed  # weights and BatchNorm statistics, bit for bit
    assert {name: p.requires_grad for name, p in task.named_parameters()} == sweep_run["flags"]
    assert {name: module.training for name, module in task.named_modules()} == sweep_run["modes"]
    torch_rng, numpy_rng, python_rng = sweep_run["after_rngs"]
    assert torch.equal(torch_rng, sweep_run["rngs"][0]) and np.array_equal(numpy_rng, sweep_run["rngs"][1])
    assert python_rng == sweep_run["rngs"][2]
    # what trained was a copy, as the first epoch trains it: only the head, with the run's optimizer
    seen = sweep_run["strategy"].seen
    assert seen["model"] is not task and seen["epoch"] == 0
    assert (seen["trainable"], seen["optimizer"], seen["weight_decay"]) == (["head"], "AdamW", 0.05)
    assert len(set(result.losses)) > 1  # the copy did train


def test_the_sweep_stops_once_the_smoothed_loss_passes_four_times_its_minimum(sweep_run):
    result = sweep_run["result"]
    assert result.stopped_early is not None and "4 x its minimum" in result.stopped_early
    steps = len(result.lrs)
    assert 2 <= steps < 8 and result.lrs == sweep_lrs(0.1, 1000.0, 8)[:steps]
    assert len(result.losses) == len(result.smoothed) == steps
    assert result.smoothed[-1] > 4 * min(result.smoothed[:-1])
    assert all(value <= 4 * min(result.smoothed[:i + 1]) for i, value in enumerate(result.smoothed[:-1]))
    assert result.suggestion in result.lrs and result.min_loss_lr in result.lrs
    written = json.loads((sweep_run["output"] / LR_FIND_JSON).read_text())
    assert written == {"lrs": result.lrs, "losses": result.losses, "smoothed": result.smoothed,
                       "suggestion": result.suggestion, "min_loss_lr": result.min_loss_lr,
                       "stopped_early": result.stopped_early}
    assert (sweep_run["output"] / LR_FIND_PNG).is_file() == matplotlib_available()


def test_a_non_finite_first_loss_is_one_clear_error_with_nothing_written(image_folders, tmp_path, capsys):
    from safetensors.torch import save_file
    from tiny_resnet import TinyResNet

    weights = TinyResNet().state_dict()
    weights["conv1.weight"][0, 0, 0, 0] = float("nan")  # one NaN weight: every feature, so every loss, is NaN
    save_file(weights, tmp_path / "nan.safetensors")
    with pytest.raises(SystemExit) as stopped:
        main([*lr_find_args(image_folders), "--weights", str(tmp_path / "nan.safetensors"), "--output-dir",
              str(tmp_path / "out")])
    assert stopped.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("dist-finetune lr-find: error: the loss of the first batch is nan, before any update")
    assert "\n" not in error and not (tmp_path / "out").exists()


def lr_find_args(image_folders) -> list[str]:
    return ["lr-find", "--train-folder", str(image_folders / "train"), "--val-folder", str(image_folders / "val"),
            "--backbone", BACKBONE, "--image-size", "32", "--batch-size", "4", "--num-workers", "0",
            "--strategy", "freeze", "--seed", "0", "--no-progress-bar"]


def test_the_command_prints_the_suggestion_and_writes_the_curve(image_folders, tmp_path, capsys):
    # 8 steps, 6 batches of 4 of the 24 train images: the loader starts a second epoch
    main([*lr_find_args(image_folders), "--no-pretrained", "--num-steps", "8", "--start-lr", "1e-4",
          "--end-lr", "1e-2", "--output-dir", str(tmp_path)])
    printed = capsys.readouterr().out
    written = json.loads((tmp_path / LR_FIND_JSON).read_text())
    assert written["lrs"] == pytest.approx([10 ** (-4 + 2 * step / 7) for step in range(8)], rel=1e-12)
    assert written["stopped_early"] is None and len(written["losses"]) == 8
    assert f"suggested --lr {written['suggestion']:.1e}" in printed
    assert f"written to {tmp_path}: {LR_FIND_JSON}" in printed
    assert (tmp_path / LR_FIND_PNG).is_file() == matplotlib_available()
    with pytest.raises(SystemExit):
        main(["lr-find", "--help"])
    listed = capsys.readouterr().out
    for flag in ("--start-lr", "--end-lr", "--num-steps", "--smoothing", "--divergence", "--config", "--train-folder",
                 "--backbone", "--strategy", "--unfreeze-epoch", "--optimizer", "--weight-decay", "--output-dir"):
        assert flag in listed, flag


def test_a_sharded_run_is_refused_before_anything_starts():
    from dist_finetune.config import TrainerConfig
    from dist_finetune.errors import ConfigError
    from dist_finetune.lr_finder import find_lr

    with pytest.raises(ConfigError, match="lr-find trains the whole model on every rank"):
        find_lr(None, FreezeUnfreeze(), TrainerConfig(sharding="fsdp2"), None, None, None, LRSweep())


def test_without_matplotlib_the_curve_is_still_written_and_the_missing_plot_explained(tmp_path, monkeypatch, capsys):
    import sys

    from dist_finetune.lr_finder import LRFinderResult
    from dist_finetune.plots import MATPLOTLIB_HINT

    for name in [name for name in sys.modules if name.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # import matplotlib now raises ImportError
    result = LRFinderResult([1e-3, 1e-2], [2.0, 1.0], [2.0, 1.4], 1e-2, 1e-2, None)
    assert result.save(tmp_path / "out") == [tmp_path / "out" / LR_FIND_JSON]
    assert json.loads((tmp_path / "out" / LR_FIND_JSON).read_text())["suggestion"] == 1e-2
    assert MATPLOTLIB_HINT in capsys.readouterr().out and not (tmp_path / "out" / LR_FIND_PNG).exists()
