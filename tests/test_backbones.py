"""The backbone registry: every architecture builds offline, layers cover its weights, local weights load."""

from __future__ import annotations

import urllib.error

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from dist_finetune.backbones import BackboneError, available_backbones, build_backbone, layer_groups

REQUIRED = ["resnet18", "resnet34", "resnet50", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0",
            "convnext_tiny", "vit_b_16"]


@pytest.mark.parametrize("name", available_backbones() + ["timm:resnet18", "timm:vit_tiny_patch16_224"])
def test_backbone_layers_partition_every_parameter(name):
    backbone = build_backbone(name, pretrained=False)
    groups = layer_groups(backbone.module, backbone.layer_names)
    ids = [id(p) for group in groups for p in group.parameters()]
    assert len(ids) == len(set(ids)), "a parameter is in two layers"
    assert set(ids) == {id(p) for p in backbone.module.parameters()}, "a parameter is in no layer"
    assert all(any(True for _ in group.parameters()) for group in groups), "a layer without parameters"
    size = backbone.fixed_image_size or 64
    backbone.module.eval()
    with torch.no_grad():
        features = backbone.module(torch.zeros(1, 3, size, size))
    assert features.shape == (1, backbone.num_features)


def test_required_architectures_are_registered():
    assert set(REQUIRED) <= set(available_backbones())


def test_unknown_backbone_lists_the_choices():
    with pytest.raises(BackboneError, match="resnet18"):
        build_backbone("resnet9000")


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_load_and_ignore_the_classifier(tmp_path, suffix):
    reference = torchvision.models.resnet18(weights=None)  # keys as torchvision names them, fc included
    path = tmp_path / f"resnet18{suffix}"
    state = reference.state_dict()
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    backbone = build_backbone("resnet18", weights=str(path))
    assert "fc.weight" not in backbone.module.state_dict()
    assert torch.equal(backbone.module.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)


def test_weights_of_another_architecture_are_refused(tmp_path):
    path = tmp_path / "mobilenet.safetensors"
    save_file(torchvision.models.mobilenet_v3_small(weights=None).state_dict(), path)
    with pytest.raises(BackboneError, match=r"do not fit this backbone: missing \["):
        build_backbone("resnet18", weights=str(path))
    with pytest.raises(BackboneError, match="does not exist"):
        build_backbone("resnet18", weights=str(tmp_path / "nope.pth"))


def test_failed_download_explains_the_offline_options(monkeypatch):
    def offline(url, *args, **kwargs):
        raise urllib.error.URLError(f"no network for {url}")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(BackboneError, match=r"--weights FILE.*pretrained=False"):
        build_backbone("resnet18", pretrained=True)


class Payload:
    """Pickles as a call to os.mkdir(marker): what a malicious .pth would run on a full unpickle."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.mkdir, (self.marker,)


def test_pth_weights_are_read_with_weights_only(tmp_path):
    """A .pth whose pickle calls a function is refused, and the function never runs."""
    marker = tmp_path / "payload_ran"
    path = tmp_path / "resnet18.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "evil": Payload(str(marker))}, path)
    with pytest.raises(BackboneError) as refused:
        build_backbone("resnet18", weights=str(path))
    assert not marker.exists(), "the pickle's code ran"
    assert f"cannot read weights file {path}" in str(refused.value)


def test_register_backbone_makes_a_name_usable_everywhere(tmp_path):
    """A backbone registered through the public decorator builds a task, trains, saves and loads by name."""
    from conftest import tiny_trainer, write_image_folder

    from dist_finetune import ImageClassificationData, ImageClassifier
    from dist_finetune.backbones import Backbone, register_backbone

    calls = []

    @register_backbone("test_registered_mlp")
    def build(pretrained, weights):
        calls.append((pretrained, weights))
        module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=4), torch.nn.AdaptiveAvgPool2d(1),
                                     torch.nn.Flatten(), torch.nn.Linear(4, 6))
        return Backbone(name="test_registered_mlp", module=module, num_features=6, layer_names=[["0"], ["3"]],
                        mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))

    assert "test_registered_mlp" in available_backbones()
    task = ImageClassifier(2, backbone="test_registered_mlp", pretrained=False)
    assert calls == [(False, None)] and [len(list(layer.parameters())) for layer in task.backbone_layers()] == [2, 2]
    root = write_image_folder(tmp_path / "train", classes=("a", "b"), per_class=4, size=16)
    data = ImageClassificationData.from_folders(str(root), val_split=0.25, image_size=16, batch_size=2,
                                                num_workers=0)
    strategy = ("unfreeze_milestones", ((0, 1), 1))
    tiny_trainer(max_epochs=2, output_dir=str(tmp_path / "out")).finetune(task, data, strategy)
    loaded = ImageClassifier.load_from_checkpoint(tmp_path / "out" / "model.safetensors")
    assert loaded.backbone_name == "test_registered_mlp" and loaded.mean.flatten().tolist() == [0.5, 0.5, 0.5]


@pytest.mark.parametrize("name", ["vit_b_16", "timm:vit_tiny_patch16_224"])
def test_vit_at_another_image_size_is_refused_before_training(tiny_data, name):
    from conftest import tiny_trainer

    from dist_finetune import ImageClassifier
    from dist_finetune.errors import ConfigError

    task = ImageClassifier(tiny_data.num_classes, backbone=name, pretrained=False)
    trainer = tiny_trainer(max_epochs=1)
    with pytest.raises(ConfigError, match=rf"backbone {name} takes 224px images .* image_size=32; use image_size=224"):
        trainer.finetune(task, tiny_data, "freeze")
    assert trainer.accelerator is None, "refused before anything was built"
