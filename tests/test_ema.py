"""The weight average (dist_finetune/ema.py, ``--ema-decay``): its arithmetic on a one-parameter model, a layer
joining at an unfreeze, the average validated and kept as the best model, a killed run resumed bit-exactly,
the rank check covering it, and a decay outside (0, 1) refused before anything is written. The 2-rank and
FSDP2 runs with an average: integration/test_distributed_ranks.py, integration/test_fsdp_ranks.py."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import task, tiny_trainer
from safetensors.torch import load_file
from torch import nn

from dist_finetune.checkpoint import read_metadata
from dist_finetune.ema import WeightEMA

DECAY = 0.5  # reached by the warmup (1 + s) / (10 + s) at step 8, of 12 in the runs below (6 steps per epoch)
JOINING = "backbone.layer4.1.conv2.weight"  # frozen in epoch 0, trains from epoch 1 (freeze_unfreeze, 1)
FAVOURED_EPOCH = 0  # the average is made to score best here, so the best model is an average


def test_the_average_of_one_parameter_follows_the_hand_computed_sequence():
    """Decay 0.3 after the warmup 0.1, 2/11, 0.25, then the cap (4/13 > 0.3); the model holds the average
    only inside ``swapped_in``."""
    toy = nn.Linear(1, 1, bias=False)
    toy.weight.data.fill_(1.0)
    run = SimpleNamespace(task=toy, resumed_from=None)
    average = WeightEMA(0.3)
    average.on_fit_start(None, run)
    # 0.1 * 1 + 0.9 * 2; (2/11) * 1.9 + (9/11) * 4 = 39.8/11; 0.25 * 39.8/11 + 0.75 * 4; 0.3 * that + 0.7 * 0
    for value, expected in ((2.0, 1.9), (4.0, 3.6181818181818), (4.0, 3.9045454545454), (0.0, 1.1713636363636)):
        toy.weight.data.fill_(value)
        average.update(toy)
        assert average.weights["weight"].item() == pytest.approx(expected, rel=1e-6)
    assert run.ema is average and average.step == 4 and average.weights["weight"].dtype == torch.float32
    with average.swapped_in(toy):
        assert toy.weight.item() == pytest.approx(1.1713636363636, rel=1e-6)
    assert toy.weight.item() == 0.0


def recorder():
    """A callback keeping ``JOINING``'s value as training starts and after every optimizer step (whether it
    trained then), and the average's copy of it at each epoch end."""
    from dist_finetune.callbacks import Callback

    class Record(Callback):
        def __init__(self):
            self.start, self.steps, self.average_at_epoch_end = None, [], []

        def on_fit_start(self, trainer, run):
            self.start = dict(run.task.named_parameters())[JOINING].detach().clone()

        def on_step_end(self, trainer, run):
            param = dict(run.task.named_parameters())[JOINING]
            self.steps.append((param.detach().clone(), param.requires_grad))

        def on_epoch_end(self, trainer, run, record):
            self.average_at_epoch_end.append(run.ema.weights[JOINING].clone())

    return Record()


def favour_the_average(monkeypatch):
    """The average's validation at ``FAVOURED_EPOCH`` reports accuracy 1.0, so it is the best model."""
    validate = WeightEMA.on_validation_end

    def favoured(self, trainer, run, record):
        validate(self, trainer, run, record)
        if record["epoch"] == FAVOURED_EPOCH:
            record["val_acc_ema"] = 1.0
            favoured.weights = {n: w.clone() for n, w in self.weights.items()}
            favoured.buffers = {n: t.clone() for n, t in run.task.state_dict().items() if n not in self.weights}

    monkeypatch.setattr(WeightEMA, "on_validation_end", favoured)
    return favoured


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    """One uninterrupted 2-epoch freeze_unfreeze run with an average, and the run a kill after step 8 (epoch 1,
    batch 2) leaves to resume: from that step's checkpoint, into another output dir (cheaper than a killed
    run; the same state). The average is favoured at epoch 0 in all: resumed at step 8 the run takes that best
    model from the checkpoint's run's model.safetensors; resumed at step 6, the end of epoch 0, from the
    checkpoint's average itself."""
    out = tmp_path_factory.mktemp("ema")
    with pytest.MonkeyPatch.context() as monkeypatch:
        favoured = favour_the_average(monkeypatch)

        def finetune(name, callbacks=(), resume=None):
            trainer = tiny_trainer(max_epochs=2, output_dir=str(out / name), ema_decay=DECAY, save_every_n_steps=4,
                                   keep_last=4, callbacks=list(callbacks))
            trainer.finetune(task(tiny_data), tiny_data, ("freeze_unfreeze", 1), resume=resume)
            return trainer

        record = recorder()
        whole = finetune("whole", [record])
        favoured_whole = (favoured.weights, favoured.buffers)
        resumed = finetune("resumed", resume=str(out / "whole" / "checkpoints" / "step-00000008"))
        finetune("resumed_at_best", resume=str(out / "whole" / "checkpoints" / "step-00000006"))
    return SimpleNamespace(out=out, whole=whole, resumed=resumed, record=record, favoured=favoured_whole)


def test_a_layer_joining_at_the_unfreeze_averages_from_its_pretrained_value(runs):
    """Frozen in epoch 0, the average of ``JOINING`` is its starting value, bit for bit; from the unfreeze on it
    is that value blended with the updates, as recomputed here by the formula in float64."""
    record, start = runs.record, runs.record.start
    assert [trains for _, trains in record.steps] == [False] * 6 + [True] * 6
    assert torch.equal(record.average_at_epoch_end[0], start)
    expected = start.double()
    for step, (value, trains) in enumerate(record.steps):
        decay = min(DECAY, (1 + step) / (10 + step))
        if trains:
            expected = decay * expected + (1 - decay) * value.double()
    final = runs.whole.run.ema.weights[JOINING]
    assert torch.allclose(final.double(), expected, rtol=0, atol=1e-6)
    assert not torch.allclose(final, start) and not torch.allclose(final, record.steps[-1][0])
    assert final.abs().sum() > 0


def test_the_average_is_validated_each_epoch_and_kept_when_best(runs):
    """metrics.jsonl has val_loss_ema / val_acc_ema every epoch; at the favoured epoch the average is the best
    model: model.safetensors holds its weights (with the live BatchNorm statistics) and says so, and the task
    ends holding them."""
    folder = runs.out / "whole"
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < m["val_loss_ema"] and 0 <= m["val_acc_ema"] <= 1 for m in metrics)
    assert [m.get("best_weights") for m in metrics if m.get("best")][-1] == "ema"
    assert metrics[FAVOURED_EPOCH]["best_weights"] == "ema"
    weights, buffers = runs.favoured
    saved = load_file(folder / "model.safetensors")
    assert all(torch.equal(saved[n], w) for n, w in weights.items())
    assert all(torch.equal(saved[n], b) for n, b in buffers.items())
    assert read_metadata(folder / "model.safetensors")["training"] == {
        "epoch": FAVOURED_EPOCH, "val_acc": 1.0, "val_loss": metrics[FAVOURED_EPOCH]["val_loss_ema"],
        "weights": "ema"}
    run = runs.whole.run
    assert (run.model_epoch, run.model_is_ema) == (FAVOURED_EPOCH, True)
    assert all(torch.equal(p, weights[n]) for n, p in run.task.named_parameters())
    assert json.loads((folder / "report.json").read_text())["model"] == {"epoch": 0, "weights": "best (EMA)"}


def test_a_killed_run_resumes_its_average_bit_exactly(runs):
    """Resumed from step 8, in epoch 1 after the unfreeze: the same average, step count, live weights, best
    model and metrics as the uninterrupted run; the checkpoint held the average and its step."""
    whole, resumed = runs.whole.run.ema, runs.resumed.run.ema
    checkpoint = runs.out / "whole" / "checkpoints" / "step-00000008"
    assert json.loads((checkpoint / "state.json").read_text())["callbacks"]["WeightEMA"] == {"step": 8, "decay": DECAY}
    assert "callbacks.safetensors" in json.loads((checkpoint / "manifest.json").read_text())
    assert resumed.step == whole.step == 12
    assert all(torch.equal(resumed.weights[n], w) for n, w in whole.weights.items())
    for folder, name in (("resumed", "last.safetensors"), ("resumed", "model.safetensors"),
                         ("resumed_at_best", "last.safetensors"), ("resumed_at_best", "model.safetensors")):
        first, second = load_file(runs.out / "whole" / name), load_file(runs.out / folder / name)
        assert first.keys() == second.keys() and all(torch.equal(first[n], second[n]) for n in first), (folder, name)
    metrics = [[json.loads(line) for line in (runs.out / name / "metrics.jsonl").read_text().splitlines()]
               for name in ("whole", "resumed")]
    keys = ("val_loss", "val_acc", "val_loss_ema", "val_acc_ema", "best", "best_weights")
    assert [m["epoch"] for m in metrics[1]] == [1]  # its own output dir: the epoch it trained
    assert [metrics[0][1].get(k) for k in keys] == [metrics[1][0].get(k) for k in keys]


def test_the_rank_check_covers_the_average():
    """Two ranks whose parameters agree but whose averages do not: the fingerprints differ, naming the average."""
    from dist_finetune.distributed import _describe_difference, rank_fingerprint

    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    averaged = {n: p.detach().clone() for n, p in model.named_parameters()}
    mine = rank_fingerprint(model, optimizer, averaged)
    averaged["bias"] += 1e-3
    theirs = rank_fingerprint(model, optimizer, averaged)
    assert mine["params"] == theirs["params"] and mine != theirs
    assert _describe_difference(mine, theirs) == "first differing weight average 'bias'"


@pytest.mark.parametrize("decay", [0, 1, 1.5, -0.1])
def test_a_decay_outside_0_1_is_refused_before_anything_is_written(image_folders, tmp_path, capsys, decay):
    from dist_finetune.cli import main
    from dist_finetune.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"ema_decay must be in \(0, 1\), got {decay}"):
        tiny_trainer(ema_decay=decay)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exited:
        main(["train", "--train-folder", str(image_folders / "train"), "--backbone", "tiny_resnet", "--no-pretrained",
              "--image-size", "32", "--output-dir", str(out), "--ema-decay", str(decay)])
    error = capsys.readouterr().err
    assert exited.value.code == 2 and len(error.splitlines()) == 1 and "ema_decay must be in (0, 1)" in error
    assert not out.exists()
