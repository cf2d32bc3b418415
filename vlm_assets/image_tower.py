"""The ChartCLIP-S image tower: a small ViT whose patch embedding is a convolutional stem.

A plain ViT (one 32x32 linear patch embedding) trained from scratch does not learn candles in the training
budget once chart styles vary: its losses stay at chance. Two changes make it learn (measured, docs/model.md):
  * the input is standardized per image and channel, so a white, cream or black background and any candle
    palette reach the network at the same scale;
  * the 32x32 patches are embedded by four stride-2 3x3 convolutions (BatchNorm, ReLU) and a final stride-2
    convolution to the token width ("Early convolutions help transformers see better", Xiao et al. 2021).
The token grid (7x7 at 224 px), the transformer and the class-token readout are those of a ViT.

Registered as a timm model so open_clip builds it from its model-config registry (`timm_model_name`).
"""

from __future__ import annotations

import torch
from timm.layers import PatchEmbed
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

from vlm_assets.model import CHART_VIT

STEM_CHANNELS = (16, 32, 64, 128)


class ConvStemPatchEmbed(PatchEmbed):
    """PatchEmbed whose projection is per-image standardization plus a stride-2 convolution stack."""

    def __init__(self, img_size=224, patch_size=32, in_chans=3, embed_dim=256, bias=True, **kwargs):
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                         bias=bias, **kwargs)
        stages = len(STEM_CHANNELS) + 1
        if self.patch_size != (2 ** stages, 2 ** stages):
            raise ValueError(f"the convolutional stem reduces by {2 ** stages}; patch_size {patch_size} does not match")
        layers: list[torch.nn.Module] = [torch.nn.InstanceNorm2d(in_chans)]
        channels = (in_chans, *STEM_CHANNELS)
        for c_in, c_out in zip(channels, channels[1:]):
            layers += [torch.nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False),
                       torch.nn.BatchNorm2d(c_out), torch.nn.ReLU(inplace=True)]
        layers.append(torch.nn.Conv2d(channels[-1], embed_dim, 3, stride=2, padding=1, bias=bias))
        self.proj = torch.nn.Sequential(*layers)


@register_model
def chart_vit_s32_convstem(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """6 blocks, width 256, 4 heads, 7x7 tokens at 224 px; CLIP-style pre-norm and class-token readout."""
    if pretrained:
        raise ValueError(f"{CHART_VIT} has no pretrained weights: it is trained from scratch by the pipeline")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    settings = dict(img_size=224, patch_size=32, embed_dim=256, depth=6, num_heads=4, mlp_ratio=4.0,
                    class_token=True, global_pool="token", pre_norm=True, num_classes=0,
                    embed_layer=ConvStemPatchEmbed)
    model = VisionTransformer(**(settings | kwargs))
    # open_clip's timm adapter reads default_cfg (normally set by timm's pretrained-weights machinery).
    model.pretrained_cfg = model.default_cfg = {"input_size": (3, settings["img_size"], settings["img_size"]),
                                                "num_classes": 0, "architecture": CHART_VIT}
    return model
