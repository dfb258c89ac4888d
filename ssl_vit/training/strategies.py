"""Fully sharded data parallel (FSDP) for large ViTs: a Lightning strategy that shards every
transformer block, as a recipe switch::

    ssl-vit fit --config recipes/mae/vit_huge_patch14_in1k.yaml --config recipes/strategies/fsdp.yaml
    ssl-vit fit --config ... --trainer.strategy '{"class_path": "ssl_vit.training.strategies.ViTFSDP",
                                                  "init_args": {"activation_checkpointing": true}}'

Each timm ``Block`` (encoder and MAE decoder) is its own FSDP unit, so at most one block's full
parameters exist at a time besides the root's (patch embedding, tokens, norms, heads); with
``activation_checkpointing`` each block's activations are recomputed in the backward pass. DINO's
``MultiCropNet`` (student and teacher) is a unit too, which gives the student's and the teacher's
parameters the same flat layout, so the teacher EMA (element-wise) pairs each shard of the student
with the same shard of the teacher.

What differs from DDP, and is handled here:

* ``ScheduledModule`` chooses weight decay by parameter shape (no decay for 1-D tensors). Under FSDP
  (``use_orig_params=True``) the parameters are flat 1-D shards outside forward, which would put every
  parameter in the no-decay group; the optimiser is therefore built while the full parameters are
  summoned (the same parameter objects, with their true shapes).
* Under ``bf16-mixed`` the blocks compute in bfloat16 but gradients are averaged and buffers kept
  in float32 (Lightning's default would reduce gradients and keep the DINO centre in bfloat16).
* Callbacks that run the model outside ``training_step`` (reconstructions, attention maps, k-NN)
  would call FSDP units on one rank only, or with sharded root parameters (the reconstruction
  callback fails with "weight should have at least three dimensions"): they are refused at start-up.
* DINO trains under FSDP exactly as under DDP (centre, EMA teacher) only with ``model.clip_grad: 0``
  (per-tensor clipping would clip each shard by the shard's norm) and ``model.freeze_last_layer: 0``
  (a parameter without optimiser state breaks FSDP's checkpoint of the optimiser); anything else is
  refused. The DINO recipes (ViT-S/B) fit in memory under DDP, which remains their strategy.

FSDP needs CUDA here: Lightning's ``FSDPStrategy`` hands ``device_id=root_device.index`` to
``torch.distributed.fsdp.FullyShardedDataParallel``, which is ``None`` on CPU, and torch then refuses
("FSDP needs a non-CPU accelerator device, but no accelerator device is detected"). The tests run the
same strategy on CPU with ``device_id=torch.device("cpu")`` (tests/fsdp_cpu.py).
"""
from typing import Literal, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import FSDPStrategy
from timm.models.vision_transformer import Block
from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecision

from ssl_vit.methods.dino import DINO
from ssl_vit.models.dino_head import MultiCropNet
from ssl_vit.training import KNNMonitor
from ssl_vit.viz import AttentionGalleryLogger, ReconstructionLogger

# Callbacks that call the module outside training_step (FSDP gathers parameters only inside it).
_MODEL_CALLING_CALLBACKS = (ReconstructionLogger, AttentionGalleryLogger, KNNMonitor)


class ViTFSDP(FSDPStrategy):
    """``FSDPStrategy`` wrapping each ViT ``Block`` (and DINO's ``MultiCropNet``) in its own unit.

    Args:
        activation_checkpointing: recompute each block's activations in the backward pass
            (saves most activation memory for about one more forward pass of compute).
        sharding_strategy: ``FULL_SHARD`` (parameters, gradients and optimiser state; ZeRO-3),
            ``SHARD_GRAD_OP`` (gradients and optimiser state; ZeRO-2), ``HYBRID_SHARD`` (full
            sharding within a node, replication across nodes) or ``NO_SHARD`` (DDP).
        state_dict_type: ``full``: checkpoints are one ordinary file assembled on rank 0 (what
            ``ssl_vit.load_backbone`` and every tool read); ``sharded``: a folder with one file per
            rank (faster to write for ViT-H and larger; convert before loading elsewhere).
        cpu_offload: keep parameters and gradients in CPU memory between uses.
    """

    def __init__(
        self,
        activation_checkpointing: bool = False,
        sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD"] = "FULL_SHARD",
        state_dict_type: Literal["full", "sharded"] = "full",
        cpu_offload: bool = False,
    ) -> None:
        super().__init__(
            auto_wrap_policy={Block, MultiCropNet},
            activation_checkpointing_policy={Block} if activation_checkpointing else None,
            sharding_strategy=sharding_strategy,
            state_dict_type=state_dict_type,
            cpu_offload=cpu_offload,
        )

    @property
    def mixed_precision_config(self) -> Optional[MixedPrecision]:
        """Lightning's config for the precision plugin, except that under ``bf16-mixed`` gradients
        are averaged and buffers (the DINO centre) kept in float32, as under DDP with autocast."""
        config = super().mixed_precision_config
        if config is not None and self.precision_plugin.precision == "bf16-mixed":
            return MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, buffer_dtype=torch.float32)
        return config

    def setup(self, trainer: "pl.Trainer") -> None:
        check_fsdp_compatible(trainer)
        super().setup(trainer)

    def setup_optimizers(self, trainer: "pl.Trainer") -> None:
        """Build the optimiser with the full parameters summoned, so that parameter groups that look
        at shapes (weight decay for >= 2-D tensors only) see the true shapes, not flat shards. The
        parameter objects are the same inside and outside the context."""
        with FullyShardedDataParallel.summon_full_params(self.model, writeback=False):
            super().setup_optimizers(trainer)


def check_fsdp_compatible(trainer: "pl.Trainer") -> None:
    """Raise ValueError for what does not work under FSDP: callbacks that run the model outside
    ``training_step``, DINO's per-tensor gradient clipping and its frozen last layer."""
    refused = [type(cb).__name__ for cb in trainer.callbacks if isinstance(cb, _MODEL_CALLING_CALLBACKS)]
    if refused:
        raise ValueError(
            f"ViTFSDP: the callbacks {refused} run the model outside training_step, where FSDP does not gather "
            "its parameters; remove them from trainer.callbacks and run them on a saved checkpoint "
            "(tools/visualize_mae.py, tools/export_attention.py, `ssl-vit validate` with a k-NN recipe)"
        )
    module = trainer.lightning_module
    if isinstance(module, DINO) and module.clip_grad > 0:
        raise ValueError(
            f"ViTFSDP: DINO clips each gradient tensor by its own norm (model.clip_grad={module.clip_grad}); under "
            "FSDP each rank holds a shard of each tensor and would clip it by the shard's norm. Set "
            "model.clip_grad: 0, or train DINO with the ddp strategy"
        )
    if isinstance(module, DINO) and module.freeze_last_layer > 0:
        raise ValueError(
            f"ViTFSDP: DINO's frozen last layer (model.freeze_last_layer={module.freeze_last_layer}) has no optimiser "
            "state while frozen, and FSDP cannot then assemble the optimiser state for a checkpoint (torch: "
            "'... is not in the optimizer state'). Set model.freeze_last_layer: 0, or train DINO with ddp"
        )
