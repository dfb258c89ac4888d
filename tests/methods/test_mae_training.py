"""The MAE LightningModule: architecture arguments, gradients, learning, checkpoints."""
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from ssl_vit.checkpoints.format import CHECKPOINT_KEY
from ssl_vit.checkpoints.mae import load_mae
from ssl_vit.methods.mae import MAE
from ssl_vit.models.backbone import create_backbone
from ssl_vit.models.patches import patchify

TINY = dict(arch="vit_tiny_patch4_32", img_size=16, embed_dim=32, depth=1, num_heads=2,
            decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)


def smooth_images(n: int, size: int = 16) -> torch.Tensor:
    """Low-frequency images: masked patches are predictable from visible ones."""
    torch.manual_seed(0)
    coarse = torch.randn(n, 3, 4, 4)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def test_arch_with_overrides_and_explicit_sizes():
    model = MAE(arch="vit_small_patch8", img_size=32, depth=1, decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4)
    vit = model.encoder.vit
    assert (vit.embed_dim, len(vit.blocks), vit.blocks[0].attn.num_heads) == (384, 1, 6)  # small, depth overridden
    assert model.patch_size == 8 and tuple(vit.patch_embed.grid_size) == (4, 4)
    assert not vit.pos_embed.requires_grad and not model.decoder.pos_embed.requires_grad
    explicit = MAE(arch=None, img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    assert explicit.backbone_arch == "vit_base_patch4" and explicit.encoder.vit.embed_dim == 32
    # the recorded backbone spec rebuilds the same encoder
    rebuilt = create_backbone(explicit.backbone_arch, **explicit.backbone_kwargs)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in explicit.encoder.vit.state_dict().items()
    }
    with pytest.raises(ValueError, match="needs explicit patch_size, num_heads"):
        MAE(arch=None, embed_dim=32, depth=1)
    with pytest.raises(ValueError, match="mask_ratio"):
        MAE(**TINY, mask_ratio=1.0)
    with pytest.raises(ValueError, match="decoder_num_heads"):
        MAE(**{**TINY, "decoder_num_heads": 5})


def test_every_trainable_parameter_gets_a_gradient():
    model = MAE(**TINY, norm_pix_loss=True)
    loss, pred, mask = model(smooth_images(4))
    assert pred.shape == (4, 16, 48) and mask.sum() == 4 * 12
    loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert "encoder.vit.cls_token" in dict(trainable) and "decoder.mask_token" in dict(trainable)
    no_grad = [n for n, p in trainable if p.grad is None or p.grad.abs().sum() == 0]
    assert no_grad == []
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"encoder.vit.pos_embed", "decoder.pos_embed"}


@pytest.mark.slow
def test_thirty_steps_halve_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = MAE(**TINY)
    images, noise = smooth_images(4), torch.rand(4, 16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(30):
        loss, _, _ = model(images, noise=noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_norm_pix_predictions_are_shown_with_the_true_patch_statistics():
    model = MAE(**TINY, norm_pix_loss=True)
    images = smooth_images(2)
    target = patchify(images, 4)
    normed = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    torch.testing.assert_close(model.predictions_to_images(normed, images), images, atol=1e-5, rtol=1e-5)
    plain = MAE(**TINY)
    assert torch.equal(plain.predictions_to_images(target, images), images)


def test_lightning_checkpoint_round_trips(tmp_path):
    torch.manual_seed(0)
    model = MAE(**TINY, lr=1e-3, warmup_epochs=0)
    data = DataLoader(TensorDataset(smooth_images(8), torch.zeros(8, dtype=torch.long)), batch_size=4)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, data)
    path = tmp_path / "mae.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint[CHECKPOINT_KEY] == {
        "method": "mae", "arch": "vit_tiny_patch4_32", "default": "encoder", "backbones": {"encoder": "encoder.vit."},
        "backbone_kwargs": dict(img_size=16, embed_dim=32, depth=1, num_heads=2, in_chans=3, pos_embed="sincos"),
    }
    loaded = load_mae(path)
    assert not loaded.training
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    images, noise = smooth_images(2), torch.rand(2, 16)
    model.eval()
    assert torch.equal(loaded.reconstruct(images, 0.75, noise)[0], model.reconstruct(images, 0.75, noise)[0])
    assert load_mae(path, mask_ratio=0.5).mask_ratio == 0.5
    checkpoint["state_dict"]["decoder.extra"] = torch.zeros(1)
    torch.save(checkpoint, tmp_path / "bad.ckpt")
    with pytest.raises(KeyError, match="unexpected keys.*decoder.extra"):
        load_mae(tmp_path / "bad.ckpt")
