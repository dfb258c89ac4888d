"""Finetuning: real Trainer steps from pretrained weights and from scratch, layer-wise lr decay
scales against the MAE reference formula, and the finetuning augmentation."""
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from ssl_vit.checkpoints.format import backbone_metadata
from ssl_vit.methods.finetune import Finetune, FinetuneTransform
from ssl_vit.methods.schedules import cosine_schedule
from ssl_vit.models.backbone import create_backbone

TINY = dict(embed_dim=32, depth=2, num_heads=2)
ARCH = "vit_tiny_patch4_16"


class Data(pl.LightningDataModule):
    def __init__(self, n=20, batch_size=5, num_classes=3):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.set = TensorDataset(torch.randn(n, 3, 16, 16, generator=g), torch.arange(n) % num_classes)
        self.batch_size, self.num_classes = batch_size, num_classes

    def train_dataloader(self):
        return DataLoader(self.set, batch_size=self.batch_size)

    def val_dataloader(self):
        return DataLoader(self.set, batch_size=self.batch_size)


def mae_reference_scale(name: str, depth: int, decay: float) -> float:
    """facebookresearch/mae ``lr_decay.param_groups_lrd``: layer 0 = embeddings, i + 1 = block i,
    depth + 1 = everything after the blocks; scale = decay ** (depth + 1 - layer)."""
    if name.split(".")[0] in ("cls_token", "pos_embed", "patch_embed"):
        layer = 0
    elif name.startswith("blocks."):
        layer = int(name.split(".")[1]) + 1
    else:
        layer = depth + 1
    return decay ** (depth + 1 - layer)


def mae_checkpoint(tmp_path) -> str:
    torch.manual_seed(0)
    encoder = create_backbone(ARCH, pos_embed="sincos", **TINY)
    meta = backbone_metadata("mae", ARCH, {**TINY, "pos_embed": "sincos"}, {"encoder": "encoder.vit."}, "encoder")
    torch.save({"state_dict": {f"encoder.vit.{k}": v for k, v in encoder.state_dict().items()}, "ssl_vit": meta}, tmp_path / "mae.ckpt")
    return str(tmp_path / "mae.ckpt")


def test_finetune_steps_with_layer_decay_scales(tmp_path):
    decay, lr = 0.5, 1e-3
    module = Finetune(weights=mae_checkpoint(tmp_path), num_classes=3, layer_decay=decay, lr=lr, warmup_epochs=1, drop_path_rate=0.1)
    assert module.backbone.global_pool == "avg" and module.backbone.pos_embed.requires_grad
    start = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=Data())  # 4 batches of 5: odd batches lose one sample to mixup pairing
    assert torch.isfinite(trainer.callback_metrics["train/loss_epoch"])
    assert "val/top1" in trainer.callback_metrics and "val/top5" in trainer.callback_metrics
    names = {id(p): n for n, p in module.named_parameters()}
    (optimizer,) = trainer.optimizers
    step_lr = float(cosine_schedule(lr, 1e-6, 8, 4)[7])  # lr at the last step (global step 7)
    seen = set()
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            seen.add(name)
            expected = 1.0 if name.startswith("head.") else mae_reference_scale(name.removeprefix("backbone."), 2, decay)
            assert group["lr_scale"] == pytest.approx(expected), name
            assert group["lr"] == pytest.approx(step_lr * expected), name
            no_decay = p.ndim <= 1 or name.endswith(("pos_embed", "cls_token"))
            assert (group["weight_decay"] == 0) == no_decay, name
    assert seen == set(names.values())  # every parameter is optimised, pos_embed included
    for key in ("backbone.blocks.0.attn.qkv.weight", "backbone.pos_embed", "head.weight"):
        assert not torch.equal(module.state_dict()[key], start[key]), key


def test_finetune_from_scratch_without_mixup_and_checkpoint_metadata(tmp_path):
    module = Finetune(arch=ARCH, backbone_kwargs=TINY, mixup=0, cutmix=0, lr=1e-3, warmup_epochs=0, global_pool="token")
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, max_steps=2, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=Data())
    assert module.mixup_fn is None and module.head.out_features == 3
    trainer.save_checkpoint(tmp_path / "ft.ckpt")
    from ssl_vit.checkpoints.load import read_backbone

    loaded = read_backbone(tmp_path / "ft.ckpt")
    assert loaded.arch == ARCH and loaded.kwargs["global_pool"] == "token" and "drop_path_rate" not in loaded.kwargs
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(loaded.model(x), module.backbone.eval()(x))


def test_finetune_rejects_bad_arguments():
    with pytest.raises(ValueError, match="layer_decay must be in"):
        Finetune(arch=ARCH, backbone_kwargs=TINY, layer_decay=1.5)
    with pytest.raises(ValueError, match="give drop_path_rate as Finetune's own argument"):
        Finetune(arch=ARCH, backbone_kwargs={**TINY, "drop_path_rate": 0.2})


def test_finetune_transform_is_the_mae_augmentation():
    transform = FinetuneTransform(size=32)
    text = repr(transform)
    assert "RandAugment" in text and "RandomErasing" in text and "bicubic" in text.lower()
    image = Image.fromarray((torch.rand(40, 48, 3) * 255).byte().numpy())
    torch.manual_seed(0)
    a, b = transform(image), transform(image)
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32 and not torch.equal(a, b)
    assert transform(torch.randint(0, 256, (3, 40, 48), dtype=torch.uint8)).shape == (3, 32, 32)
    plain = FinetuneTransform(size=32, auto_augment=None, re_prob=0.0, hflip=0.0, scale=(1.0, 1.0))
    assert "RandAugment" not in repr(plain) and "RandomErasing" not in repr(plain)
