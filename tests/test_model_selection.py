"""The model a run keeps (best epoch in model.safetensors, last in last.safetensors), early stopping,
the ramp of newly unfrozen groups and layer-wise lr decay, and exact resume of all of it around an
unfreeze."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from conftest import BACKBONE, tiny_trainer
from safetensors.torch import load_file

from dist_finetune import ImageClassifier, seed_everything
from dist_finetune.callbacks import Callback
from dist_finetune.checkpoint import read_metadata
from dist_finetune.finetuning import FreezeUnfreeze, UnfreezeMilestones


class Interrupt(Exception):
    """Raised by :class:`StopAt` in place of a kill."""


class StopAt(Callback):
    """Records every step's lrs; raises :class:`Interrupt` after step ``step`` (before it is saved)."""

    def __init__(self, step: int | None = None):
        self.step, self.lrs = step, {}

    def on_step_end(self, trainer, run) -> None:
        self.lrs[run.position.global_step] = [group["lr"] for group in run.optimizer.param_groups]
        if run.position.global_step == self.step:
            raise Interrupt(self.step)


def finetune(data, tmp_path, strategy, callbacks=(), resume=None, **settings):
    seed_everything(0)
    task = ImageClassifier(data.num_classes, backbone=BACKBONE, pretrained=False)
    trainer = tiny_trainer(output_dir=str(tmp_path), callbacks=list(callbacks), **settings)
    metrics = trainer.finetune(task, data, strategy=strategy, resume=resume)
    return trainer, task, metrics


def test_best_epoch_is_kept_last_is_saved_and_the_task_holds_the_best(tiny_data, tmp_path):
    trainer, task, metrics = finetune(tiny_data, tmp_path, FreezeUnfreeze(unfreeze_epoch=1), max_epochs=4)
    marked = [m["epoch"] for m in metrics if m.get("best")]
    best = marked[-1]
    key = lambda m: (m["val_acc"], -m["val_loss"])  # noqa: E731  (val_acc, ties to the lower val_loss)
    assert best == max(metrics, key=key)["epoch"] and marked[0] == 0
    assert all(key(metrics[e]) > key(metrics[p]) for p, e in zip(marked, marked[1:])), "marked when improved"
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m.get("best", False) for m in logged] == [m.get("best", False) for m in metrics]
    assert read_metadata(tmp_path / "model.safetensors")["training"]["epoch"] == best
    assert read_metadata(tmp_path / "last.safetensors")["training"]["epoch"] == 3
    saved_best, saved_last = load_file(tmp_path / "model.safetensors"), load_file(tmp_path / "last.safetensors")
    assert all(torch.equal(saved_best[k], v) for k, v in task.state_dict().items()), "the task holds the best"
    # last.safetensors holds the task's (best) weights exactly when the last epoch is the best
    assert all(torch.equal(saved_last[k], v) for k, v in task.state_dict().items()) == (best == 3)
    assert trainer.validate(task, tiny_data)["val_acc"] == pytest.approx(metrics[best]["val_acc"])


def test_keep_last_model_and_val_loss_metric(tiny_data, tmp_path):
    _, task, metrics = finetune(tiny_data, tmp_path, "no_freeze", max_epochs=3, metric_for_best="val_loss",
                                load_best_model_at_end=False)
    best = min(metrics, key=lambda m: m["val_loss"])["epoch"]
    assert [m["epoch"] for m in metrics if m.get("best")][-1] == best
    assert read_metadata(tmp_path / "model.safetensors")["training"]["epoch"] == best
    last = load_file(tmp_path / "last.safetensors")
    assert all(torch.equal(last[k], v) for k, v in task.state_dict().items()), "the task holds the last epoch"


def test_early_stopping_stops_all_at_once_says_why_and_stays_stopped_on_resume(tiny_data, tmp_path, capsys):
    # lr 0: nothing improves after epoch 0, so patience 2 stops after epoch 2 of 6
    trainer, _, metrics = finetune(tiny_data, tmp_path, "no_freeze", max_epochs=6, lr=1e-12,
                                   early_stopping_patience=2, early_stopping_min_delta=0.01)
    assert [m["epoch"] for m in metrics] == [0, 1, 2]
    assert "early stopping after epoch 2: val_acc did not improve by more than 0.01 for 2 epoch(s)" in \
        trainer.run.stop_reason
    assert "training stopped: early stopping after epoch 2" in capsys.readouterr().out
    assert (tmp_path / "last.safetensors").is_file()
    _, _, resumed = finetune(tiny_data, tmp_path, "no_freeze", resume="latest", max_epochs=6, lr=1e-12,
                             early_stopping_patience=2, early_stopping_min_delta=0.01)
    assert [m["epoch"] for m in resumed] == [0, 1, 2], "a resumed run that had stopped trains no further"


def test_new_groups_ramp_up_and_layers_decay(tiny_data, tmp_path):
    """6 steps per epoch; the last layer joins at epoch 1 (step 6), the others at epoch 2 (step 12),
    each ramping over 1 epoch; with layer decay 0.5 each layer's lr is half its successor's."""
    probe = StopAt()
    finetune(tiny_data, tmp_path, UnfreezeMilestones((1, 2), num_layers=1), callbacks=[probe], max_epochs=4,
             scheduler="constant", unfreeze_warmup_epochs=1.0, layer_decay=0.5)
    head, joined = 1e-2, 1e-2 / 100  # a group the strategy adds: head lr / initial_denom_lr (100 by default)
    assert probe.lrs[1] == [head]
    # layer4 (distance 1 from the head): that lr x 0.5, ramped (k+1)/7 over the 6 steps after it joins
    for k in range(6):
        assert probe.lrs[7 + k][1] == pytest.approx(joined * 0.5 * min(1, (k + 2) / 7))
    assert probe.lrs[12][1] == pytest.approx(joined * 0.5)
    # the rest joins at step 12 as one group per layer: conv1+bn1, layer1, layer2, layer3 (distances 5..2)
    after = probe.lrs[24]
    assert len(after) == 6 and after[0] == head
    assert after[2:] == pytest.approx([joined * 0.5 ** d for d in (5, 4, 3, 2)])
    first_step = probe.lrs[13]
    assert first_step[2:] == pytest.approx([joined * 0.5 ** d * 2 / 7 for d in (5, 4, 3, 2)])


@pytest.mark.parametrize("stop_at", [8, 12])
def test_resume_around_the_unfreeze_is_exact_with_ramp_decay_best_and_patience(tiny_data, tmp_path, stop_at):
    """Interrupted during the ramp after the unfreeze (step 8) or at an epoch's last step (12), then
    resumed from the last checkpoint: the same weights, lrs, best epoch and early-stopping state."""
    settings = dict(max_epochs=4, save_every_n_steps=1, keep_last=2, unfreeze_warmup_epochs=1.5, layer_decay=0.7,
                    early_stopping_patience=3)
    strategy = UnfreezeMilestones((1, 2), num_layers=2)
    reference_probe = StopAt()
    finetune(tiny_data, tmp_path / "reference", strategy, callbacks=[reference_probe], **settings)
    with pytest.raises(Interrupt):
        finetune(tiny_data, tmp_path / "resumed", UnfreezeMilestones((1, 2), num_layers=2),
                 callbacks=[StopAt(stop_at)], **settings)
    probe = StopAt()
    trainer, _, metrics = finetune(tiny_data, tmp_path / "resumed", UnfreezeMilestones((1, 2), num_layers=2),
                                   callbacks=[probe], resume="latest", **settings)
    assert trainer.run.resumed_from.name == f"step-{stop_at - 1:08d}"
    assert min(probe.lrs) == stop_at, "the resumed run starts at the step after its checkpoint"
    assert all(probe.lrs[s] == reference_probe.lrs[s] for s in probe.lrs)
    for name in ("model.safetensors", "last.safetensors"):
        ours, theirs = load_file(tmp_path / "resumed" / name), load_file(tmp_path / "reference" / name)
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), name
    reference = [json.loads(line) for line in (tmp_path / "reference" / "metrics.jsonl").read_text().splitlines()]
    logged = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    drop = ("images_per_s", "epoch_time_s")
    assert [{k: v for k, v in m.items() if k not in drop} for m in logged] == \
        [{k: v for k, v in m.items() if k not in drop} for m in reference]
    assert [m["epoch"] for m in metrics] == [0, 1, 2, 3]


@pytest.mark.parametrize("metric", ["val_acc", "val_loss"])
def test_a_non_finite_validation_is_never_an_improvement(metric):
    """NaN compares as neither better nor worse: a NaN val_loss beside an equal val_acc was taken as
    the new best (and its weights saved as model.safetensors)."""
    records = [{"epoch": 0, "val_acc": 0.5, "val_loss": 1.0}, {"epoch": 1, "val_acc": 0.5, "val_loss": float("nan")},
               {"epoch": 2, "val_acc": float("nan"), "val_loss": 0.5}]
    best, stopping, run = select(metric, records)
    assert [bool(r.get("best")) for r in records] == [True, False, False] and best.best["epoch"] == 0
    assert stopping.best_epoch == 0 and run.stop_reason.startswith("early stopping after epoch 2")


@pytest.mark.parametrize("metric", ["val_acc", "val_loss"])
def test_an_exact_tie_keeps_the_earlier_epoch_and_equal_accuracies_go_by_the_loss(metric):
    """The best model: epoch 1 ties epoch 0 exactly, not an improvement (the earlier model stays the best);
    epoch 2 has epoch 0's accuracy and a lower loss, better under both metrics."""
    records = [{"epoch": 0, "val_acc": 0.5, "val_loss": 1.0}, {"epoch": 1, "val_acc": 0.5, "val_loss": 1.0},
               {"epoch": 2, "val_acc": 0.5, "val_loss": 0.75}]
    best, _, _ = select(metric, records)
    assert [bool(r.get("best")) for r in records] == [True, False, True] and best.best["epoch"] == 2


def select(metric: str, records: list[dict]):
    """(BestModel, EarlyStopping with patience 2, the run) after ``records`` were validated in turn, in one process."""
    from types import SimpleNamespace

    from dist_finetune.model_selection import BestModel, EarlyStopping

    run = SimpleNamespace(task=torch.nn.Linear(1, 1), output_dir=None, accelerator=SimpleNamespace(num_processes=1),
                          stop_reason=None)
    trainer = SimpleNamespace(announce=lambda message: None)
    best, stopping = BestModel(metric), EarlyStopping(patience=2, metric=metric)
    for record in records:
        best.on_validation_end(trainer, run, record)
        stopping.on_validation_end(trainer, run, record)
    return best, stopping, run


class ScoreEpochs(Callback):
    """Sets each epoch's val_acc before model selection reads it, so which epoch is best is known in advance."""

    def __init__(self, scores: dict[int, float]):
        self.scores = scores

    def on_validation_end(self, trainer, run, record: dict) -> None:
        record["val_acc"] = self.scores[record["epoch"]]


def equal_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def test_a_best_epoch_chosen_before_a_resume_is_found_from_another_output_dir_or_none(tiny_data, tmp_path):
    """Epoch 0 is the best; the run stops in epoch 1 and is resumed from its checkpoint into another output
    dir, and into none: each ends holding epoch 0's weights (the first run's model.safetensors); the other
    output dir gets that file and its report names epoch 0."""
    scores = {0: 1.0, 1: 0.0}
    with pytest.raises(Interrupt):
        finetune(tiny_data, tmp_path / "first", "no_freeze", callbacks=[ScoreEpochs(scores), StopAt(9)],
                 max_epochs=2, save_every_n_steps=1)
    checkpoint = str(tmp_path / "first" / "checkpoints" / "step-00000008")
    best = load_file(tmp_path / "first" / "model.safetensors")
    _, task, _ = finetune(tiny_data, tmp_path / "other", "no_freeze", callbacks=[ScoreEpochs(scores)],
                          resume=checkpoint, max_epochs=2)
    assert equal_weights(task.state_dict(), best)
    assert equal_weights(load_file(tmp_path / "other" / "model.safetensors"), best)
    assert read_metadata(tmp_path / "other" / "model.safetensors")["training"]["epoch"] == 0
    assert json.loads((tmp_path / "other" / "report.json").read_text())["model"]["epoch"] == 0
    seed_everything(0)
    task = ImageClassifier(tiny_data.num_classes, backbone=BACKBONE, pretrained=False)
    tiny_trainer(max_epochs=2, callbacks=[ScoreEpochs(scores)]).finetune(task, tiny_data, "no_freeze",
                                                                         resume=checkpoint)
    assert equal_weights(task.state_dict(), best)


@pytest.mark.parametrize("resume_at, recovered", [("step-00000006", True), ("step-00000008", False)])
def test_a_model_file_of_an_abandoned_continuation_is_never_taken_for_the_best(tiny_data, tmp_path, resume_at,
                                                                                recovered):
    """A finished run's model.safetensors holds epoch 1; resumed from an older checkpoint whose best is epoch 0
    (and whose epoch 1 does worse), that file is moved aside and the run ends with epoch 0's weights when the
    checkpoint is epoch 0's end (model.safetensors holds them again); from mid-epoch 1 they are nowhere: it
    says so and ends with the last epoch's weights, which its report names."""
    settings = dict(max_epochs=2, save_every_n_steps=1, keep_last=12)
    finetune(tiny_data, tmp_path, "no_freeze", callbacks=[ScoreEpochs({0: 0.0, 1: 1.0})], **settings)
    assert read_metadata(tmp_path / "model.safetensors")["training"]["epoch"] == 1
    epoch_0_end = load_file(tmp_path / "checkpoints" / "step-00000006" / "model.safetensors")
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        _, task, _ = finetune(tiny_data, tmp_path, "no_freeze", callbacks=[ScoreEpochs({1: -1.0})],
                              resume=str(tmp_path / "checkpoints" / resume_at), **settings)
    not_found = [str(w.message) for w in warned if "was chosen before the resume" in str(w.message)]
    report = json.loads((tmp_path / "report.json").read_text())["model"]
    replaced = list(tmp_path.glob("model.replaced-*.safetensors"))
    assert len(replaced) == 1 and read_metadata(replaced[0])["training"]["epoch"] == 1
    if recovered:
        assert not not_found and report == {"epoch": 0, "weights": "best"}
        assert equal_weights(task.state_dict(), epoch_0_end)
        assert equal_weights(load_file(tmp_path / "model.safetensors"), epoch_0_end)
        assert read_metadata(tmp_path / "model.safetensors")["training"]["epoch"] == 0
    else:
        assert len(not_found) == 1 and "the run ends with the last epoch's weights" in not_found[0]
        assert report == {"epoch": 1, "weights": "last"} and not (tmp_path / "model.safetensors").exists()
        assert equal_weights(task.state_dict(), load_file(tmp_path / "last.safetensors"))


class KeepMeasured(Callback):
    """Copies the measured val_acc to ``measured_val_acc`` before :class:`ScoreEpochs` replaces it."""

    def on_validation_end(self, trainer, run, record: dict) -> None:
        record["measured_val_acc"] = record["val_acc"]


@pytest.fixture(scope="module")
def best_in_the_middle(tiny_data, tmp_path_factory):
    """One 3-epoch run whose epochs score 0.5, 1.0, 0.25: epoch 1 is kept, neither the first nor the last."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("best_in_the_middle")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        trainer, task, metrics = finetune(tiny_data, out, "no_freeze", max_epochs=3,
                                          callbacks=[KeepMeasured(), ScoreEpochs({0: 0.5, 1: 1.0, 2: 0.25})])
    return trainer, task, metrics, out, printed.getvalue()


def header(path) -> dict:
    """The run metadata in a safetensors header, read without the package."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return json.loads(handle.metadata()["dist_finetune"])


def test_save_checkpoint_writes_the_best_epochs_weights(best_in_the_middle):
    trainer, _, _, out, _ = best_in_the_middle
    trainer.save_checkpoint(out / "saved.safetensors")
    saved = load_file(out / "saved.safetensors")
    end_of_epoch_1 = load_file(out / "checkpoints" / "step-00000012" / "model.safetensors")  # 6 steps per epoch
    assert equal_weights(saved, end_of_epoch_1)
    assert not equal_weights(saved, load_file(out / "last.safetensors"))
    assert header(out / "saved.safetensors")["num_classes"] == 3


def test_model_file_headers_record_their_epoch_and_its_metrics(best_in_the_middle):
    _, _, metrics, out, _ = best_in_the_middle
    assert header(out / "model.safetensors")["training"] == {"epoch": 1, "val_acc": 1.0,
                                                             "val_loss": metrics[1]["val_loss"]}
    assert header(out / "last.safetensors")["training"] == {"epoch": 2, "val_acc": 0.25,
                                                            "val_loss": metrics[2]["val_loss"]}


def test_printed_epoch_lines_mark_each_new_best_and_the_end_names_the_kept_epoch(best_in_the_middle):
    _, _, metrics, out, printed = best_in_the_middle
    lines = [line for line in printed.splitlines() if re.match(r"epoch \d+: train_loss ", line)]
    assert [int(line.split(":")[0].split()[1]) for line in lines] == [0, 1, 2]
    assert [line.endswith("*best*") for line in lines] == [True, True, False]
    assert [m.get("best", False) for m in metrics] == [True, True, False]
    assert all(f"val_acc {acc:.3f}" in line for line, acc in zip(lines, (0.5, 1.0, 0.25)))
    ends = [line for line in printed.splitlines() if line.startswith("best epoch ")]
    assert len(ends) == 1, printed
    end = ends[0]
    assert end.startswith("best epoch 1 (val_acc 1.0000") and str(out / "model.safetensors") in end
    assert "last epoch 2" in end and end.endswith("the task now holds epoch 1's weights")


def test_trainer_evaluate_and_predict_use_the_kept_model(best_in_the_middle, tiny_data, image_folders):
    trainer, task, metrics, _, _ = best_in_the_middle
    report = trainer.evaluate(task, tiny_data)
    assert (report["num_images"], report["classes"]) == (12, ["blue", "green", "red"])
    assert report["accuracy"] == pytest.approx(metrics[1]["measured_val_acc"])  # epoch 1's, as validated then
    labels = trainer.predict(task, str(image_folders / "val"))
    assert len(labels) == 12 and set(labels.values()) <= {"blue", "green", "red"}
    right = sum(Path(path).parent.name == label for path, label in labels.items())
    assert right / 12 == pytest.approx(report["accuracy"])
    one = sorted(labels)[0]
    assert trainer.predict(task, one) == labels[one] and trainer.predict(task, [one, one]) == [labels[one]] * 2


def test_equal_val_acc_goes_to_the_lower_val_loss():
    from types import SimpleNamespace

    from dist_finetune.model_selection import BestModel

    run = SimpleNamespace(task=torch.nn.Linear(1, 1), output_dir=None)
    selection = BestModel("val_acc")
    records = [{"epoch": 0, "val_acc": 0.5, "val_loss": 1.0}, {"epoch": 1, "val_acc": 0.5, "val_loss": 0.8},
               {"epoch": 2, "val_acc": 0.5, "val_loss": 0.9}, {"epoch": 3, "val_acc": 0.75, "val_loss": 2.0},
               {"epoch": 4, "val_acc": 0.75, "val_loss": 2.0}]
    for record in records:
        selection.on_validation_end(SimpleNamespace(), run, record)
    assert [bool(r.get("best")) for r in records] == [True, True, False, True, False]
    assert selection.best == {"epoch": 3, "val_acc": 0.75, "val_loss": 2.0}
