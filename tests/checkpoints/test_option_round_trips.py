"""Every design-lab option through save and load at another resolution: an ssl_vit checkpoint and a
timm export, trained at 32 and loaded at 48, give what the original model gives at 48 (for the
relative bias, whose table fits one grid, the original resized by timm's own ``set_input_size``)."""
import copy
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from ssl_vit.checkpoints.format import backbone_metadata
from ssl_vit.checkpoints.load import load_backbone, read_backbone
from ssl_vit.checkpoints.timm_export import export_backbone
from ssl_vit.models.backbone import backbone_options, create_backbone

TINY = dict(embed_dim=32, depth=2, num_heads=2)
OPTIONS = [dict(pos_embed="factorized"), dict(pos_embed="factorized", pos_embed_resample="dino"),
           dict(pos_embed="rope"), dict(pos_embed="rel_bias"), dict(stem="conv"), dict(stem="conv", pos_embed="rope")]
ids = ["-".join(map(str, o.values())) for o in OPTIONS]


def build(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    model = create_backbone("vit_tiny_patch4_32", **TINY, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def outputs(model: nn.Module, size: int) -> torch.Tensor:
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return model.eval()(x)


def original_at(model: nn.Module, size: int) -> torch.Tensor:
    """The original model's forward at ``size`` (a one-grid relative bias: resized by timm)."""
    if backbone_options(model)["pos_embed"] == "rel_bias":
        model = copy.deepcopy(model)
        model.set_input_size((size, size))
    return outputs(model, size)


def save_checkpoint(model: nn.Module, path: Path, kwargs: dict) -> Path:
    meta = backbone_metadata("finetune", "vit_tiny_patch4_32", {**TINY, **kwargs}, {"backbone": "backbone."}, "backbone")
    torch.save({"ssl_vit": meta, "state_dict": {f"backbone.{k}": v for k, v in model.state_dict().items()}}, path)
    return path


@pytest.mark.parametrize("option", OPTIONS, ids=ids)
def test_ssl_vit_checkpoint_loaded_at_another_resolution(tmp_path, option):
    model = build(**option)
    path = save_checkpoint(model, tmp_path / "model.ckpt", option)
    loaded = read_backbone(path, img_size=48)
    assert backbone_options(loaded.model) == backbone_options(model)
    assert loaded.model.patch_embed.img_size == (48, 48)
    torch.testing.assert_close(outputs(loaded.model, 48), original_at(model, 48))
    torch.testing.assert_close(outputs(load_backbone(path), 32), outputs(model, 32))


@pytest.mark.parametrize("option", [o for o in OPTIONS if "stem" not in o], ids=[i for i, o in zip(ids, OPTIONS) if "stem" not in o])
def test_timm_export_loaded_at_another_resolution(tmp_path, option):
    model = build(**option)
    out = export_backbone(model, tmp_path / "export", arch="vit_tiny_patch4_32", **TINY, **option)
    torch.testing.assert_close(outputs(load_backbone(out, img_size=48), 48), original_at(model, 48))
    torch.testing.assert_close(outputs(load_backbone(out), 32), outputs(model, 32))
    # a timm user, with no ssl_vit: the same network (a one-grid model is rebuilt at the size asked for)
    size_kwargs = {"img_size": 48} if option["pos_embed"] == "rel_bias" else {}
    timm_model = timm.create_model(f"local-dir:{out}", pretrained=True, **size_kwargs)
    assert type(timm_model) is type(model)
    if not size_kwargs:
        torch.testing.assert_close(outputs(timm_model, 32), outputs(model, 32))
    if option.get("pos_embed_resample") == "dino":  # timm resamples its own way (the export's note says so)
        assert not torch.allclose(outputs(timm_model, 48), original_at(model, 48), atol=1e-4)
    else:
        torch.testing.assert_close(outputs(timm_model, 48), original_at(model, 48), atol=1e-5, rtol=1e-4)


def test_factorized_export_stores_the_expanded_table(tmp_path):
    model = build(pos_embed="factorized")
    out = export_backbone(model, tmp_path / "export", arch="vit_tiny_patch4_32", **TINY, pos_embed="factorized")
    timm_model = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert timm_model.no_embed_class and timm_model.pos_embed.shape == (1, 64, 32)
    assert "pos_embed_row" not in timm_model.state_dict()


def test_conv_stem_export_is_refused_naming_the_option(tmp_path):
    model = build(stem="conv")
    with pytest.raises(ValueError, match="stem='conv' cannot be exported to timm's format"):
        export_backbone(model, tmp_path / "export", arch="vit_tiny_patch4_32", **TINY, stem="conv")
    with pytest.raises(ValueError, match="stem='conv' cannot be exported"):
        export_backbone(model, tmp_path / "export")  # read off the model, not told
    assert not (tmp_path / "export" / "model.safetensors").exists()


@pytest.mark.parametrize("option", [dict(pos_embed="factorized"), dict(pos_embed="rel_bias"), dict(stem="conv")],
                         ids=["factorized", "rel_bias", "conv"])
def test_bare_state_dicts_of_the_options_are_recognised(tmp_path, option):
    """A file without metadata: the option is read off its tensors, not replaced by the default."""
    model = build(**option)
    torch.save(model.state_dict(), tmp_path / "bare.pth")
    loaded = read_backbone(tmp_path / "bare.pth", num_heads=2)
    assert backbone_options(loaded.model) == backbone_options(model)
    torch.testing.assert_close(outputs(loaded.model, 32), outputs(model, 32))


def test_an_option_is_part_of_the_architecture(tmp_path):
    path = save_checkpoint(build(pos_embed="factorized"), tmp_path / "model.ckpt", dict(pos_embed="factorized"))
    with pytest.raises(ValueError, match="pos_embed: 'factorized' \\(file\\) vs 'learn' \\(asked\\)"):
        load_backbone(path, arch="vit_tiny_patch4")
