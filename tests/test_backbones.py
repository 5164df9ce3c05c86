"""The backbone registry: every architecture builds offline, layers cover its weights, local weights load,
timm names with a pretrained tag."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from dist_finetune.backbones import BackboneError, available_backbones, build_backbone, layer_groups

# README, "Backbones": the torchvision architectures it lists, written out (not the registry's own list)
README_BACKBONES = ["resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v3_small", "mobilenet_v3_large",
                    "efficientnet_b0", "efficientnet_b3", "convnext_tiny", "vit_b_16"]
RESNET_LAYERS = [["conv1", "bn1"], ["layer1"], ["layer2"], ["layer3"], ["layer4"]]


def features_layers(count: int, last_extra: list[str]) -> list[list[str]]:
    return [[f"features.{i}"] for i in range(count - 1)] + [[f"features.{count - 1}", *last_extra]]


# README, "Layers": each architecture's blocks, input to output (torchvision's own module names)
README_LAYERS = {
    **{name: RESNET_LAYERS for name in ("resnet18", "resnet34", "resnet50", "resnet101")},
    "mobilenet_v3_small": features_layers(13, ["classifier.0"]),  # the pre-logits Linear joins the last
    "mobilenet_v3_large": features_layers(17, ["classifier.0"]),
    "efficientnet_b0": features_layers(9, []),
    "efficientnet_b3": features_layers(9, []),
    "convnext_tiny": [["features.0"], ["features.1"], ["features.2", "features.3"], ["features.4", "features.5"],
                      ["features.6", "features.7", "classifier.0"]],  # downsampling with its stage; final norm last
    "vit_b_16": [["class_token", "conv_proj", "encoder.pos_embedding"],
                 *[[f"encoder.layers.encoder_layer_{i}"] for i in range(11)], ["encoder.layers.encoder_layer_11",
                                                                               "encoder.ln"]],
}
# timm: the blocks of group_matcher(coarse=True), named by parameter; the top-level modules of each
README_TIMM_LAYERS = {"timm:resnet18": [{"conv1", "bn1"}, {"layer1"}, {"layer2"}, {"layer3"}, {"layer4"}]}


@pytest.mark.parametrize("name", sorted(set(available_backbones()) | set(README_BACKBONES))
                         + ["timm:resnet18", "timm:vit_tiny_patch16_224"])
def test_backbone_layers_partition_every_parameter(name):
    backbone = build_backbone(name, pretrained=False)
    if name in README_LAYERS:
        assert backbone.layer_names == README_LAYERS[name]
    if name in README_TIMM_LAYERS:
        assert [{n.split(".")[0] for n in names} for names in backbone.layer_names] == README_TIMM_LAYERS[name]
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
    assert set(README_BACKBONES) <= set(available_backbones())


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


def test_pretrained_weights_are_downloaded_once_into_torchvisions_cache(tmp_path, monkeypatch):
    """pretrained=True: the architecture's default weights, fetched into $TORCH_HOME/hub/checkpoints, read
    from there afterwards (the "download" writes a state dict whose conv1 is all 0.25)."""
    downloads = []
    published = torchvision.models.resnet18().state_dict()
    published["conv1.weight"].fill_(0.25)

    def download(url, destination, *args, **kwargs):
        downloads.append((url, destination))
        torch.save(published, destination)

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    for _ in range(2):
        backbone = build_backbone("resnet18", pretrained=True)
        assert torch.equal(backbone.module.conv1.weight, torch.full((64, 3, 7, 7), 0.25))
    url = "https://download.pytorch.org/models/resnet18-f37072fd.pth"  # torchvision's ResNet18_Weights.DEFAULT
    assert [(u, Path(d).parent) for u, d in downloads] == [(url, tmp_path / "torch" / "hub" / "checkpoints")]
    assert (tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth").is_file()


def test_timm_names_with_a_pretrained_tag_are_accepted():
    from dist_finetune.backbones import build_backbone

    assert build_backbone("timm:test_resnet.r160_in1k", pretrained=False).name == "timm:test_resnet.r160_in1k"
