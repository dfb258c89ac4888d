"""The convolutional stem of Xiao et al. 2021 ("Early Convolutions Help Transformers See Better") as a
timm patch embedding.

A ``P``-patch ViT gets ``log2(P)`` 3x3 stride-2 convolutions, each followed by BatchNorm and ReLU,
with channels doubling up to the width ``D`` (``D/8, D/4, D/2, D`` for ``P = 16``, the paper's
ViT_C-1GF/4GF plan), then a 1x1 convolution to ``D``: the same ``H/P x W/P`` token grid as the
patchify convolution. :class:`ConvStemEmbed` is a timm ``PatchEmbed`` (``embed_layer=`` of timm's
``VisionTransformer`` and ``VisionTransformerRelPos``): ``patch_size``, ``grid_size``, ``img_size``,
the size checks, dynamic sizes (NHWC output) and padding are timm's own; only ``proj`` differs, a
1x1 convolution that runs the 3x3 stack (``proj.stem``) first.
"""
import math
from typing import Any, Optional, Tuple, Union

import torch
from timm.layers import ConvNormAct, PatchEmbed, to_2tuple
from torch import nn


def stem_depth(patch_size: Union[int, Tuple[int, int]]) -> int:
    """``log2(P)``, the number of stride-2 convolutions of a ``P``-patch stem.

    Raises:
        ValueError: ``P`` is not a square power of two >= 4.
    """
    ph, pw = to_2tuple(patch_size)
    if ph != pw or ph < 4 or ph & (ph - 1):
        raise ValueError(
            f"stem='conv' needs a square patch size that is a power of two >= 4 (it stacks log2(P) stride-2 "
            f"convolutions), got {ph}x{pw}; use stem='patch' for this patch size"
        )
    return int(math.log2(ph))


def stem_channels(embed_dim: int, depth: int) -> Tuple[int, ...]:
    """Channels of the 3x3 convolutions: doubling up to ``embed_dim`` (Xiao et al.'s plan)."""
    return tuple(max(embed_dim >> (depth - 1 - i), 1) for i in range(depth))


class StemProjection(nn.Conv2d):
    """The stem's final 1x1 convolution to the width ``D``, running the 3x3 stack (``stem``) first,
    so that timm's ``PatchEmbed.forward`` drives the whole stem through ``proj``."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, bias: bool = True, **dd: Any) -> None:
        depth = stem_depth(patch_size)
        channels = stem_channels(embed_dim, depth)
        super().__init__(channels[-1], embed_dim, kernel_size=1, bias=bias, **dd)
        layers, width = [], in_chans
        for out in channels:  # conv 3x3 stride 2 (no bias) -> BatchNorm -> ReLU
            layers.append(ConvNormAct(width, out, kernel_size=3, stride=2, bias=False, norm_layer=nn.BatchNorm2d,
                                      act_layer=nn.ReLU, **dd))
            width = out
        self.stem = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, D, H/P, W/P]
        return super().forward(self.stem(x))


class ConvStemEmbed(PatchEmbed):
    """timm ``PatchEmbed`` with Xiao et al.'s convolutional stem in place of the patchify convolution.

    Takes ``PatchEmbed``'s arguments; ``in_chans`` is kept (``proj.in_channels`` is the stem's width).
    """

    def __init__(
        self,
        img_size: Optional[Union[int, Tuple[int, int]]] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        bias: bool = True,
        device: Any = None,
        dtype: Any = None,
        **kwargs: Any,
    ) -> None:
        stem_depth(patch_size)  # refuse before timm builds anything
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, bias=bias,
                         device=device, dtype=dtype, **kwargs)
        self.in_chans = in_chans
        self.proj = StemProjection(in_chans, embed_dim, self.patch_size, bias=bias, device=device, dtype=dtype)

    @classmethod
    def like(cls, embed: PatchEmbed, in_chans: int) -> "ConvStemEmbed":
        """A conv stem configured as the patch embedding ``embed`` (size, format, checks, padding, norm)."""
        stem = cls(
            img_size=embed.img_size, patch_size=embed.patch_size, in_chans=in_chans, embed_dim=embed.proj.out_channels,
            bias=embed.proj.bias is not None, flatten=embed.flatten,
            output_fmt=None if embed.flatten or embed.output_fmt == "NCHW" else embed.output_fmt,
            strict_img_size=embed.strict_img_size, dynamic_img_pad=embed.dynamic_img_pad,
            device=embed.proj.weight.device, dtype=embed.proj.weight.dtype,
        )
        stem.norm = embed.norm
        return stem

    def set_input_size(self, img_size: Any = None, patch_size: Any = None) -> None:
        if patch_size is not None and to_2tuple(patch_size) != self.patch_size:
            raise ValueError("a convolutional stem's patch size is its number of stride-2 convolutions: it cannot change")
        super().set_input_size(img_size=img_size)
