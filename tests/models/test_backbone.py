"""The backbone factory: names, options, resolution changes, fused vs manual attention, gradients."""
import pytest
import timm
import torch

from ssl_vit.models.backbone import VIT_SIZES, create_backbone, resolve_arch
from ssl_vit.models.pos_embed import sincos_2d

TINY = dict(embed_dim=32, depth=2, num_heads=2)


@pytest.mark.parametrize("size", sorted(VIT_SIZES))
def test_paper_sizes_resolve_to_the_vit_table(size):
    name, kwargs = resolve_arch(f"vit_{size}_patch14")
    width, depth, heads, mlp = VIT_SIZES[size]
    assert (kwargs["embed_dim"], kwargs["depth"], kwargs["num_heads"], kwargs["patch_size"]) == (width, depth, heads, 14)
    assert int(width * kwargs["mlp_ratio"]) == mlp
    assert name in timm.list_models()


@pytest.mark.parametrize("size, dims", [("giant", (1408, 40, 16, 6144)), ("gigantic", (1664, 48, 16, 8192))])
def test_giant_and_gigantic_are_the_scaling_papers_g14_and_G14(size, dims):
    """Built on the meta device (no memory): width, depth, heads and MLP width as Zhai et al.'s table."""
    with torch.device("meta"):
        model = create_backbone(f"vit_{size}_patch14")
    block = model.blocks[0]
    assert (model.embed_dim, len(model.blocks), block.attn.num_heads, block.mlp.fc1.out_features) == dims
    assert model.patch_embed.patch_size == (14, 14)


def test_small_image_name_and_custom_size():
    model = create_backbone("vit_tiny_patch4_32", embed_dim=48, depth=3, num_heads=3)
    assert model.patch_embed.patch_size == (4, 4)
    assert model.patch_embed.grid_size == (8, 8)
    assert (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads) == (48, 3, 3)
    assert model.num_classes == 0
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 48)


def test_timm_names_pass_through_and_unknown_names_fail():
    model = create_backbone("vit_tiny_patch16_224", depth=1)
    assert len(model.blocks) == 1
    with pytest.raises(ValueError, match="unknown backbone 'vit_colossal_patch16'"):
        create_backbone("vit_colossal_patch16")
    with pytest.raises(ValueError, match="not a timm VisionTransformer"):
        create_backbone("resnet18")
    with pytest.raises(ValueError, match="pos_embed"):
        create_backbone("vit_tiny_patch16", pos_embed="alibi")
    with pytest.raises(ValueError, match="stem"):
        create_backbone("vit_tiny_patch16", stem="hybrid")


@pytest.mark.parametrize("hw", [(224, 224), (448, 448), (256, 320)])
def test_any_resolution_and_aspect_ratio(hw):
    model = create_backbone("vit_tiny_patch16", img_size=224, **TINY).eval()
    tokens = model.forward_features(torch.randn(1, 3, *hw))
    assert tokens.shape == (1, 1 + (hw[0] // 16) * (hw[1] // 16), 32)


def test_resampled_position_embedding_matches_a_model_built_at_that_size():
    """At 448 the on-the-fly resampling must equal timm's own resampling of the weights."""
    small = create_backbone("vit_tiny_patch16", img_size=224, **TINY).eval()
    big = create_backbone("vit_tiny_patch16", img_size=448, dynamic_img_size=False, **TINY).eval()
    state = small.state_dict()
    state["pos_embed"] = timm.layers.resample_abs_pos_embed(state["pos_embed"], new_size=(28, 28), num_prefix_tokens=1)
    big.load_state_dict(state)
    x = torch.randn(2, 3, 448, 448)
    torch.testing.assert_close(small(x), big(x))


def test_sincos_position_embedding_is_fixed_and_matches_the_formula():
    model = create_backbone("vit_tiny_patch8_32", pos_embed="sincos", **TINY)
    assert not model.pos_embed.requires_grad
    pe = model.pos_embed[0]
    assert torch.all(pe[0] == 0)  # the CLS token gets zeros
    # patch (row 1, col 2) of the 4x4 grid: first half encodes x=2, second half y=1
    d, omega = 32, 1.0 / 10000 ** (torch.arange(8, dtype=torch.float64) / 8)
    expect = torch.cat([torch.sin(2 * omega), torch.cos(2 * omega), torch.sin(1 * omega), torch.cos(1 * omega)])
    torch.testing.assert_close(pe[1 + 1 * 4 + 2].double(), expect, atol=1e-6, rtol=0)
    assert sincos_2d(d, (4, 4)).shape == (1, 16, d)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(30, (2, 2))


def test_no_position_embedding():
    model = create_backbone("vit_tiny_patch8_32", pos_embed="none", **TINY)
    assert model.pos_embed is None
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 32)


@pytest.mark.parametrize("pool", ["token", "avg", "map"])
def test_pooling_options(pool):
    model = create_backbone("vit_tiny_patch8_32", global_pool=pool, **TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    feats = model(x)
    assert feats.shape == (2, 32)
    tokens = model.forward_features(x)
    if pool == "token":
        torch.testing.assert_close(feats, tokens[:, 0])
    elif pool == "avg":
        torch.testing.assert_close(feats, model.fc_norm(tokens[:, 1:].mean(1)))


@pytest.mark.parametrize("hw", [(32, 32), (24, 40)])
def test_fused_and_manual_attention_agree(hw):
    model = create_backbone("vit_tiny_patch8_32", **TINY).eval()
    x = torch.randn(2, 3, *hw)
    for blk in model.blocks:
        blk.attn.fused_attn = True
    fused = model.forward_features(x)
    for blk in model.blocks:
        blk.attn.fused_attn = False
    manual = model.forward_features(x)
    torch.testing.assert_close(fused, manual, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pool", ["token", "avg", "map"])
def test_every_parameter_gets_a_gradient(pool):
    # no drop path here: with a batch of 2 it can drop a whole residual branch and zero its gradient
    torch.manual_seed(0)
    model = create_backbone("vit_tiny_patch8_32", global_pool=pool, **TINY)
    model(torch.randn(4, 3, 32, 32)).pow(2).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert not missing, missing
