"""Position-embedding resampling in one place: timm's convention and the DINO reference's."""
import copy
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from ssl_vit.checkpoints.load import load_backbone
from ssl_vit.models.backbone import create_backbone
from ssl_vit.models.pos_embed import _PosEmbed, pos_embed_resample, resample_pos_embed, set_pos_embed_resample

TINY = dict(embed_dim=24, depth=1, num_heads=3)


def reference_interpolate_pos_encoding(pos_embed: torch.Tensor, h: int, w: int, patch: int) -> torch.Tensor:
    """facebookresearch/dino ``VisionTransformer.interpolate_pos_encoding``, written out plainly."""
    npatch, n = (h // patch) * (w // patch), pos_embed.shape[1] - 1
    if npatch == n and w == h:
        return pos_embed
    side, dim = int(math.sqrt(n)), pos_embed.shape[-1]
    h0, w0 = h // patch + 0.1, w // patch + 0.1
    grid = F.interpolate(pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2),
                         scale_factor=(h0 / side, w0 / side), mode="bicubic")
    return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


@pytest.mark.parametrize("size", [(32, 32), (48, 48), (16, 48), (80, 64), (64, 64)])
def test_dino_mode_is_the_reference_interpolation(size):
    torch.manual_seed(0)
    pos = torch.randn(1, 17, 24)
    ours = resample_pos_embed(pos, (size[0] // 16, size[1] // 16), (4, 4), 1, "dino")
    torch.testing.assert_close(ours, reference_interpolate_pos_encoding(pos, *size, 16), atol=0, rtol=0)


def test_the_two_conventions_differ_for_local_crops():
    """The README's figure: for a 224 model's 96-px crops timm's antialiased resize is much weaker."""
    torch.manual_seed(0)
    pos = torch.randn(1, 197, 8) * 0.02
    dino = resample_pos_embed(pos, (6, 6), (14, 14), 1, "dino")[:, 1:]
    timm = resample_pos_embed(pos, (6, 6), (14, 14), 1, "timm")[:, 1:]
    assert dino.std() / timm.std() > 1.5


@pytest.mark.parametrize("kwargs", [{}, {"reg_tokens": 2}, {"no_embed_class": True}, {"class_token": False, "global_pool": "avg"}])
@pytest.mark.parametrize("size", [(32, 32), (16, 48), (64, 32)])
def test_installed_pos_embed_in_timm_mode_equals_timms_own(kwargs, size):
    """The installed replacement does exactly what timm's method does apart from the resampling: a
    change in timm's ``_pos_embed`` shows here."""
    torch.manual_seed(0)
    vit = create_backbone("vit_tiny_patch16", img_size=32, **TINY, **kwargs)
    assert "_pos_embed" not in vit.__dict__  # "timm": timm's own method in place
    x = vit.patch_embed(torch.randn(2, 3, *size))
    expected = VisionTransformer._pos_embed(vit, x)
    torch.testing.assert_close(_PosEmbed(vit)(x), expected, atol=0, rtol=0)


def test_dino_backbone_features_at_a_local_crop_size():
    """Every forward path of a "dino" backbone (forward, forward_intermediates) uses the reference
    resampling; at the native size nothing changes."""
    torch.manual_seed(0)
    vit = create_backbone("vit_tiny_patch16", img_size=64, pos_embed_resample="dino", **TINY).eval()
    twin = create_backbone("vit_tiny_patch16", img_size=64, **TINY).eval()
    twin.load_state_dict(vit.state_dict())
    small, native = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        x = vit.patch_embed(small).flatten(1, 2)
        x = torch.cat([vit.cls_token.expand(2, -1, -1), x], 1) + reference_interpolate_pos_encoding(vit.pos_embed, 32, 32, 16)
        expected = vit.norm(vit.blocks(x))[:, 0]
        torch.testing.assert_close(vit(small), expected)
        torch.testing.assert_close(vit.forward_intermediates(small, indices=1, norm=True, output_fmt="NLC",
                                                             return_prefix_tokens=True, intermediates_only=True)[0][1][:, 0], expected)
        assert not torch.allclose(twin(small), expected)
        torch.testing.assert_close(vit(native), twin(native), atol=0, rtol=0)


def test_mode_survives_copy_pickle_and_checkpoints(tmp_path):
    torch.manual_seed(0)
    vit = create_backbone("vit_tiny_patch16", img_size=64, pos_embed_resample="dino", **TINY).eval()
    images = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        expected = vit(images)
        for clone in (copy.deepcopy(vit), pickle.loads(pickle.dumps(vit))):
            assert pos_embed_resample(clone) == "dino"
            torch.testing.assert_close(clone(images), expected, atol=0, rtol=0)
    with pytest.raises(ValueError, match="pos_embed_resample"):
        set_pos_embed_resample(vit, "bilinear")


def test_loading_a_dino_training_checkpoint_at_another_size_is_the_reference_runtime_interpolation(tmp_path):
    """A released DINO training checkpoint (student / teacher / args) loads with the reference
    convention; loading at img_size 32 resamples once exactly as the reference does at run time."""
    torch.manual_seed(0)
    vit = create_backbone("vit_tiny_patch16", img_size=64, pos_embed_resample="dino", **TINY).eval()
    teacher = {f"backbone.{k}": v for k, v in vit.state_dict().items()}
    torch.save({"teacher": teacher, "student": {f"module.{k}": v for k, v in teacher.items()}}, tmp_path / "checkpoint.pth")
    native = load_backbone(tmp_path / "checkpoint.pth", num_heads=3)
    resized = load_backbone(tmp_path / "checkpoint.pth", num_heads=3, img_size=32)
    assert pos_embed_resample(native) == pos_embed_resample(resized) == "dino"
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(resized(images), vit(images), atol=1e-6, rtol=0)
        torch.testing.assert_close(native(images), vit(images), atol=0, rtol=0)
