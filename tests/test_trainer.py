"""The loop's own choices, seen from outside: the rank check's points and its off switch, what runs compiled
(and a launch config's compile request taken over), the CPU allocator setting, label smoothing, gradient
accumulation (also resumed inside an accumulating epoch), bf16 autocast, a batch larger than the data."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_trainer, write_image_folder
from safetensors.torch import load_file
from test_finetuning import Recorder, new_task, plain_data  # noqa: F401  (plain_data: the fixture)

from dist_finetune import ImageClassificationData, ImageClassifier, Trainer
from dist_finetune import trainer as trainer_module
from dist_finetune.callbacks import Callback
from dist_finetune.distributed import launcher_compile_settings, make_accelerator
from dist_finetune.finetuning import FreezeUnfreeze


def finetune(tiny_data, **settings):
    trainer = tiny_trainer(max_epochs=2, **settings)
    trainer.finetune(ImageClassifier(3, "tiny_resnet", pretrained=False), tiny_data, ("freeze_unfreeze", 1))
    return trainer


@pytest.fixture(scope="module")
def compiled_run(tiny_data):
    """freeze_unfreeze at 1 over 2 epochs with ACCELERATE_DYNAMO_BACKEND set (accelerate launch --dynamo_backend)
    and compile=False: records every torch.compile call, every call of the compiled forward, every rank check."""
    seen = {"compiled": [], "calls": [], "checked": []}

    def fake_compile(model, backend=None, mode=None):
        seen["compiled"].append((backend, mode))
        return lambda images: seen["calls"].append(len(images)) or model(images)

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ACCELERATE_DYNAMO_BACKEND", "AOT_EAGER")
        patch.setattr(torch, "compile", fake_compile)
        patch.setattr(trainer_module, "check_rank_consistency", lambda accelerator, model, optimizer, where, averaged=None:
                      seen["checked"].append(where))
        seen["trainer"] = finetune(tiny_data)
    return seen


def test_the_rank_check_runs_after_each_transition_and_at_the_end(compiled_run):
    assert compiled_run["checked"] == ["after the strategy transition at epoch 1", "at the end of training"]


def test_the_rank_check_can_be_turned_off(tiny_data, monkeypatch):
    checked = []
    monkeypatch.setattr(trainer_module, "check_rank_consistency", lambda accelerator, model, optimizer, where, averaged=None:
                        checked.append(where))
    finetune(tiny_data, check_rank_consistency=False)
    assert checked == []


def test_a_launch_config_compile_request_compiles_training_only(compiled_run):
    """The trainer compiles the training forward itself with the launch config's backend; validation runs
    the uncompiled model."""
    assert compiled_run["compiled"] and set(compiled_run["compiled"]) == {("aot_eager", None)}
    assert compiled_run["calls"] == [4] * 12  # 2 epochs x 6 training batches of 4; none of validation's 12 images
    assert [record["val_images"] for record in compiled_run["trainer"].metrics] == [12, 12]


@pytest.mark.parametrize("tune, expected", [(True, 1), (False, 0)])
def test_cpu_runs_keep_freed_memory_unless_turned_off(monkeypatch, tune, expected):
    calls = []
    monkeypatch.setattr(trainer_module, "keep_freed_memory", lambda: calls.append(1) or "kept")
    Trainer(max_epochs=1, tune_cpu_allocator=tune)._make_accelerator()
    assert len(calls) == expected


def test_batch_larger_than_the_data_is_refused(tmp_path):
    root = write_image_folder(tmp_path / "train", per_class=2, size=16)
    data = ImageClassificationData.from_folders(str(root), val_split=0.5, image_size=16, batch_size=8, num_workers=0)
    with pytest.raises(ValueError, match="3 training images but one step needs batch_size 8"):
        tiny_trainer(max_epochs=1).finetune(ImageClassifier(3, "tiny_resnet", pretrained=False), data, "freeze")


def test_label_smoothing_is_the_training_loss(plain_data):
    """With an lr too small to move the weights, an epoch's train loss is the mean label-smoothed cross
    entropy of the initial model over the 24 training images, which differs from the plain one."""
    task = new_task()
    with torch.no_grad():  # confident logits, so that smoothing changes the loss clearly
        task.head.layers[-1].weight.mul_(50)
    dataset = plain_data.train_dataset(0)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    labels = torch.tensor([dataset[i][1] for i in range(len(dataset))])
    with torch.no_grad():
        logits = task.eval()(images)
    smoothed = F.cross_entropy(logits, labels, label_smoothing=0.3).item()
    assert abs(smoothed - F.cross_entropy(logits, labels).item()) > 100 * 1e-5 * smoothed  # 100x the tolerance
    metrics = tiny_trainer(max_epochs=1, lr=1e-12, label_smoothing=0.3).finetune(task, plain_data, "freeze")
    assert metrics[0]["train_loss"] == pytest.approx(smoothed, rel=1e-5)


def accumulated(data_root, batch_size: int, steps: int, epochs: int = 2, **settings):
    data = ImageClassificationData.from_folders(str(data_root / "train"), str(data_root / "val"), image_size=32,
                                                batch_size=batch_size, num_workers=0, augment=False)
    task = new_task()
    # contiguous layout: oneDNN's channels_last kernels depend on the batch size (see test_distributed_ranks)
    metrics = tiny_trainer(max_epochs=epochs, gradient_accumulation_steps=steps, channels_last=False,
                           load_best_model_at_end=False, **settings).finetune(task, data, ("freeze_unfreeze", 1))
    return task, metrics


def test_accumulating_two_batches_of_b_equals_one_batch_of_2b(image_folders):
    """Same samples per update in the same order (seeded sampler, no augmentation, BatchNorm frozen):
    equal up to float summation order, through the frozen epoch and the unfreeze."""
    accumulating, metrics = accumulated(image_folders, batch_size=2, steps=2)
    single, reference = accumulated(image_folders, batch_size=4, steps=1)
    for name, tensor in single.state_dict().items():
        assert torch.allclose(accumulating.state_dict()[name], tensor, atol=1e-5), name
    assert [m["train_loss"] for m in metrics] == pytest.approx([m["train_loss"] for m in reference], rel=1e-5)
    start = new_task().state_dict()["backbone.layer4.1.conv2.weight"]
    assert not torch.allclose(start, single.state_dict()["backbone.layer4.1.conv2.weight"]), "the backbone trained"


class StopAt(Callback):
    """Raises after optimizer step ``step`` (before it is saved): a crash in the middle of an epoch."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer, run) -> None:
        if run.position.global_step == self.step:
            raise KeyboardInterrupt(f"stopped after step {self.step}")


def test_resume_inside_an_accumulating_epoch_is_exact(tiny_data, tmp_path):
    """Batch 4 with 4 accumulation steps: 6 batches an epoch, so an update after batch 4 and a partial
    one after batch 6. Stopped after update 2 (the epoch's last), the run resumes from update 1 (batch 4,
    with augmentation on) and ends bit-identical to the uninterrupted run."""
    settings = {"max_epochs": 2, "gradient_accumulation_steps": 4, "save_every_n_steps": 1, "keep_last": 5}
    reference = new_task()
    tiny_trainer(output_dir=str(tmp_path / "reference"), **settings).finetune(reference, tiny_data,
                                                                             ("freeze_unfreeze", 1))
    with pytest.raises(KeyboardInterrupt):
        tiny_trainer(output_dir=str(tmp_path / "run"), callbacks=[StopAt(2)], **settings).finetune(
            new_task(), tiny_data, ("freeze_unfreeze", 1))
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-00000001"]
    recorder, resumed = Recorder(), new_task()
    metrics = tiny_trainer(output_dir=str(tmp_path / "run"), callbacks=[recorder], **settings).finetune(
        resumed, tiny_data, ("freeze_unfreeze", 1), resume="latest")
    assert recorder.start == (0, 4) and recorder.first_step == 2, "continued after batch 4, not from the start"
    assert [m["epoch"] for m in metrics] == [0, 1]
    for name, tensor in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name
    for name in ("model.safetensors", "last.safetensors"):  # the best epoch's file and the last one's
        saved, expected = load_file(tmp_path / "run" / name), load_file(tmp_path / "reference" / name)
        assert all(torch.equal(saved[k], expected[k]) for k in expected), name


def test_bf16_autocast_on_cpu_end_to_end(tiny_data, tmp_path):
    """mixed_precision="bf16" on the CPU: the training forward runs in bfloat16, the weights and the
    model file stay float32, and the saved model loads and predicts."""
    dtypes = set()
    task = new_task()
    task.head.layers[-1].register_forward_hook(lambda module, args, output: dtypes.add(output.dtype))
    metrics = tiny_trainer(max_epochs=2, mixed_precision="bf16", output_dir=str(tmp_path)).finetune(
        task, tiny_data, ("freeze_unfreeze", 1))
    assert torch.bfloat16 in dtypes
    assert all(math.isfinite(m["train_loss"]) and math.isfinite(m["val_loss"]) for m in metrics)
    loaded = ImageClassifier.load_from_checkpoint(tmp_path / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in loaded.state_dict().values() if t.is_floating_point())
    assert set(loaded.predict(tiny_data.val_paths)) <= set(tiny_data.classes)


def finetune_with_metrics(data, **settings) -> tuple[ImageClassifier, list[dict]]:
    torch.manual_seed(0)
    task = ImageClassifier(data.num_classes, "tiny_resnet", pretrained=False)
    metrics = tiny_trainer(max_epochs=2, **settings).finetune(task, data, FreezeUnfreeze(unfreeze_epoch=1))
    return task, metrics


def test_compiled_training_matches_eager_and_recompiles_at_the_unfreeze(tiny_data, tmp_path):
    eager, _ = finetune_with_metrics(tiny_data)
    torch._dynamo.reset()
    graphs_before = torch._dynamo.utils.counters["aot_autograd"]["ok"]
    compiled, metrics = finetune_with_metrics(tiny_data, compile=True, compile_backend="aot_eager", output_dir=str(tmp_path))
    assert torch._dynamo.utils.counters["aot_autograd"]["ok"] - graphs_before >= 2, "frozen and unfrozen graphs"
    a, b = eager.state_dict(), compiled.state_dict()
    assert a.keys() == b.keys()  # compiling never renames the checkpoint's keys
    worst = max((a[n].double() - b[n].double()).abs().max().item() for n in a if a[n].is_floating_point())
    assert worst < 1e-4, f"compiled vs eager max difference {worst}"
    assert metrics[1]["train_images"] == 24 and all(m["train_loss"] > 0 for m in metrics)
    reloaded = ImageClassifier.load_from_checkpoint(tmp_path / "model.safetensors")
    assert torch.equal(reloaded.state_dict()["head.layers.0.weight"], b["head.layers.0.weight"])


def test_a_launch_config_compile_request_is_taken_over(monkeypatch):
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "AOT_EAGER")
    monkeypatch.setenv("ACCELERATE_DYNAMO_MODE", "max-autotune")
    assert launcher_compile_settings() == ("aot_eager", "max-autotune")
    accelerator = make_accelerator()
    assert accelerator.state.dynamo_plugin.backend.value == "NO", "accelerate must not compile inside prepare"
    assert accelerator.non_blocking, "batches (pinned on GPU) are copied asynchronously"
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")
    assert launcher_compile_settings() is None
