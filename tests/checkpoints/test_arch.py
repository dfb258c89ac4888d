"""A file that names its architecture is compared with the ``arch`` asked for as an architecture, not
as a name: ``vit_tiny_patch16`` and ``vit_tiny_patch16_224`` are the same network; a real
difference is refused naming each differing field with both values."""
from pathlib import Path

import pytest
import torch

from ssl_vit.checkpoints.arch import architecture_differences, architecture_of
from ssl_vit.checkpoints.format import backbone_metadata
from ssl_vit.checkpoints.load import load_backbone
from ssl_vit.checkpoints.timm_export import export_backbone
from ssl_vit.models.backbone import create_backbone

TINY = dict(embed_dim=32, depth=2, num_heads=2)


def ssl_vit_checkpoint(path: Path, arch: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_backbone(arch, **kwargs).eval()
    meta = backbone_metadata("mae", arch, kwargs, {"encoder": "encoder.vit."}, "encoder")
    torch.save({"state_dict": {f"encoder.vit.{k}": v for k, v in model.state_dict().items()}, "ssl_vit": meta}, path)
    return model


def test_two_names_of_the_same_architecture_load(tmp_path):
    source = ssl_vit_checkpoint(tmp_path / "tiny.ckpt", "vit_tiny_patch16")
    loaded = load_backbone(tmp_path / "tiny.ckpt", arch="vit_tiny_patch16_224")
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key

    small = ssl_vit_checkpoint(tmp_path / "custom.ckpt", "vit_tiny_patch4_32", **TINY)
    assert load_backbone(tmp_path / "custom.ckpt", arch="vit_base_patch4", img_size=32, **TINY).embed_dim == 32
    out = export_backbone(small, tmp_path / "export")
    assert load_backbone(out, arch="vit_small_patch4_32", **TINY).embed_dim == 32  # timm's format, another name


def test_another_architecture_is_refused_naming_each_field(tmp_path):
    ssl_vit_checkpoint(tmp_path / "custom.ckpt", "vit_tiny_patch4_32", **TINY)
    with pytest.raises(ValueError) as info:
        load_backbone(tmp_path / "custom.ckpt", arch="vit_small_patch4")
    message = str(info.value)
    assert "is a vit_tiny_patch4_32 backbone" in message and "arch='vit_small_patch4' was asked for" in message
    for field in ("embed_dim: 32 (file) vs 384 (asked)", "depth: 2 (file) vs 12 (asked)", "num_heads: 2 (file) vs 6 (asked)"):
        assert field in message
    assert "patch_size" not in message and "img_size" not in message

    with pytest.raises(ValueError, match=r"patch_size: \(4, 4\) \(file\) vs \(8, 8\) \(asked\)") as info:
        load_backbone(tmp_path / "custom.ckpt", arch="vit_tiny_patch8_32", **TINY)
    assert "embed_dim" not in str(info.value)
    with pytest.raises(ValueError, match="arch='vit_nonsense' cannot be compared: unknown backbone 'vit_nonsense'"):
        load_backbone(tmp_path / "custom.ckpt", arch="vit_nonsense")


def test_architecture_fields_cover_tokens_embedding_and_blocks():
    base = architecture_of("vit_tiny_patch4_32", TINY)
    changes = {
        "class_token": dict(class_token=False, global_pool="avg"), "reg_tokens": dict(reg_tokens=4),
        "pos_embed": dict(pos_embed="none"), "no_embed_class": dict(no_embed_class=True),
        "qkv_bias": dict(qkv_bias=False), "qk_norm": dict(qk_norm=True), "layer_scale": dict(init_values=1e-5),
        "mlp_ratio": dict(mlp_ratio=2.0), "in_chans": dict(in_chans=1), "pre_norm": dict(pre_norm=True),
    }
    for field, kwargs in changes.items():
        differences = architecture_differences(base, architecture_of("vit_tiny_patch4_32", {**TINY, **kwargs}))
        assert [d.split(":")[0] for d in differences] == [field], (field, differences)
    same = dict(img_size=64, global_pool="avg", pos_embed="sincos", drop_path_rate=0.1, dynamic_img_size=False,
                pos_embed_resample="dino")
    assert architecture_differences(base, architecture_of("vit_tiny_patch4_32", {**TINY, **same})) == []
