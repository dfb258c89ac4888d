"""Attention read on the manual path equals a plainly written attention; rollout, masks, Jaccard."""
import itertools

import numpy as np
import pytest
import torch
from timm.layers import resample_abs_pos_embed

import ssl_vit
from ssl_vit.models.backbone import create_backbone
from ssl_vit.viz.attention import (
    attention_maps,
    attention_rollout,
    cls_patch_attention,
    jaccard_index,
    mass_threshold_masks,
    self_attention,
)

TINY = dict(embed_dim=32, depth=2, num_heads=2)


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    model = create_backbone("vit_tiny_patch16", img_size=224, **TINY)
    with torch.no_grad():  # a non-trivial CLS token and position embedding
        model.cls_token.normal_()
        model.pos_embed.normal_(std=0.5)
    return model


def plain_attention(model, images: torch.Tensor, layer: int) -> torch.Tensor:
    """Tokens built by hand, blocks run one by one, softmax(q k^T * scale) written out."""
    b, _, height, width = images.shape
    patch = model.patch_embed.patch_size[0]
    grid = (height // patch, width // patch)
    x = model.patch_embed.proj(images).flatten(2).transpose(1, 2)  # [B, L, D]
    x = torch.cat([model.cls_token.expand(b, -1, -1), x], dim=1)
    x = x + resample_abs_pos_embed(model.pos_embed, new_size=grid, old_size=model.patch_embed.grid_size, num_prefix_tokens=1)
    layer = layer % len(model.blocks)
    for blk in model.blocks[:layer]:
        x = blk(x)
    blk = model.blocks[layer]
    heads = blk.attn.num_heads
    qkv = blk.attn.qkv(blk.norm1(x)).reshape(b, x.shape[1], 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]  # [B, heads, T, d]
    scale = q.shape[-1] ** -0.5
    return torch.softmax(q @ k.transpose(-2, -1) * scale, dim=-1)


@pytest.mark.parametrize("size", [(224, 224), (160, 224)])
@pytest.mark.parametrize("layer", [-1, 0])
def test_self_attention_equals_plain_attention(vit, size, layer):
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        expected = plain_attention(vit, images, layer)
    got = ssl_vit.self_attention(vit, images, layer=layer)
    tokens = 1 + (size[0] // 16) * (size[1] // 16)
    assert got.shape == (2, 2, tokens, tokens)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(got[:, 0], got[:, 1])  # the heads differ: not a trivial map


def test_only_the_chosen_block_leaves_fused_attention_and_everything_is_restored(vit):
    for blk in vit.blocks:
        blk.attn.fused_attn = True
    vit.train()
    seen = []
    handles = [
        blk.attn.register_forward_pre_hook(lambda m, args, i=i: seen.append((i, m.fused_attn)))
        for i, blk in enumerate(vit.blocks)
    ]
    try:
        self_attention(vit, torch.randn(1, 3, 64, 64), layer=-1)
        assert seen == [(0, True), (1, False)]
        seen.clear()
        self_attention(vit, torch.randn(1, 3, 64, 64), layer=0)
        assert seen == [(0, False)]  # the forward stops after the block of interest
    finally:
        for handle in handles:
            handle.remove()
    assert [blk.attn.fused_attn for blk in vit.blocks] == [True, True]
    assert vit.training and all(m.training for m in vit.modules())
    assert all(not blk.attn.attn_drop._forward_hooks for blk in vit.blocks)


def test_flags_hooks_and_modes_are_restored_when_the_forward_fails(vit):
    vit.eval()
    vit.blocks[0].attn.fused_attn = True

    def boom(module, args):
        raise RuntimeError("boom")

    handle = vit.blocks[1].register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            attention_rollout(vit, torch.randn(1, 3, 32, 32))
    finally:
        handle.remove()
    assert [blk.attn.fused_attn for blk in vit.blocks] == [True, True]
    assert not vit.training
    assert all(not blk.attn.attn_drop._forward_hooks for blk in vit.blocks)


def test_bad_sizes_and_layers_are_named(vit):
    with pytest.raises(ValueError, match=r"225x224 is not a multiple of the patch size 16"):
        self_attention(vit, torch.randn(1, 3, 225, 224))
    with pytest.raises(ValueError, match="layer 2 is out of range"):
        self_attention(vit, torch.randn(1, 3, 32, 32), layer=2)
    fixed = create_backbone("vit_tiny_patch16", img_size=32, dynamic_img_size=False, **TINY)
    assert self_attention(fixed, torch.randn(1, 3, 32, 32)).shape == (1, 2, 5, 5)
    with pytest.raises(ValueError, match="48x32 differs from 32x32.*dynamic_img_size"):
        self_attention(fixed, torch.randn(1, 3, 48, 32))


def test_rollout_equals_a_plain_product(vit):
    images = torch.randn(2, 3, 48, 64)
    layers = [self_attention(vit, images, layer=i).double().numpy() for i in range(len(vit.blocks))]
    for fusion, reduce in [("mean", np.mean), ("max", np.max)]:
        for ratio in (0.0, 0.3):
            expected = np.stack([np.eye(layers[0].shape[-1])] * 2)
            for attn in layers:
                fused = reduce(attn, axis=1)
                for b in range(2):
                    flat = fused[b].ravel().copy()
                    flat[np.argsort(flat)[: int(ratio * flat.size)]] = 0.0
                    a = flat.reshape(fused[b].shape) + np.eye(fused.shape[-1])
                    a = a / a.sum(axis=-1, keepdims=True)
                    expected[b] = a @ expected[b]
            got = attention_rollout(vit, images, head_fusion=fusion, discard_ratio=ratio)
            np.testing.assert_allclose(got.double().numpy(), expected, atol=1e-5)
    maps, roll = attention_maps(vit, images, rollout=True)  # one forward gives both
    torch.testing.assert_close(roll, cls_patch_attention(attention_rollout(vit, images), (3, 4), 1))
    torch.testing.assert_close(maps, self_attention(vit, images)[:, :, 0, 1:].reshape(2, 2, 3, 4))
    with pytest.raises(ValueError, match="head_fusion"):
        attention_rollout(vit, images, head_fusion="median")


@pytest.mark.parametrize("threshold", [0.3, 0.6, 0.9, 1.0])
def test_masks_are_the_smallest_sets_with_the_mass(threshold):
    torch.manual_seed(1)
    maps = torch.rand(5, 2, 4).double() ** 3  # [maps, h, w], 8 patches each
    masks = mass_threshold_masks(maps, threshold)
    assert masks.shape == maps.shape and masks.dtype == torch.bool
    for a, m in zip(maps, masks):
        flat, kept = a.flatten(), m.flatten()
        target = threshold * flat.sum()
        assert flat[kept].sum() >= target - 1e-12
        assert flat[kept].sum() - flat[kept].min() < target  # removing the smallest kept drops below
        # brute force: no smaller subset of the 8 patches reaches the mass
        best = min(
            size for size in range(9) for subset in itertools.combinations(range(8), size)
            if flat[list(subset)].sum() >= target - 1e-12
        )
        assert int(kept.sum()) == best


def test_masks_on_real_attention_and_edge_cases(vit):
    maps = self_attention(vit, torch.randn(1, 3, 64, 96))[0, :, 0, 1:].reshape(2, 4, 6)
    masks = mass_threshold_masks(maps, 0.6)
    for a, m in zip(maps.double(), masks):
        kept = a[m]
        assert kept.sum() >= 0.6 * a.sum() - 1e-9 and kept.sum() - kept.min() < 0.6 * a.sum()
        assert kept.min() >= a[~m].max()  # the kept patches are the most attended ones
    assert not mass_threshold_masks(torch.zeros(3, 3), 0.5).any()
    with pytest.raises(ValueError, match="threshold"):
        mass_threshold_masks(maps, 0.0)


def test_jaccard_against_a_hand_computed_example():
    masks = torch.tensor([[[True, False], [False, False]], [[False, False], [False, False]], [[True, True], [True, True]]])
    target = torch.zeros(4, 4, dtype=torch.bool)
    target[0, 0] = target[0, 1] = target[1, 0] = target[0, 2] = True
    # head 0: upsampled = top-left 2x2 block (4 px); intersection 3, union 4 + 4 - 3 = 5
    # head 1: empty; intersection 0, union 4.  head 2: everything; intersection 4, union 16
    torch.testing.assert_close(jaccard_index(masks, target), torch.tensor([0.6, 0.0, 0.25], dtype=torch.float64))
    assert float(jaccard_index(torch.zeros(1, 2, 2, dtype=torch.bool), torch.zeros(4, 4, dtype=torch.bool))[0]) == 1.0
