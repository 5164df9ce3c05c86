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
