"""Masked autoencoder pretraining (He et al., "Masked Autoencoders Are Scalable Vision Learners").

The encoder is the ``create_backbone`` ViT wrapped in ``MaskedViT`` (state-dict prefix
``encoder.vit.``), the decoder an ``MAEDecoder`` (prefix ``decoder.``). Optimisation (AdamW, lr
scaled by global batch / 256, per-step warm-up + cosine, no weight decay on biases and 1-D tensors,
as the reference) comes from ``ScheduledModule``. ``tests/methods/test_golden_mae.py`` replays 8 reference
training steps.
"""
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from ssl_vit.checkpoints.format import CHECKPOINT_KEY, stage_metadata
from ssl_vit.losses.mae import denormalize_patches, mae_loss
from ssl_vit.methods.base import ScheduledModule
from ssl_vit.methods.options import check_options, check_some_visible
from ssl_vit.models.backbone import PosEmbed, Stem, create_backbone
from ssl_vit.models.mae_decoder import MAEDecoder
from ssl_vit.models.masked_vit import MaskedViT
from ssl_vit.models.patches import patchify, unpatchify
from ssl_vit.models.speed import configure_blocks

_REQUIRED_WITHOUT_ARCH = ("patch_size", "embed_dim", "depth", "num_heads")


def mae_backbone_spec(
    arch: Optional[str],
    img_size: Optional[int] = None,
    patch_size: Optional[int] = None,
    in_chans: int = 3,
    embed_dim: Optional[int] = None,
    depth: Optional[int] = None,
    num_heads: Optional[int] = None,
    mlp_ratio: Optional[float] = None,
    pos_embed: PosEmbed = "sincos",
    stem: Stem = "patch",
) -> Tuple[str, Dict[str, Any]]:
    """The ``create_backbone`` name and keyword arguments of an MAE encoder.

    Explicit sizes override those the name implies. Without a name, ``patch_size``, ``embed_dim``,
    ``depth`` and ``num_heads`` are required and the name becomes ``vit_base_patch<P>`` with every
    size overridden (``create_backbone`` accepts any size under any ``vit_*`` name). The encoder
    uses the fixed 2-D sin-cos position embedding (the reference) unless ``pos_embed`` says
    otherwise; ``stem`` is recorded only when it is not the patchify convolution.
    """
    sizes = dict(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio)
    kwargs: Dict[str, Any] = {k: v for k, v in sizes.items() if v is not None}
    if arch is None:
        missing = [k for k in _REQUIRED_WITHOUT_ARCH if k not in kwargs]
        if missing:
            raise ValueError(f"MAE without `arch` needs explicit {', '.join(missing)} (or give arch, e.g. vit_base_patch16)")
        arch = f"vit_base_patch{patch_size}"
    kwargs["in_chans"] = in_chans
    kwargs["pos_embed"] = pos_embed
    if stem != "patch":
        kwargs["stem"] = stem
    return arch, kwargs


class MAE(ScheduledModule):
    """Masked autoencoder LightningModule.

    The architecture is ``arch`` (a ``create_backbone`` name such as ``vit_base_patch16`` or
    ``vit_tiny_patch4_32``) with any of the explicit size arguments overriding it; with
    ``arch=None`` the sizes are all explicit, as in the reference ``MaskedAutoencoderViT``.

    Args:
        arch: ``create_backbone`` name, or ``None`` to give every size explicitly.
        img_size: image side the position embeddings are built for (other sizes are resampled).
        patch_size: patch side ``p``.
        in_chans: image channels ``C``.
        embed_dim: encoder width.
        depth: encoder blocks.
        num_heads: encoder attention heads.
        decoder_embed_dim: decoder width.
        decoder_depth: decoder blocks.
        decoder_num_heads: decoder attention heads.
        mlp_ratio: MLP width / block width, encoder (overrides ``arch``) and decoder (4 when unset).
        norm_pix_loss: regress per-patch normalised pixels.
        mask_ratio: fraction of patches hidden from the encoder during training.
        drop_path_rate: stochastic depth of the encoder (training only; not stored as backbone metadata).
        base_lr, lr, min_lr, warmup_epochs, weight_decay, weight_decay_end, betas: see ``ScheduledModule``.
        wd_exempt_tokens: keep ``cls_token`` and ``mask_token`` from weight decay (the reference
            decays them: only biases and 1-D tensors are exempt).
        compile_blocks: ``torch.compile`` every encoder and decoder block (GPU runs; see
            ``ssl_vit.models.speed``).
        grad_checkpointing: recompute the encoder's blocks in backward (activation memory of ViT-L/H).
        pos_embed: the encoder's position embedding (``create_backbone``): ``"sincos"`` (the
            reference), ``"learn"``, ``"factorized"``, ``"none"``, ``"rope"`` (the rotation of each
            visible patch's own position) or ``"rel_bias"`` (the bias between the visible patches).
            The decoder keeps its own fixed sin-cos embedding.
        stem: ``"patch"`` or ``"conv"`` (Xiao et al.). The conv stem runs on the whole image before
            masking, so a visible token's receptive field (31 px at patch 16) reaches into masked
            neighbours: the task gets easier near visible patches (the targets are unchanged).

    Batches are ``(images, labels)``; ``images`` is ``[B, C, H, W]`` or a list of views, of which
    only the first is used. Labels are ignored.
    """

    BACKBONES = {"encoder": "encoder.vit"}
    EVAL_BACKBONE = "encoder"

    def __init__(
        self,
        arch: Optional[str] = "vit_base_patch16",
        img_size: Optional[int] = None,
        patch_size: Optional[int] = None,
        in_chans: int = 3,
        embed_dim: Optional[int] = None,
        depth: Optional[int] = None,
        num_heads: Optional[int] = None,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: Optional[float] = None,
        norm_pix_loss: bool = False,
        mask_ratio: float = 0.75,
        drop_path_rate: float = 0.0,
        base_lr: float = 1.5e-4,
        lr: Optional[float] = None,
        min_lr: float = 0.0,
        warmup_epochs: float = 40.0,
        weight_decay: float = 0.05,
        weight_decay_end: Optional[float] = None,
        betas: Sequence[float] = (0.9, 0.95),
        wd_exempt_tokens: bool = False,
        compile_blocks: bool = False,
        grad_checkpointing: bool = False,
        pos_embed: PosEmbed = "sincos",
        stem: Stem = "patch",
    ) -> None:
        super().__init__(
            base_lr=base_lr, lr=lr, min_lr=min_lr, warmup_epochs=warmup_epochs,
            weight_decay=weight_decay, weight_decay_end=weight_decay_end, betas=betas, wd_exempt_tokens=wd_exempt_tokens,
        )
        self.save_hyperparameters()
        # a mask_ratio of 0 would leave no masked patch to learn from
        check_options("MAE", self.hparams, dict(mask_ratio="(0, 1)", drop_path_rate="[0, 1]", mlp_ratio="(0, inf)"))
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.backbone_arch, self.backbone_kwargs = mae_backbone_spec(
            arch, img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, pos_embed, stem
        )
        vit = create_backbone(self.backbone_arch, drop_path_rate=drop_path_rate, **self.backbone_kwargs)
        check_some_visible(mask_ratio, vit.patch_embed.num_patches)
        self.encoder = MaskedViT(vit)
        self.decoder = MAEDecoder(
            embed_dim=vit.embed_dim,
            grid_size=tuple(vit.patch_embed.grid_size),
            patch_size=self.encoder.patch_size,
            in_chans=in_chans,
            decoder_embed_dim=decoder_embed_dim,
            depth=decoder_depth,
            num_heads=decoder_num_heads,
            mlp_ratio=4.0 if mlp_ratio is None else mlp_ratio,
            num_prefix_tokens=vit.num_prefix_tokens,
        )
        self.reset_parameters()
        configure_blocks(vit, compile_blocks, grad_checkpointing, extra_blocks=self.decoder.blocks)

    def reset_parameters(self) -> None:
        """The reference initialisation: Xavier-uniform linear layers (the patch embedding seen as
        one), zero biases, tokens ~ N(0, 0.02); fixed position embeddings stay as they are."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        proj = self.encoder.vit.patch_embed.proj.weight
        nn.init.xavier_uniform_(proj.data.view(proj.shape[0], -1))
        vit = self.encoder.vit
        for token in (getattr(vit, "cls_token", None), getattr(vit, "reg_token", None), self.decoder.mask_token):
            if token is not None:
                nn.init.normal_(token, std=0.02)

    @property
    def patch_size(self) -> int:
        return self.encoder.patch_size

    # -- model ------------------------------------------------------------------------------------
    def forward(
        self, images: torch.Tensor, mask_ratio: Optional[float] = None, noise: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mask, encode, decode and score.

        Args:
            images: ``[B, C, H, W]``.
            mask_ratio: defaults to the module's ``mask_ratio``.
            noise: optional ``[B, L]`` masking scores (lowest stay visible).

        Returns:
            ``loss`` (scalar), predictions ``[B, L, p*p*C]`` in grid order, ``mask`` ``[B, L]`` (1 = masked).
        """
        pred, mask = self._predict(images, self.mask_ratio if mask_ratio is None else mask_ratio, noise)
        loss = mae_loss(pred, patchify(images, self.patch_size), mask, self.norm_pix_loss)
        return loss, pred, mask

    def _predict(
        self, images: torch.Tensor, mask_ratio: float, noise: Optional[torch.Tensor]
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        tokens, ids_keep, mask, grid = self.encoder(images, mask_ratio, noise)  # [B, P + K, D]
        return self.decoder(tokens, ids_keep, grid), mask  # [B, L, p*p*C], [B, L]

    @torch.no_grad()
    def reconstruct(
        self, images: torch.Tensor, mask_ratio: float = 0.75, noise: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Decoder predictions for every patch (normalised ones if ``norm_pix_loss``), without
        gradients and in the module's current train/eval mode.

        Args:
            images: ``[B, C, H, W]``.
            mask_ratio: fraction hidden from the encoder, in ``[0, 1)``.
            noise: optional ``[B, L]`` masking scores, for a reproducible mask.

        Returns:
            predictions ``[B, L, p*p*C]`` in grid order and ``mask`` ``[B, L]`` (1 = masked).
        """
        return self._predict(images, mask_ratio, noise)

    def predictions_to_images(self, pred: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Turn predictions into images, un-normalising ``norm_pix_loss`` predictions with the
        statistics of the true patches (as the reference visualisation does).

        Args:
            pred: ``[B, L, p*p*C]`` from :meth:`reconstruct`.
            images: the input images ``[B, C, H, W]``.

        Returns:
            ``[B, C, H, W]`` in the input's (normalised) colour space.
        """
        p = self.patch_size
        if self.norm_pix_loss:
            pred = denormalize_patches(pred.float(), patchify(images.float(), p))
        return unpatchify(pred, p, (images.shape[-2] // p, images.shape[-1] // p))

    # -- training -----------------------------------------------------------------------------------
    @staticmethod
    def batch_images(batch: Any) -> torch.Tensor:
        """The images of an ``(images, labels)`` batch; of a list of views, the first."""
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TypeError(f"MAE expects (images, labels) batches, got {type(batch).__name__}")
        images = batch[0]
        if isinstance(images, (tuple, list)):
            images = images[0]
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            raise TypeError(f"MAE expects images [B, C, H, W], got {getattr(images, 'shape', type(images))}")
        return images

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images = self.batch_images(batch)
        loss, _, _ = self(images)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=images.shape[0])
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images = self.batch_images(batch)
        loss, _, _ = self(images)
        self.log("val/loss", loss, on_epoch=True, sync_dist=True, batch_size=images.shape[0])
        return loss

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = stage_metadata(self, "mae", self.backbone_arch, self.backbone_kwargs)
