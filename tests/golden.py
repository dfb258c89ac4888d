"""Replaying the reference training steps of ``../shared/golden/`` through ssl_vit (see its README).

The files record 8 complete steps of facebookresearch/dino ``train_one_epoch`` and facebookresearch/mae
``engine_pretrain.train_one_epoch`` (CPU, fp32, 4 epochs x 2 iterations): every input, schedule value,
loss and the final weights. The helpers here build the ssl_vit module with the same settings and its
defaults, load the reference initial weights, and run the stored batches through a real
``Trainer.fit``. Tests skip (with the reason) when the folder is absent.
"""
import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Tuple

import pytest
import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ssl_vit.methods.dino import DINO
from ssl_vit.methods.mae import MAE

GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "golden"
STEPS, EPOCHS, STEPS_PER_EPOCH = 8, 4, 2


def load_golden(name: str) -> Dict[str, Any]:
    """The golden file ``name`` (``dino_step.pth`` / ``mae_step.pth``) with ``config`` parsed; skips
    the calling test when the file is absent."""
    path = GOLDEN / name
    if not path.is_file():
        pytest.skip(f"{path} is absent: the golden-step tests need ../shared/golden beside the checkout")
    golden = torch.load(path, map_location="cpu", weights_only=True)
    golden["config"] = json.loads(golden["config_json"])
    return golden


def decode(codes: Tensor) -> Tensor:
    """uint8 codes -> the float32 images the reference was fed (exact: k / 64)."""
    return (codes.to(torch.float32) - 128) / 64


class _Steps(Dataset):
    """One pre-collated batch per item; ``batch_size=None`` hands them over as they are. The batches of
    the trainer's current epoch are served (the dataloader is reloaded every epoch)."""

    def __init__(self, batches: List[Any]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> Any:
        return self.batches[i]


class GoldenData(pl.LightningDataModule):
    """Serves the stored batches of step ``2 * epoch + i`` in epoch ``epoch``."""

    def __init__(self, batches: List[Any], batch_size: int) -> None:
        super().__init__()
        self.batches, self.batch_size = batches, batch_size

    def train_dataloader(self) -> DataLoader:
        epoch = self.trainer.current_epoch
        chunk = self.batches[STEPS_PER_EPOCH * epoch: STEPS_PER_EPOCH * (epoch + 1)]
        return DataLoader(_Steps(chunk), batch_size=None, shuffle=False)


class Recorder(pl.Callback):
    """Per step: the loss, the centre after the loss (DINO), and, as the optimiser is about to step
    (callbacks run before the module's hook, so gradients are not yet clipped): the lr of the first
    group, the weight decay of the decayed group, the per-tensor gradient norms, and DINO's teacher
    temperature and EMA momentum."""

    def __init__(self) -> None:
        self.losses: List[float] = []
        self.centers: List[Tensor] = []
        self.lr: List[float] = []
        self.wd: List[float] = []
        self.grad_norms: List[Dict[str, float]] = []
        self.teacher_temp: List[float] = []
        self.momentum: List[float] = []

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        groups = optimizer.param_groups
        self.lr.append(groups[0]["lr"])
        self.wd.append(max(g["weight_decay"] for g in groups))
        self.grad_norms.append({n: float(p.grad.norm()) for n, p in module.named_parameters() if p.grad is not None})
        if isinstance(module, DINO):
            self.teacher_temp.append(module.current_teacher_temp())
            self.momentum.append(float(module.momentum_schedule[module.global_step]))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"].detach()))
        center = getattr(getattr(module, "loss", None), "center", None)
        if isinstance(center, Tensor):
            self.centers.append(center.detach().clone())


def fit(module: pl.LightningModule, batches: List[Any], batch_size: int) -> Recorder:
    """``Trainer.fit`` over the 8 stored steps (4 epochs x 2), CPU, fp32, one thread."""
    recorder = Recorder()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=EPOCHS, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, reload_dataloaders_every_n_epochs=1,
        callbacks=[recorder], num_sanity_val_steps=0, deterministic=True,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer.fit(module, datamodule=GoldenData(batches, batch_size))
    finally:
        torch.set_num_threads(threads)
    assert trainer.global_step == STEPS
    return recorder


# -- DINO ---------------------------------------------------------------------------------------------
def dino_module(config: Mapping[str, Any], **overrides: Any) -> DINO:
    """The golden DINO setting with ssl_vit's defaults for everything the setting does not fix."""
    kwargs: Dict[str, Any] = dict(
        arch="vit_tiny_patch16", img_size=config["img_size"], patch_size=config["patch_size"],
        embed_dim=config["embed_dim"], depth=config["depth"], num_heads=config["num_heads"],
        drop_path_rate=config["drop_path_rate"], out_dim=config["out_dim"],
        head_hidden_dim=config["head_hidden_dim"], head_bottleneck_dim=config["head_bottleneck_dim"],
        head_nlayers=config["head_nlayers"], head_use_bn=config["use_bn_in_head"],
        norm_last_layer=config["norm_last_layer"], student_temp=config["student_temp"],
        warmup_teacher_temp=config["warmup_teacher_temp"], teacher_temp=config["teacher_temp"],
        warmup_teacher_temp_epochs=config["warmup_teacher_temp_epochs"],
        momentum_teacher=config["momentum_teacher"], center_momentum=config["center_momentum"],
        freeze_last_layer=config["freeze_last_layer"], clip_grad=config["clip_grad"],
        base_lr=config["lr"], min_lr=config["min_lr"], warmup_epochs=config["warmup_epochs"],
        weight_decay=config["weight_decay"], weight_decay_end=config["weight_decay_end"],
    )
    kwargs.update(overrides)
    return DINO(**kwargs)


def dino_batches(golden: Mapping[str, Any]) -> List[Tuple[List[Tensor], Tensor]]:
    """Step s: ``([global 0, global 1, local 0..3], labels)``."""
    batches = []
    for step in range(STEPS):
        crops = [decode(c) for c in golden["inputs_global"][step]] + [decode(c) for c in golden["inputs_local"][step]]
        batches.append((crops, torch.zeros(crops[0].shape[0], dtype=torch.long)))
    return batches


def run_dino(golden: Mapping[str, Any], **overrides: Any) -> Tuple[DINO, Recorder]:
    from ssl_vit.checkpoints.dino import dino_reference_to_ssl_vit

    module = dino_module(golden["config"], **overrides)
    state = dino_reference_to_ssl_vit(golden["student_init"], golden["teacher_init"], golden["center"][0] * 0)
    module.load_state_dict(state, strict=True)
    recorder = fit(module, dino_batches(golden), golden["config"]["batch_size_per_gpu"])
    return module, recorder


def key_bias_rows(key: str, tensor: Tensor) -> slice:
    """Rows of ``attn.qkv.bias`` that hold the key bias (rounding noise only: see the golden README)."""
    dim = tensor.shape[0] // 3
    return slice(dim, 2 * dim) if key.endswith("attn.qkv.bias") else slice(0, 0)


def max_differences(ours: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> Dict[str, float]:
    """Largest absolute difference per key, the key-bias rows of ``attn.qkv.bias`` excluded."""
    out = {}
    for key, ref in reference.items():
        diff = (ours[key].detach().double() - ref.double()).abs()
        rows = key_bias_rows(key, ref)
        if rows.stop:
            diff[rows] = 0
        out[key] = float(diff.max())
    return out


# -- MAE ----------------------------------------------------------------------------------------------
class NoiseMAE(MAE):
    """MAE whose masking noise comes with the batch (``(images, labels, noise)``), as the reference
    run's recorded ``torch.rand``; everything else is ssl_vit's ``MAE``."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        images, _, noise = batch
        loss, _, _ = self(images, noise=noise)
        return loss


def mae_module(config: Mapping[str, Any], **overrides: Any) -> MAE:
    kwargs: Dict[str, Any] = dict(
        arch=None, img_size=config["img_size"], patch_size=config["patch_size"], embed_dim=config["embed_dim"],
        depth=config["depth"], num_heads=config["num_heads"], decoder_embed_dim=config["decoder_embed_dim"],
        decoder_depth=config["decoder_depth"], decoder_num_heads=config["decoder_num_heads"],
        mlp_ratio=config["mlp_ratio"], norm_pix_loss=config["norm_pix_loss"], mask_ratio=config["mask_ratio"],
        base_lr=config["blr"], min_lr=config["min_lr"], warmup_epochs=config["warmup_epochs"],
        weight_decay=config["weight_decay"],
    )
    kwargs.update(overrides)
    return NoiseMAE(**kwargs)


def run_mae(golden: Mapping[str, Any], **overrides: Any) -> Tuple[MAE, Recorder]:
    from ssl_vit.checkpoints.mae import reference_to_ssl_vit_key

    module = mae_module(golden["config"], **overrides)
    module.load_state_dict({reference_to_ssl_vit_key(k): v for k, v in golden["init"].items()}, strict=True)
    batches = [(decode(golden["images"][s]), torch.zeros(8, dtype=torch.long), golden["noise"][s]) for s in range(STEPS)]
    recorder = fit(module, batches, golden["config"]["batch_size"])
    return module, recorder
