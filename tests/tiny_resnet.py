"""``tiny_resnet``: a ResNet-18-shaped backbone (same module names, 2 BasicBlocks per stage) with
widths 8-16-32-64, registered through the public ``register_backbone`` hook.

Tests train it instead of resnet18: the same structure (stem, layer1..layer4, BatchNorm,
downsampling) at 1/60 of the parameters, so steps and checkpoints cost milliseconds. Imported by
conftest.py and by the worker scripts that tests launch as separate processes.
"""

from __future__ import annotations

from torch import nn
from torchvision.models.resnet import BasicBlock

from dist_finetune.backbones import Backbone, BackboneError, load_backbone_weights, read_state_dict, register_backbone

WIDTHS = (8, 16, 32, 64)


class TinyResNet(nn.Module):
    def __init__(self, widths=WIDTHS):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        channels = widths[0]
        for index, width in enumerate(widths, start=1):
            stride = 1 if index == 1 else 2
            downsample = None
            if stride != 1 or channels != width:
                downsample = nn.Sequential(nn.Conv2d(channels, width, 1, stride=stride, bias=False),
                                           nn.BatchNorm2d(width))
            blocks = [BasicBlock(channels, width, stride, downsample), BasicBlock(width, width)]
            setattr(self, f"layer{index}", nn.Sequential(*blocks))
            channels = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features = channels

    def forward(self, images):
        x = self.relu(self.bn1(self.conv1(images)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.avgpool(x).flatten(1)


@register_backbone("tiny_resnet")
def build_tiny_resnet(pretrained: bool, weights: str | None) -> Backbone:
    module = TinyResNet()
    if weights is not None:
        load_backbone_weights(module, read_state_dict(weights), ("fc.",), weights)
    elif pretrained:
        raise BackboneError("tiny_resnet has no pretrained weights: pass pretrained=False or a weights file")
    return Backbone(name="tiny_resnet", module=module, num_features=module.num_features,
                    layer_names=[["conv1", "bn1"], ["layer1"], ["layer2"], ["layer3"], ["layer4"]])
