"""The linear probe: frozen backbone, both protocols' optimisers, cached features, checkpoints, and a
probe on trained features beating one on random features."""
import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from ssl_vit.checkpoints.load import load_backbone
from ssl_vit.methods.probe import CachedFeatures, LinearProbe
from ssl_vit.models.backbone import create_backbone

TINY = dict(embed_dim=32, depth=2, num_heads=2)
ARCH = "vit_tiny_patch4_16"


def stripes(n: int, seed: int):
    """Class 0: horizontal stripes, class 1: vertical; random frequency, phase, contrast, colour
    offset and noise. Orientation is not a linear function of pixels (phase is random), so a
    probe on a random ViT sits near chance, while a ViT trained to see orientation separates it."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    freq = 2 * math.pi / (2 + 4 * torch.rand(n, generator=g))
    phase = 2 * math.pi * torch.rand(n, generator=g)
    coord = torch.where(labels[:, None, None] == 0, yy, xx)
    pattern = torch.sin(coord * freq[:, None, None] + phase[:, None, None])  # [n, 16, 16]
    contrast = 0.5 + torch.rand(n, generator=g)
    offset = torch.randn(n, 3, generator=g)
    images = contrast[:, None, None, None] * pattern[:, None] + offset[:, :, None, None] + 0.5 * torch.randn(n, 3, 16, 16, generator=g)
    return images, labels


class TensorData(pl.LightningDataModule):
    def __init__(self, train, val, num_classes=2, batch_size=64, shuffle=True):
        super().__init__()
        self.train_set, self.val_set = TensorDataset(*train), TensorDataset(*val)
        self.num_classes, self.batch_size, self.shuffle = num_classes, batch_size, shuffle

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=self.shuffle)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.batch_size)


def trainer(**kwargs) -> pl.Trainer:
    defaults = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, num_sanity_val_steps=0)
    return pl.Trainer(**{**defaults, **kwargs})


def tiny_backbone(seed=0, **kwargs):
    torch.manual_seed(seed)
    return create_backbone(ARCH, **TINY, **kwargs)


@pytest.mark.parametrize("protocol", ["mae", "dino"])
def test_backbone_is_frozen_bit_identical_and_in_eval_mode(tmp_path, protocol):
    backbone = tiny_backbone(0, drop_path_rate=0.5)  # drop path would make train-mode features random
    torch.save(backbone.state_dict(), tmp_path / "w.pth")
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    probe = LinearProbe(weights=str(tmp_path / "w.pth"), backbone_kwargs={"num_heads": 2, "drop_path_rate": 0.5},
                        protocol=protocol, lr=0.5, feature="cls", n_last_blocks=2)
    modes = []
    probe.backbone.blocks[0].register_forward_pre_hook(lambda m, args: modes.append(m.training))
    data = TensorData(stripes(32, 0), stripes(16, 1), batch_size=8)
    trainer(max_epochs=1, max_steps=4).fit(probe, datamodule=data)
    assert modes and not any(modes)
    assert all(not p.requires_grad for p in probe.backbone.parameters())
    for key, value in probe.backbone.state_dict().items():
        assert torch.equal(value, before[key]), key
    head_weight = probe.head[-1].weight if protocol == "mae" else probe.head.weight
    assert probe.head is not None and head_weight.shape == (2, 32 * 2)  # 2 CLS tokens
    assert isinstance(probe.head, torch.nn.Sequential) == (protocol == "mae")


def test_mae_protocol_is_lars_as_in_the_mae_reference():
    """Two LARS steps of the probe equal the MAE reference update written out by hand: trust ratio
    0.001 * |w| / |g| on the weight only, momentum 0.9, no adaptation of the bias."""
    lr = 0.7
    probe = LinearProbe(arch=ARCH, backbone_kwargs=TINY, protocol="mae", lr=lr, min_lr=lr, warmup_epochs=0, num_classes=2)
    start = {k: v.clone() for k, v in probe.head.named_parameters()}
    grads = []

    class Record(pl.Callback):
        def on_before_optimizer_step(self, trainer, module, optimizer):
            grads.append({k: p.grad.clone() for k, p in module.head.named_parameters()})

    data = TensorData(stripes(16, 0), stripes(8, 1), batch_size=8, shuffle=False)
    trainer(max_epochs=1, max_steps=2, callbacks=[Record()]).fit(probe, datamodule=data)
    params, momentum = dict(start), {k: torch.zeros_like(v) for k, v in start.items()}
    for step in grads:
        for name, grad in step.items():
            p = params[name]
            if p.ndim > 1:
                grad = grad * (0.001 * p.norm() / grad.norm())
            momentum[name] = 0.9 * momentum[name] + grad
            params[name] = p - lr * momentum[name]
    for name, p in probe.head.named_parameters():
        torch.testing.assert_close(p.detach(), params[name], rtol=1e-5, atol=1e-7)


def pretrain(tmp_path) -> str:
    """A briefly trained backbone: supervised on the training split only, saved as a timm state dict."""
    backbone, head = tiny_backbone(0), torch.nn.Linear(32, 2)
    images, labels = stripes(256, 0)
    opt = torch.optim.AdamW([*backbone.parameters(), *head.parameters()], lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        idx = torch.randint(0, 256, (32,), generator=g)
        loss = F.cross_entropy(head(backbone(images[idx])), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save(backbone.state_dict(), tmp_path / "pretrained.pth")
    return str(tmp_path / "pretrained.pth")


def probe_accuracy(**kwargs) -> float:
    pl.seed_everything(0, verbose=False)
    probe = LinearProbe(protocol="dino", lr=0.1, **kwargs)
    data = CachedFeatures(TensorData(stripes(256, 0), stripes(128, 1), batch_size=64))
    t = trainer(max_epochs=20, check_val_every_n_epoch=20)
    t.fit(probe, datamodule=data)
    return t.callback_metrics["val/top1"].item()


@pytest.mark.slow
def test_probe_on_trained_features_beats_probe_on_random_features(tmp_path):
    trained = probe_accuracy(weights=pretrain(tmp_path), backbone_kwargs={"num_heads": 2})
    random = probe_accuracy(arch=ARCH, backbone_kwargs=TINY)
    assert trained > 0.9, trained
    assert random < 0.75, random  # held-out split: the head alone cannot fake it
    assert trained - random > 0.2


def test_cached_features_train_the_same_head_with_one_backbone_pass():
    """Streaming and cached modes see the same features in the same order -> the same head; the
    cached mode runs the backbone once per image instead of once per image per epoch."""
    heads, calls = [], []
    for cached in (False, True):
        pl.seed_everything(0, verbose=False)
        probe = LinearProbe(arch=ARCH, backbone_kwargs=TINY, protocol="mae", lr=2.0, warmup_epochs=1)
        count = [0]
        probe.backbone.register_forward_pre_hook(lambda m, args: count.__setitem__(0, count[0] + len(args[0])))
        probe.backbone.patch_embed.register_forward_pre_hook(lambda m, args: count.__setitem__(0, count[0] + len(args[0])))
        data = TensorData(stripes(48, 0), stripes(16, 1), batch_size=16, shuffle=False)
        data = CachedFeatures(data, shuffle=False) if cached else data
        trainer(max_epochs=3).fit(probe, datamodule=data)
        heads.append({k: v.clone() for k, v in probe.head.state_dict().items()})
        calls.append(count[0])
    for key in heads[0]:
        torch.testing.assert_close(heads[1][key], heads[0][key], rtol=1e-5, atol=1e-6)
    assert calls == [3 * (48 + 16), 48 + 16]  # patch_embed runs once per image: 3 epochs vs once


def test_num_classes_from_datamodule_and_mismatch_is_an_error(tmp_path):
    data = TensorData(stripes(16, 0), stripes(8, 1), num_classes=2, batch_size=8)
    probe = LinearProbe(arch=ARCH, backbone_kwargs=TINY, protocol="dino")
    t = trainer(max_epochs=1, max_steps=1, default_root_dir=tmp_path, enable_checkpointing=True)
    t.fit(probe, datamodule=data)
    assert probe.head.out_features == 2
    with pytest.raises(ValueError, match="num_classes=5 is given, but the datamodule has 2"):
        trainer(max_epochs=1, max_steps=1).fit(LinearProbe(arch=ARCH, backbone_kwargs=TINY, num_classes=5), datamodule=data)
    # a real Lightning checkpoint: load_backbone finds the frozen backbone, the probe reloads
    path = tmp_path / "probe.ckpt"
    t.save_checkpoint(path)
    loaded = load_backbone(path)
    for key, value in probe.backbone.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    restored = LinearProbe.load_from_checkpoint(path)
    assert torch.equal(restored.head.weight, probe.head.weight)


def test_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match="give `weights`"):
        LinearProbe()
    with pytest.raises(ValueError, match="protocol must be"):
        LinearProbe(arch=ARCH, backbone_kwargs=TINY, protocol="simclr")
    with pytest.raises(ValueError, match="n_last_blocks must be in \\[1, 2\\]"):
        LinearProbe(arch=ARCH, backbone_kwargs=TINY, n_last_blocks=3)
    with pytest.raises(ValueError, match="feature must be"):
        LinearProbe(arch=ARCH, backbone_kwargs=TINY, feature="max")


@pytest.mark.parametrize("feature,n_last_blocks", [("cls", 2), ("cls_avg", 1)])
def test_released_dino_linear_head_gives_the_reference_logits(tmp_path, feature, n_last_blocks):
    """eval_linear.py's checkpoint ({"state_dict": {"module.linear.*"}}) loads into the probe, and the
    logits are the reference's: its layout for ViT-S (CLS of the last blocks, concatenated) and ViT-B
    (CLS and mean interleaved per channel: output.unsqueeze(-1) and mean.unsqueeze(-1) concatenated)."""
    backbone = tiny_backbone(0).eval()
    torch.save(backbone.state_dict(), tmp_path / "w.pth")
    width = 32 * 2
    weight, bias = torch.randn(5, width), torch.randn(5)
    torch.save({"epoch": 100, "state_dict": {"module.linear.weight": weight, "module.linear.bias": bias}}, tmp_path / "head.pth")
    probe = LinearProbe(weights=str(tmp_path / "w.pth"), backbone_kwargs={"num_heads": 2}, protocol="dino",
                        feature=feature, n_last_blocks=n_last_blocks, head_weights=str(tmp_path / "head.pth")).eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        blocks = backbone.get_intermediate_layers(images, n=2, return_prefix_tokens=True, norm=True)
        if feature == "cls":
            reference = torch.cat([prefix[:, 0] for _, prefix in blocks], dim=-1)
        else:
            cls, mean = blocks[-1][1][:, 0], blocks[-1][0].mean(1)
            reference = torch.cat((cls.unsqueeze(-1), mean.unsqueeze(-1)), dim=-1).reshape(3, -1)
        torch.testing.assert_close(probe(images), reference @ weight.T + bias)
    with pytest.raises(ValueError, match="64-wide features"):
        LinearProbe(weights=str(tmp_path / "w.pth"), backbone_kwargs={"num_heads": 2}, protocol="dino",
                    feature="cls", n_last_blocks=1, head_weights=str(tmp_path / "head.pth"))
    with pytest.raises(ValueError, match="protocol='dino'"):
        LinearProbe(weights=str(tmp_path / "w.pth"), backbone_kwargs={"num_heads": 2}, protocol="mae",
                    feature=feature, n_last_blocks=n_last_blocks, head_weights=str(tmp_path / "head.pth"))
