"""The ChartCLIP image towers: small ViTs whose patch embeddings are convolutional, trained from scratch.

A plain ViT (one 32x32 linear patch embedding) trained from scratch does not learn candles in the training
budget once chart styles vary: its losses stay at chance. What makes a tower learn (measured with
bench/learnability.py, docs/model.md):
  * the input is standardized per image and channel, so a white, cream or black background and any candle
    palette reach the network at the same scale;
  * the patches are embedded by stride-2 stages of 3x3 convolutions (BatchNorm, ReLU), 224 px -> 7x7 tokens.
Two towers:
  * `chart_vit_s32_convstem` (ChartCLIP-S): one convolution per stage ("Early convolutions help transformers see
    better", Xiao et al. 2021), then six transformer blocks;
  * `chart_vit_s32_hybrid` (ChartCLIP-S-hybrid, the default): two convolutions per stage at 56, 28 and 14 px, as the
    hybrid ViT of Dosovitskiy et al. (2021) embeds its tokens with a ResNet, then two blocks. It learns about 1.7
    times as much per training step, at a lower step cost.
The token grid, the transformer blocks and the class-token readout are those of a ViT.

Registered as timm models so open_clip builds them from its model-config registry (`timm_model_name`).
"""

from __future__ import annotations

import torch
from timm.layers import PatchEmbed
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

from vlm_assets.model import CHARTCLIP_S, CHARTCLIP_S_HYBRID, IMAGE_TOWERS

# (in, out, convolutions) per stage; the first convolution of a stage has stride 2: 224 px -> 7x7 tokens.
TRUNK_STAGES = ((3, 16, 1), (16, 32, 2), (32, 64, 2), (64, 128, 2), (128, 256, 1))
STEM_STAGES = ((3, 16, 1), (16, 32, 1), (32, 64, 1), (64, 128, 1))  # the conv stem's, then one conv to the width


def conv_trunk(stages=TRUNK_STAGES) -> list[torch.nn.Module]:
    """Per-image standardization, then the stages' 3x3 convolutions, each with BatchNorm and ReLU."""
    layers: list[torch.nn.Module] = [torch.nn.InstanceNorm2d(stages[0][0])]
    for c_in, c_out, convolutions in stages:
        for i in range(convolutions):
            layers += [torch.nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, stride=2 if i == 0 else 1, padding=1,
                                       bias=False), torch.nn.BatchNorm2d(c_out), torch.nn.ReLU(inplace=True)]
    return layers


class ConvTrunkPatchEmbed(PatchEmbed):
    """PatchEmbed whose projection is `conv_trunk(stages)`: one token per patch, the trunk's last channels wide."""

    def __init__(self, img_size=224, patch_size=32, in_chans=3, embed_dim=256, bias=True, stages=TRUNK_STAGES,
                 **kwargs):
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                         bias=bias, **kwargs)
        reduction = 2 ** len(stages)
        if self.patch_size != (reduction, reduction):
            raise ValueError(f"the convolutional trunk reduces by {reduction}; patch_size {patch_size} does not match")
        if (stages[0][0], stages[-1][1]) != (in_chans, embed_dim):
            raise ValueError(f"the trunk maps {stages[0][0]} to {stages[-1][1]} channels; "
                             f"in_chans {in_chans} / embed_dim {embed_dim} do not match")
        self.proj = torch.nn.Sequential(*conv_trunk(stages))


class ConvStemPatchEmbed(PatchEmbed):
    """PatchEmbed whose projection is `conv_trunk(STEM_STAGES)` and a stride-2 convolution to the token width."""

    def __init__(self, img_size=224, patch_size=32, in_chans=3, embed_dim=256, bias=True, **kwargs):
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                         bias=bias, **kwargs)
        reduction = 2 ** (len(STEM_STAGES) + 1)
        if self.patch_size != (reduction, reduction):
            raise ValueError(f"the convolutional stem reduces by {reduction}; patch_size {patch_size} does not match")
        self.proj = torch.nn.Sequential(*conv_trunk(STEM_STAGES), torch.nn.Conv2d(
            STEM_STAGES[-1][1], embed_dim, 3, stride=2, padding=1, bias=bias))


def _chart_vit(name: str, pretrained: bool, depth: int, embed_layer, kwargs: dict) -> VisionTransformer:
    """Width 256, 4 heads, 7x7 tokens at 224 px; CLIP-style pre-norm and class-token readout."""
    if pretrained:
        raise ValueError(f"{name} has no pretrained weights: it is trained from scratch by the pipeline")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    settings = dict(img_size=224, patch_size=32, embed_dim=256, depth=depth, num_heads=4, mlp_ratio=4.0,
                    class_token=True, global_pool="token", pre_norm=True, num_classes=0, embed_layer=embed_layer)
    model = VisionTransformer(**(settings | kwargs))
    # open_clip's timm adapter reads default_cfg (normally set by timm's pretrained-weights machinery).
    model.pretrained_cfg = model.default_cfg = {"input_size": (3, settings["img_size"], settings["img_size"]),
                                                "num_classes": 0, "architecture": name}
    return model


@register_model
def chart_vit_s32_convstem(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ChartCLIP-S's tower: the conv stem and 6 blocks."""
    return _chart_vit(IMAGE_TOWERS[CHARTCLIP_S], pretrained, 6, ConvStemPatchEmbed, kwargs)


@register_model
def chart_vit_s32_hybrid(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ChartCLIP-S-hybrid's tower: the convolutional trunk and 2 blocks."""
    return _chart_vit(IMAGE_TOWERS[CHARTCLIP_S_HYBRID], pretrained, 2, ConvTrunkPatchEmbed, kwargs)
