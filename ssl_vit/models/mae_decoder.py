"""The MAE decoder: visible tokens + mask tokens -> pixel values of every patch.

Parameter names map one-to-one onto the facebookresearch/mae reference checkpoints::

    decoder_embed.*     -> embed.*          mask_token        -> mask_token
    decoder_pos_embed   -> pos_embed        decoder_blocks.N  -> blocks.N
    decoder_norm.*      -> norm.*           decoder_pred.*    -> pred.*
"""
from functools import partial
from typing import Tuple

import torch
from timm.models.vision_transformer import Block
from torch import nn

from ssl_vit.models.pos_embed import resample_pos_embed, sincos_2d


class MAEDecoder(nn.Module):
    """Lightweight Transformer that predicts the pixels of all patches (He et al., Sec. 3).

    Args:
        embed_dim: encoder width ``D``.
        grid_size: patch grid ``(h, w)`` the fixed position embedding is built for; other grids
            are served by resampling it.
        patch_size: side ``p`` of a patch.
        in_chans: image channels ``C``.
        decoder_embed_dim: decoder width ``Dd``.
        depth: number of Transformer blocks.
        num_heads: attention heads per block.
        mlp_ratio: MLP hidden width / ``Dd``.
        num_prefix_tokens: prefix tokens the encoder emits before the patches (1 for CLS); they
            get zero position embeddings and are dropped from the prediction.
    """

    def __init__(
        self,
        embed_dim: int,
        grid_size: Tuple[int, int],
        patch_size: int,
        in_chans: int = 3,
        decoder_embed_dim: int = 512,
        depth: int = 8,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_prefix_tokens: int = 1,
    ) -> None:
        super().__init__()
        if decoder_embed_dim % num_heads:
            raise ValueError(f"decoder_embed_dim={decoder_embed_dim} is not divisible by decoder_num_heads={num_heads}")
        self.grid_size = tuple(grid_size)
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.num_prefix_tokens = num_prefix_tokens
        self.embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.pos_embed = nn.Parameter(
            sincos_2d(decoder_embed_dim, self.grid_size, num_prefix_tokens), requires_grad=False
        )  # [1, P + h*w, Dd], fixed
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.Sequential(
            *[
                Block(dim=decoder_embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
                for _ in range(depth)
            ]
        )
        self.norm = norm_layer(decoder_embed_dim)
        self.pred = nn.Linear(decoder_embed_dim, patch_size * patch_size * in_chans)

    def forward(self, tokens: torch.Tensor, ids_keep: torch.Tensor, grid_size: Tuple[int, int]) -> torch.Tensor:
        """Predict every patch from the encoder's prefix and visible tokens.

        Args:
            tokens: encoder output ``[B, P + K, D]`` (prefix first, then the visible patches).
            ids_keep: grid index of each visible patch ``[B, K]``.
            grid_size: patch grid ``(h, w)`` of the images.

        Returns:
            ``[B, L, p * p * C]`` pixel predictions in grid order (``L = h * w``), layout ``(p, q, c)``.
        """
        x = self.embed(tokens)  # [B, P + K, Dd]
        batch, _, dim = x.shape
        num_patches = grid_size[0] * grid_size[1]
        prefix, visible = x[:, : self.num_prefix_tokens], x[:, self.num_prefix_tokens :]
        full = self.mask_token.to(x.dtype).expand(batch, num_patches, dim)  # [B, L, Dd]
        full = full.scatter(1, ids_keep.unsqueeze(-1).expand(-1, -1, dim), visible)  # visible at their place
        pos = resample_pos_embed(self.pos_embed, grid_size, self.grid_size, self.num_prefix_tokens)  # [1, P + L, Dd]
        x = torch.cat([prefix, full], dim=1) + pos
        x = self.blocks(x)
        x = self.norm(x)
        x = self.pred(x)  # [B, P + L, p*p*C]
        return x[:, self.num_prefix_tokens :]
