"""The design-lab options of create_backbone: factorised position embedding, RoPE, relative position
bias, convolutional stem. Each is checked to be what it says (not the default under another name),
and the MAE encoder's masked forward to equal attention restricted to the visible tokens."""
import pytest
import timm
import torch
from torch import nn

from ssl_vit.models.backbone import backbone_options, create_backbone
from ssl_vit.models.masked_vit import MaskedViT
from ssl_vit.models.pos_embed import expand_factorized, position_embedding, resample_pos_embed, split_factorized
from ssl_vit.models.stems import ConvStemEmbed
from ssl_vit.viz.attention import self_attention

TINY = dict(embed_dim=32, depth=2, num_heads=2)
OPTIONS = [dict(pos_embed="factorized"), dict(pos_embed="rope"), dict(pos_embed="rel_bias"), dict(stem="conv")]


def build(seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    model = create_backbone("vit_tiny_patch4_32", **TINY, **kwargs)
    with torch.no_grad():  # every weight off its init (tokens start near zero, norms at one)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def images(size: int = 32, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: "-".join(o.values()))
def test_an_option_is_not_the_default_under_another_name(option):
    default, model = build(), build(**option)
    assert backbone_options(model) == {"pos_embed": "learn", "stem": "patch", **option}
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes != {k: tuple(v.shape) for k, v in default.state_dict().items()}
    # the weights both have, copied over: what is left must still change the output
    model.load_state_dict({k: v for k, v in default.state_dict().items() if shapes.get(k) == tuple(v.shape)}, strict=False)
    with torch.no_grad():
        assert not torch.allclose(model(images()), default(images()), atol=1e-4)


def test_factorized_embedding_is_a_row_table_and_a_column_table():
    model = build(pos_embed="factorized")
    assert model.pos_embed is None and model.pos_embed_row.shape == (1, 8, 16) and model.pos_embed_col.shape == (1, 8, 16)
    pos, prefix = position_embedding(model, (8, 8))
    assert prefix == 0  # the CLS token gets none
    grid = pos.reshape(8, 8, 32)
    torch.testing.assert_close(grid[3, 5], torch.cat([model.pos_embed_row[0, 3], model.pos_embed_col[0, 5]]))
    # the forward adds exactly that to the patch tokens
    x = images()
    tokens = model.patch_embed(x).reshape(2, 64, 32)
    expected = torch.cat([model.cls_token.expand(2, -1, -1), tokens + pos], dim=1)
    torch.testing.assert_close(model._pos_embed(model.patch_embed(x)), expected)


@pytest.mark.parametrize("mode", ["timm", "dino"])
@pytest.mark.parametrize("grid", [(12, 12), (6, 10), (8, 8)])
def test_factorized_resampling_per_axis_equals_resampling_the_full_table(mode, grid):
    """What makes the timm export exact: the 2-D resampling of the expanded table (timm's) equals the
    expansion of the tables resampled along their own axes (ssl_vit's)."""
    model = build(pos_embed="factorized", pos_embed_resample=mode)
    ours, _ = position_embedding(model, grid)
    full = expand_factorized(model.pos_embed_row, model.pos_embed_col)
    torch.testing.assert_close(ours, resample_pos_embed(full, grid, (8, 8), 0, mode), atol=1e-6, rtol=1e-5)
    row, col = split_factorized(full, (8, 8))
    assert torch.equal(row, model.pos_embed_row) and torch.equal(col, model.pos_embed_col)
    with pytest.raises(ValueError, match="not a factorised one"):
        split_factorized(torch.randn(1, 64, 32), (8, 8))


@pytest.mark.parametrize("pos_embed", ["rope", "rel_bias"])
def test_relative_options_are_a_plain_vit_plus_their_position_term(pos_embed):
    """timm's Eva / VisionTransformerRelPos with the rotation / bias switched off are exactly a
    VisionTransformer without position embedding on the same weights: the option adds only that."""
    model = build(pos_embed=pos_embed)
    plain = create_backbone("vit_tiny_patch4_32", **TINY, pos_embed="none").eval()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("shared_rel_pos.")}
    plain.load_state_dict(state, strict=True)
    with torch.no_grad():
        with_position = model(images())
        if pos_embed == "rope":
            model.rope = None
        else:
            model.shared_rel_pos.relative_position_bias_table.zero_()
        torch.testing.assert_close(model(images()), plain(images()))
    assert not torch.allclose(with_position, plain(images()), atol=1e-4)


def test_rope_takes_any_size_and_rel_bias_one():
    rope, bias = build(pos_embed="rope"), build(pos_embed="rel_bias")
    assert rope(images(48)).shape == (2, 32) and rope(torch.randn(1, 3, 24, 40)).shape == (1, 32)
    assert type(rope).__name__ == "Eva" and type(bias).__name__ == "VisionTransformerRelPos"
    with pytest.raises(ValueError, match="one relative bias table for one patch grid"):
        create_backbone("vit_tiny_patch4_32", **TINY, pos_embed="rel_bias", dynamic_img_size=True)
    with pytest.raises(ValueError, match="no global_pool='map'"):
        create_backbone("vit_tiny_patch4_32", **TINY, pos_embed="rel_bias", global_pool="map")
    with pytest.raises(ValueError, match="VisionTransformerRelPos, which has no reg_tokens"):
        create_backbone("vit_tiny_patch4_32", **TINY, pos_embed="rel_bias", reg_tokens=2)
    with pytest.raises(ValueError, match="needs an ssl_vit name"):
        create_backbone("vit_small_patch14_reg4_dinov2", pos_embed="rope")


@pytest.mark.parametrize("patch, convs", [(4, 2), (8, 3), (16, 4)])
def test_conv_stem_is_log2_p_strided_convolutions_then_a_1x1_projection(patch, convs):
    model = create_backbone(f"vit_tiny_patch{patch}", img_size=64, embed_dim=64, depth=1, num_heads=2, stem="conv")
    embed = model.patch_embed
    assert isinstance(embed, ConvStemEmbed) and embed.patch_size == (patch, patch) and embed.grid_size == (64 // patch,) * 2
    layers = list(embed.proj.stem)
    assert len(layers) == convs
    assert [(m.conv.kernel_size, m.conv.stride) for m in layers] == [((3, 3), (2, 2))] * convs
    assert all(isinstance(m.bn, nn.BatchNorm2d) and isinstance(m.bn.act, nn.ReLU) for m in layers)
    assert [m.conv.out_channels for m in layers][-1] == 64 and embed.proj.kernel_size == (1, 1)
    assert embed.in_chans == 3 and layers[0].conv.in_channels == 3
    assert model.forward_features(torch.randn(1, 3, 64, 96)).shape == (1, 1 + (64 // patch) * (96 // patch), 64)


@pytest.mark.parametrize("patch", [14, 2, 6])
def test_conv_stem_refuses_patch_sizes_that_are_not_powers_of_two(patch):
    with pytest.raises(ValueError, match=f"stem='conv' needs a square patch size that is a power of two >= 4.*{patch}x{patch}"):
        create_backbone(f"vit_tiny_patch{patch}", img_size=56, **TINY, stem="conv")


def test_conv_stem_is_a_timm_embed_layer():
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_layer=ConvStemEmbed, num_classes=0)
    assert isinstance(model.patch_embed, ConvStemEmbed) and model(images()).shape == (2, 192)


def visible_rows_with_attention_mask(model: nn.Module, keep: torch.Tensor) -> torch.Tensor:
    """The full forward with attention restricted to the prefix and ``keep`` tokens (an independent
    path: timm's own attention mask, or the bias plus -inf): their rows."""
    x, batch = images(), keep.shape[0]
    allowed = torch.zeros(batch, 1 + 64, dtype=torch.bool)
    allowed[:, 0] = True
    allowed.scatter_(1, keep + 1, True)
    mask = allowed[:, None, None, :].expand(-1, 1, 65, -1)  # [B, 1, T, T] keys allowed
    if type(model).__name__ == "VisionTransformerRelPos":
        bias = model.shared_rel_pos.get_bias() + torch.where(mask, 0.0, float("-inf"))
        tokens = torch.cat([model.cls_token.expand(batch, -1, -1), model.patch_embed(x)], dim=1)
        for block in model.blocks:
            tokens = block(tokens, shared_rel_pos=bias)
        out = model.norm(tokens)
    else:
        out = model.forward_features(x, attn_mask=mask)
    rows = torch.cat([torch.zeros(batch, 1, dtype=torch.long), keep + 1], dim=1)
    return out.gather(1, rows[..., None].expand(-1, -1, out.shape[-1]))


@pytest.mark.parametrize("option", [{}] + OPTIONS, ids=lambda o: "-".join(o.values()) or "default")
def test_masked_encoder_equals_attention_restricted_to_the_visible_tokens(option):
    model = build(**option)
    noise = torch.rand(2, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        tokens, keep, mask, grid = MaskedViT(model)(images(), 0.75, noise)
        assert tokens.shape == (2, 1 + 16, 32) and grid == (8, 8)
        torch.testing.assert_close(tokens, visible_rows_with_attention_mask(model, keep), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: "-".join(o.values()))
def test_attention_maps_read_on_the_manual_path_match_the_fused_forward(option):
    """ssl_vit.viz reads attention on timm's manual path: with each option it gives the fused result."""
    model, x = build(**option), images()
    attention = self_attention(model, x)
    assert attention.shape == (2, 2, 65, 65)
    torch.testing.assert_close(attention.sum(-1), torch.ones(2, 2, 65))
    with torch.no_grad():
        fused = model.forward_features(x)
        for block in model.blocks:
            block.attn.fused_attn = False
        torch.testing.assert_close(model.forward_features(x), fused, atol=1e-5, rtol=1e-4)
