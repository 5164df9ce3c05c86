"""``tiny_vit``: a timm VisionTransformer at 32 px (patch 16, width 16, one block, 2 heads), registered through
the public ``register_backbone`` hook, for the LoRA tests of the ViT family: one block's linears are qkv
16->48, proj 16->16, fc1 16->32 and fc2 32->16. Imported by the tests and the processes they launch."""

from __future__ import annotations

from timm.models.vision_transformer import VisionTransformer

from dist_finetune.backbones import Backbone, BackboneError, load_backbone_weights, read_state_dict, register_backbone

WIDTH = 16


@register_backbone("tiny_vit")
def build_tiny_vit(pretrained: bool, weights: str | None) -> Backbone:
    module = VisionTransformer(img_size=32, patch_size=16, embed_dim=WIDTH, depth=1, num_heads=2, mlp_ratio=2.0,
                               num_classes=0)
    if weights is not None:
        load_backbone_weights(module, read_state_dict(weights), ("head.",), weights)
    elif pretrained:
        raise BackboneError("tiny_vit has no pretrained weights: pass pretrained=False or a weights file")
    return Backbone(name="tiny_vit", module=module, num_features=WIDTH,
                    layer_names=[["cls_token", "pos_embed", "patch_embed"], ["blocks.0", "norm"]],
                    fixed_image_size=32, is_convnet=False)
