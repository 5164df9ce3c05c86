"""Memory format never changes the math (issue 19, oneDNN#6035): on the CPU the runner trains
contiguous by default and gets float64's gradients; an explicit channels_last=True on a model oneDNN
gets wrong warns and trains contiguous. Anything that could crash in oneDNN runs in a subprocess
(``python tests/test_memory_format.py ...``), so a segfault fails one test instead of pytest, and the
gradient comparison runs again with ``DNNL_MAX_CPU_ISA=AVX2`` so the wrong-gradient case shows on
any x86 CPU, not only on AVX-512 ones (where the same models crash)."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from dist_finetune import ImageClassificationData, ImageClassifier, Trainer
from dist_finetune.callbacks import Callback
from dist_finetune.memory_format import channels_last_gradient_difference, resolve_channels_last

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# each built-in conv family at a small size, and the tests' backbone (a 1x1 stride-2 conv on 8 channels)
BACKBONES = ("tiny_resnet", "resnet18", "mobilenet_v3_small", "efficientnet_b0",
             *(["timm:efficientnet_lite0"] if importlib.util.find_spec("timm") else []))
IMAGE_SIZE, BATCH = 32, 8
# relative L2 distance from float64 that contiguous float32 meets here (measured on AVX-512 and AVX2:
# lite0 1.2e-4, the others 3.2e-5 at most); the old channels_last default was 3.0e-3 (tiny_resnet)
# and 3.2e-2 (lite0) off on both
FLOAT32_TOLERANCE = 6e-4  # 5x above the worst correct case, 5x below the least wrong one


def _without_dropout(task: nn.Module) -> None:
    """Dropout and stochastic depth off, so a float64 replay of the step draws nothing."""
    for module in task.modules():
        for attribute in ("p", "drop_prob", "drop_rate"):
            if isinstance(getattr(module, attribute, None), float):
                setattr(module, attribute, 0.0)


def _data(root: Path, seed: int = 0) -> ImageClassificationData:
    from conftest import write_image_folder

    write_image_folder(root / "train", per_class=3, seed=seed)  # 9 images: one step of 8 (drop_last)
    write_image_folder(root / "val", per_class=1, seed=seed + 1)
    return ImageClassificationData.from_folders(str(root / "train"), str(root / "val"), image_size=IMAGE_SIZE,
                                                batch_size=BATCH, num_workers=0)


class _FirstStep(Callback):
    """Hooks that record the runner's first training step: the model before it, its input batch, the
    loss gradient at the logits, and the parameter gradients the optimizer was about to apply."""

    def __init__(self, task: ImageClassifier):
        self.task, self.record = task, {}
        task.register_forward_pre_hook(self._before_forward)
        task.register_forward_hook(self._after_forward)

    def _before_forward(self, module, inputs):
        if torch.is_grad_enabled() and "model" not in self.record:
            images = inputs[0]
            self.record.update(model=copy.deepcopy(module), images=images.detach().clone(),
                               channels_last=not images.is_contiguous())

    def _after_forward(self, module, inputs, logits):
        if logits.requires_grad and "upstream" not in self.record:
            logits.register_hook(lambda gradient: self.record.setdefault("upstream", gradient.detach().clone()))

    def on_fit_start(self, trainer, run) -> None:
        run.optimizer.optimizer.register_step_pre_hook(self._before_step)

    def _before_step(self, optimizer, args, kwargs):
        self.record.setdefault("grads", {name: p.grad.detach().double().clone()
                                         for name, p in self.task.named_parameters() if p.grad is not None})

    def gradient_error(self) -> float:
        """Relative L2 distance of the step's gradients from the same step replayed in float64."""
        record = self.record
        reference = record["model"].double().to(memory_format=torch.contiguous_format)
        logits = reference(record["images"].double().contiguous() / 255)
        logits.backward(record["upstream"].double())
        expected = dict(reference.named_parameters())
        ours = torch.cat([grad.flatten() for grad in record["grads"].values()])
        theirs = torch.cat([expected[name].grad.flatten() for name in record["grads"]])
        return ((ours - theirs).norm() / theirs.norm()).item()


def one_step(backbone: str, root: Path, **settings) -> dict:
    """One training step through the runner's CPU path: its gradient error and memory format."""
    torch.manual_seed(0)
    task = ImageClassifier(3, backbone=backbone, pretrained=False, image_size=IMAGE_SIZE)
    _without_dropout(task)
    step = _FirstStep(task)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(max_epochs=1, progress_bar=False, seed=0, callbacks=[step], **settings).finetune(task, _data(root))
    messages = [str(w.message) for w in caught if "channels_last" in str(w.message)]
    return {"backbone": backbone, "error": step.gradient_error(), "channels_last": step.record["channels_last"],
            "warnings": messages}


def run_steps(tmp_path: Path, backbones, isa: str | None = None, **settings) -> dict[str, dict]:
    """:func:`one_step` per backbone in a subprocess; a oneDNN crash fails the test, naming the backbone."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    if isa:
        env["DNNL_MAX_CPU_ISA"] = isa
    command = [sys.executable, __file__, str(tmp_path), json.dumps(settings), *backbones]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    results = {row["backbone"]: row for row in map(json.loads, filter(lambda line: line.startswith("{"),
                                                                      done.stdout.splitlines()))}
    crashed = next((backbone for backbone in backbones if backbone not in results), None)
    assert done.returncode == 0, f"{crashed} (DNNL_MAX_CPU_ISA={isa}) exited {done.returncode}: {done.stderr[-2000:]}"
    return results


@pytest.mark.parametrize("isa", [None, "AVX2"])
def test_default_cpu_path_gets_float64_gradients(tmp_path, isa):
    results = run_steps(tmp_path, BACKBONES, isa)
    for backbone, result in results.items():
        assert result["channels_last"] is False, backbone  # the CPU default is contiguous
        assert result["error"] < FLOAT32_TOLERANCE, result


def test_explicit_channels_last_on_a_crash_prone_model_warns_and_trains_contiguous(tmp_path):
    result = run_steps(tmp_path, ["tiny_resnet"], channels_last=True)["tiny_resnet"]
    assert result["channels_last"] is False
    assert result["error"] < FLOAT32_TOLERANCE
    assert len(result["warnings"]) == 1, result["warnings"]
    message = result["warnings"][0]
    assert "'backbone.layer2.0.downsample.0'" in message
    assert "oneDNN#6035" in message and "contiguous" in message


def test_explicit_channels_last_on_a_model_that_passes_the_check_is_honoured(tmp_path):
    result = run_steps(tmp_path, ["mobilenet_v3_small"], channels_last=True)["mobilenet_v3_small"]
    assert result["channels_last"] is True and result["warnings"] == []
    assert result["error"] < FLOAT32_TOLERANCE


def test_gradient_check_leaves_model_and_random_state_untouched():
    torch.manual_seed(0)
    task = ImageClassifier(3, backbone="mobilenet_v3_small", pretrained=False, image_size=IMAGE_SIZE)
    task.train()
    task.head.layers[0].weight.requires_grad_(False)
    before = {name: value.clone() for name, value in task.state_dict().items()}
    rng = torch.get_rng_state()
    difference = channels_last_gradient_difference(task, IMAGE_SIZE, 4)
    assert 0.0 <= difference < 1e-3
    assert torch.equal(torch.get_rng_state(), rng)
    after = task.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)  # weights and BN statistics
    assert all(p.grad is None for p in task.parameters())
    assert task.head.layers[0].weight.requires_grad is False and task.training
    assert all(p.is_contiguous() for p in task.parameters())


def test_automatic_choice_is_on_for_conv_nets_on_gpu_only():
    conv_net = ImageClassifier(3, backbone="tiny_resnet", pretrained=False, image_size=IMAGE_SIZE)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a device object; nothing runs on it
    assert resolve_channels_last(None, conv_net, cpu, IMAGE_SIZE, BATCH) is False
    assert resolve_channels_last(None, conv_net, cuda, IMAGE_SIZE, BATCH) is True
    assert resolve_channels_last(False, conv_net, cuda, IMAGE_SIZE, BATCH) is False
    assert resolve_channels_last(True, conv_net, cuda, IMAGE_SIZE, BATCH) is True  # cuDNN: no oneDNN check
    conv_net.is_convnet = False  # as for a ViT
    assert resolve_channels_last(None, conv_net, cuda, IMAGE_SIZE, BATCH) is False


def test_prediction_on_cpu_keeps_the_model_contiguous(image_folders):
    task = ImageClassifier(3, backbone="tiny_resnet", pretrained=False, image_size=IMAGE_SIZE)
    paths = sorted(str(p) for p in (image_folders / "val").rglob("*.png"))[:4]
    assert len(task.predict_with_scores(paths, batch_size=2, device="cpu")) == 4
    assert task.backbone.conv1.weight.is_contiguous()  # 3x3: channels_last would show in its strides


if __name__ == "__main__":  # one_step per backbone, in a process of its own: folder, settings (JSON), backbones
    sys.path.insert(0, str(HERE))
    import tiny_resnet  # noqa: F401  (registers the backbone)

    for name in sys.argv[3:]:
        print(json.dumps(one_step(name, Path(sys.argv[1]) / name.replace(":", "_"), **json.loads(sys.argv[2]))),
              flush=True)


def test_a_gradient_difference_alone_refuses_channels_last(monkeypatch):
    """A model with no crash-prone convolution whose gradients still differ (as resnet18's did at 64 px)."""
    from dist_finetune import memory_format

    model = ImageClassifier(3, backbone="mobilenet_v3_small", pretrained=False, image_size=IMAGE_SIZE)
    monkeypatch.setattr(memory_format, "channels_last_gradient_difference", lambda *args: 1e-2)
    with pytest.warns(UserWarning, match=r"channels_last=True ignored: its gradients in channels_last differ from "
                                         r"the contiguous ones by 1\.0e-02 .*contiguous layout"):
        assert resolve_channels_last(True, model, torch.device("cpu"), IMAGE_SIZE, BATCH) is False
    monkeypatch.setattr(memory_format, "channels_last_gradient_difference", lambda *args: float("nan"))
    with pytest.warns(UserWarning, match="differ from the contiguous ones by nan"):
        assert resolve_channels_last(True, model, torch.device("cpu"), IMAGE_SIZE, BATCH) is False


def test_weights_left_channels_last_train_contiguous_on_the_cpu(tmp_path):
    """A task whose weights an earlier GPU run or predict left channels_last trains contiguous here."""
    torch.manual_seed(0)
    task = ImageClassifier(3, backbone="tiny_resnet", pretrained=False, image_size=IMAGE_SIZE)
    task.to(memory_format=torch.channels_last)
    assert not task.backbone.conv1.weight.is_contiguous()  # 3x3 weights: the layout shows in the strides
    step = _FirstStep(task)
    Trainer(max_epochs=1, progress_bar=False, seed=0, callbacks=[step]).finetune(task, _data(tmp_path))
    assert step.record["channels_last"] is False
    assert all(p.is_contiguous() for p in task.parameters())
