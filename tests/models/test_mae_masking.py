"""Random masking and the masked encoder (MaskedViT around a timm ViT)."""
import pytest
import torch

from ssl_vit.models.backbone import create_backbone
from ssl_vit.models.masked_vit import MaskedViT, random_masking

TINY = dict(embed_dim=32, depth=2, num_heads=2)


@pytest.mark.parametrize("ratio,length,keep", [(0.75, 64, 16), (0.5, 49, 24), (0.6, 10, 4), (0.0, 16, 16), (0.9, 196, 19)])
def test_masking_keeps_the_reference_count(ratio, length, keep):
    """The reference keeps int(L * (1 - ratio)) patches (rounded down): 19 of 196 at 0.9, not 20."""
    ids_keep, mask = random_masking(length, 6, ratio, torch.device("cpu"))
    assert ids_keep.shape == (6, keep)
    assert mask.shape == (6, length)
    assert (mask.sum(1) == length - keep).all()
    for row_ids, row_mask in zip(ids_keep, mask):
        assert len(set(row_ids.tolist())) == keep  # no repeats
        assert (row_mask[row_ids] == 0).all()  # visible patches are exactly the kept ones
        assert torch.equal(row_ids, row_ids.sort().values)


def test_masks_differ_between_samples_and_follow_the_noise():
    torch.manual_seed(0)
    _, mask = random_masking(64, 8, 0.75, torch.device("cpu"))
    assert len({tuple(m.tolist()) for m in mask}) == 8
    noise = torch.rand(2, 16)
    ids_keep, mask = random_masking(16, 2, 0.75, torch.device("cpu"), noise)
    expected = noise.argsort(dim=1)[:, :4].sort(dim=1).values  # the 4 lowest scores stay visible
    assert torch.equal(ids_keep, expected)
    with pytest.raises(ValueError, match="mask_ratio"):
        random_masking(16, 2, 1.0, torch.device("cpu"))
    with pytest.raises(ValueError, match="noise must have shape"):
        random_masking(16, 2, 0.5, torch.device("cpu"), torch.rand(2, 15))


@pytest.mark.parametrize(
    "kwargs,size",
    [
        (dict(pos_embed="sincos"), (32, 32)),  # NHWC patch embedding (dynamic_img_size)
        (dict(pos_embed="sincos"), (24, 40)),  # another resolution: resampled position embedding
        (dict(dynamic_img_size=False), (32, 32)),  # NLC patch embedding
        (dict(reg_tokens=2, no_embed_class=True), (32, 32)),  # registers, pos embed only on patches
        (dict(reg_tokens=1, class_token=False, global_pool="avg"), (16, 32)),
    ],
)
def test_mask_ratio_zero_gives_the_plain_backbone_tokens(kwargs, size):
    torch.manual_seed(0)
    vit = create_backbone("vit_tiny_patch4_32", **TINY, **kwargs).eval()
    encoder = MaskedViT(vit)
    images = torch.randn(2, 3, *size)
    tokens, ids_keep, mask, grid = encoder(images, mask_ratio=0.0)
    assert grid == (size[0] // 4, size[1] // 4)
    assert torch.equal(tokens, vit.forward_features(images))
    assert mask.sum() == 0 and ids_keep.shape == (2, grid[0] * grid[1])


def test_masked_encoder_equals_the_backbone_on_the_visible_patches_alone():
    """Attention sees only prefix + visible tokens: dropping the masked ones by hand gives the same."""
    torch.manual_seed(0)
    vit = create_backbone("vit_tiny_patch4_32", pos_embed="sincos", **TINY).eval()
    encoder = MaskedViT(vit)
    images = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 64)
    tokens, ids_keep, mask, _ = encoder(images, 0.75, noise)
    assert tokens.shape == (2, 1 + 16, 32)
    for b in range(2):
        x = vit.patch_embed(images[b : b + 1]).reshape(1, 64, 32) + vit.pos_embed[:, 1:]
        visible = x[:, (mask[b] == 0)]
        cls = vit.cls_token + vit.pos_embed[:, :1]
        expected = vit.norm(vit.blocks(torch.cat([cls, visible], dim=1)))
        torch.testing.assert_close(tokens[b : b + 1], expected, rtol=1e-5, atol=1e-5)


def test_patch_dropout_backbones_are_refused():
    with pytest.raises(ValueError, match="patch_drop_rate"):
        MaskedViT(create_backbone("vit_tiny_patch4_32", patch_drop_rate=0.5, **TINY))


def test_gradient_checkpointing_gives_the_same_tokens_and_gradients():
    torch.manual_seed(0)
    vit = create_backbone("vit_tiny_patch4_32", **TINY)
    encoder, images, noise = MaskedViT(vit), torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    plain = encoder(images, 0.75, noise)[0]
    plain.square().sum().backward()
    grads = [p.grad.clone() for p in vit.parameters() if p.requires_grad]
    vit.zero_grad()
    vit.set_grad_checkpointing(True)
    checkpointed = encoder(images, 0.75, noise)[0]
    checkpointed.square().sum().backward()
    torch.testing.assert_close(checkpointed, plain)
    for before, p in zip(grads, [p for p in vit.parameters() if p.requires_grad]):
        torch.testing.assert_close(p.grad, before)
