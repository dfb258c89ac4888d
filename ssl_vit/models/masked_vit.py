"""Random patch masking around a timm Vision Transformer, by wrapping it (not subclassing it).

``MaskedViT(vit)`` runs the ViT's own modules (``patch_embed``, ``blocks``, ``norm``...) on the prefix
tokens (CLS, registers) plus a random subset of the patch tokens, the MAE encoder. The wrapped
model keeps its ``vit.*`` parameter names, so the same weights load into MAE, DINO, probes and
fine-tuning with ``strict=True``. Only public timm attributes are used: ``patch_embed``,
``cls_token``, ``reg_token``, ``pos_embed``, ``num_prefix_tokens``, ``no_embed_class``,
``pos_drop``, ``norm_pre``, ``blocks``, ``norm`` (those a family lacks, e.g. ``VisionTransformerRelPos``'s
``reg_token``, count as absent). RoPE and relative-bias backbones (``ssl_vit.models.rel_pos``) get
the rotation or bias of the visible tokens passed to their blocks.
"""
from typing import Optional, Tuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ssl_vit.models.pos_embed import position_embedding
from ssl_vit.models.rel_pos import block_kwargs


def random_masking(
    num_patches: int, batch_size: int, mask_ratio: float, device: torch.device, noise: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Choose, per sample, which patches stay visible: the ``int(L * (1 - mask_ratio))`` (the
    reference's count, rounded down) with the smallest noise (uniform noise unless given). Runs on ``device`` without a host sync.

    Args:
        num_patches: ``L``.
        batch_size: ``B``.
        mask_ratio: fraction of patches to hide, in ``[0, 1)``.
        device: where the indices live (the device of the tokens).
        noise: optional ``[B, L]`` scores replacing the uniform noise (tests, fixed visualisations).

    Returns:
        ``ids_keep`` ``[B, K]`` (long, ascending: visible patches stay in grid order) and ``mask``
        ``[B, L]`` (float, 1 = masked, 0 = visible).
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    num_keep = int(num_patches * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(batch_size, num_patches, device=device)
    elif tuple(noise.shape) != (batch_size, num_patches):
        raise ValueError(f"noise must have shape {(batch_size, num_patches)}, got {tuple(noise.shape)}")
    noise = noise.to(device)
    ids_shuffle = noise.argsort(dim=1)  # [B, L] patches by increasing noise
    rank = ids_shuffle.argsort(dim=1)  # [B, L] rank of each patch's noise
    mask = (rank >= num_keep).float()  # [B, L]
    ids_keep = ids_shuffle[:, :num_keep].sort(dim=1).values  # [B, K]
    return ids_keep, mask


class MaskedViT(nn.Module):
    """MAE encoder: a timm ``VisionTransformer`` that sees only the visible patches.

    Args:
        vit: the backbone (e.g. from ``ssl_vit.models.backbone.create_backbone``: a timm
            ``VisionTransformer``, or ``Eva`` for RoPE); its patch embedding may return NHWC
            (``dynamic_img_size=True``) or NLC tokens.
    """

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        patch_drop = getattr(vit, "patch_drop", None)
        if patch_drop is not None and not isinstance(patch_drop, nn.Identity):
            raise ValueError("MaskedViT does its own masking: build the backbone with patch_drop_rate=0")
        self.vit = vit

    @property
    def patch_size(self) -> int:
        height, width = self.vit.patch_embed.patch_size
        if height != width:
            raise ValueError(f"ssl_vit needs square patches, this backbone has {height}x{width}")
        return height

    @property
    def num_prefix_tokens(self) -> int:
        return self.vit.num_prefix_tokens

    def embed(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, Tuple[int, int]]:
        """Patch tokens and prefix tokens, each with its position embedding added.

        Args:
            images: ``[B, C, H, W]``, any size the patch embedding accepts.

        Returns:
            ``patches`` ``[B, L, D]``, ``prefix`` ``[B, P, D]`` (CLS then registers) and the patch grid
            ``(h, w)`` with ``h * w == L``.
        """
        vit = self.vit
        x = vit.patch_embed(images)
        if x.ndim == 4:  # NHWC (dynamic_img_size)
            batch, rows, cols, dim = x.shape
            grid = (rows, cols)
            x = x.reshape(batch, rows * cols, dim)  # [B, L, D]
        else:  # NLC
            grid = tuple(vit.patch_embed.grid_size)
            if grid[0] * grid[1] != x.shape[1]:
                grid = tuple(vit.patch_embed.dynamic_feat_size(images.shape[-2:]))
        batch = x.shape[0]
        tokens = [getattr(vit, name, None) for name in ("cls_token", "reg_token")]
        prefix = [t.expand(batch, -1, -1) for t in tokens if t is not None]
        prefix = torch.cat(prefix, dim=1) if prefix else x.new_zeros(batch, 0, x.shape[-1])  # [B, P, D]
        found = position_embedding(vit, grid)
        if found is not None:
            pos, num_pos_prefix = found  # [1, P' + L, D]
            x = x + pos[:, num_pos_prefix:]
            if num_pos_prefix:
                prefix = prefix + pos[:, :num_pos_prefix]
        return x, prefix, grid

    def forward(
        self, images: torch.Tensor, mask_ratio: float = 0.0, noise: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Tuple[int, int]]:
        """Encode the prefix tokens and a random subset of the patches.

        With ``mask_ratio=0`` and no noise the output equals ``vit.forward_features(images)``.

        Args:
            images: ``[B, C, H, W]``.
            mask_ratio: fraction of patches hidden from the encoder, in ``[0, 1)``.
            noise: optional ``[B, L]`` masking scores (see :func:`random_masking`).

        Returns:
            ``tokens`` ``[B, P + K, D]`` after the final norm (prefix tokens first, then the visible
            patches in grid order), ``ids_keep`` ``[B, K]``, ``mask`` ``[B, L]`` (1 = masked) and the
            patch grid ``(h, w)``.
        """
        patches, prefix, grid = self.embed(images)  # [B, L, D], [B, P, D]
        batch, num_patches, dim = patches.shape
        if mask_ratio == 0.0 and noise is None:
            ids_keep = torch.arange(num_patches, device=patches.device).expand(batch, -1)  # [B, L]
            mask = patches.new_zeros(batch, num_patches, dtype=torch.float32)
            visible = patches
        else:
            ids_keep, mask = random_masking(num_patches, batch, mask_ratio, patches.device, noise)
            visible = patches.gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))  # [B, K, D]
        masked = not (mask_ratio == 0.0 and noise is None)
        kwargs = block_kwargs(self.vit, grid, ids_keep if masked else None, batch)  # RoPE / relative bias
        x = getattr(self.vit, "pos_drop", nn.Identity())(torch.cat([prefix, visible], dim=1))  # [B, P + K, D]
        x = getattr(self.vit, "norm_pre", nn.Identity())(x)
        if getattr(self.vit, "grad_checkpointing", False) and torch.is_grad_enabled():
            for block in self.vit.blocks:  # vit.set_grad_checkpointing(): recompute in backward
                x = checkpoint(block, x, use_reentrant=False, **kwargs)
        else:
            for block in self.vit.blocks:
                x = block(x, **kwargs)
        x = self.vit.norm(x)
        return x, ids_keep, mask, grid
