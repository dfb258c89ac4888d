"""facebookresearch/mae checkpoints: exact key/shape checks, architecture inference, and the same
predictions as an independent re-implementation of the reference forward pass on the same weights."""
from functools import partial

import pytest
import torch
from timm.models.vision_transformer import Block
from torch import nn

from ssl_vit.checkpoints.mae import infer_reference_config, load_mae, reference_to_ssl_vit_key, ssl_vit_to_reference_key

IMG, P, C, D, DEPTH, HEADS, DD, DDEPTH, DHEADS, MLP = 16, 4, 3, 32, 2, 4, 32, 2, 4, 2.0
L = (IMG // P) ** 2


class ReferenceMAE(nn.Module):
    """The reference MaskedAutoencoderViT forward, written out plainly (keys as in its checkpoints)."""

    def __init__(self) -> None:
        super().__init__()
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(C, D, P, P)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, L + 1, D))
        self.blocks = nn.ModuleList([Block(D, HEADS, MLP, qkv_bias=True, norm_layer=norm) for _ in range(DEPTH)])
        self.norm = norm(D)
        self.decoder_embed = nn.Linear(D, DD)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, DD))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, L + 1, DD))
        self.decoder_blocks = nn.ModuleList([Block(DD, DHEADS, MLP, qkv_bias=True, norm_layer=norm) for _ in range(DDEPTH)])
        self.decoder_norm = norm(DD)
        self.decoder_pred = nn.Linear(DD, P * P * C)

    def forward(self, imgs: torch.Tensor, noise: torch.Tensor, mask_ratio: float):
        x = self.patch_embed.proj(imgs).flatten(2).transpose(1, 2)  # [N, L, D]
        x = x + self.pos_embed[:, 1:, :]
        n, length, dim = x.shape
        len_keep = int(length * (1 - mask_ratio))
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        x = torch.gather(x, 1, ids_shuffle[:, :len_keep].unsqueeze(-1).repeat(1, 1, dim))
        mask = torch.ones(n, length)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(n, -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        x = self.decoder_embed(x)
        mask_tokens = self.mask_token.repeat(n, length + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1)
        x = x + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:, :], mask


@pytest.fixture
def reference(tmp_path):
    torch.manual_seed(0)
    model = ReferenceMAE().eval()
    state = {k: torch.randn_like(v) * (0.5 if v.ndim > 1 else 0.2) for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    path = tmp_path / "mae_reference.pth"
    torch.save({"model": state}, path)
    return model, state, path


EXPECTED_KEYS = {
    "cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias",
    "mask_token", "decoder_embed.weight", "decoder_embed.bias", "decoder_pos_embed", "decoder_norm.weight",
    "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias",
}


def test_reference_key_list_is_what_the_test_model_has(reference):
    _, state, _ = reference
    block_keys = {k for k in state if k.startswith(("blocks.", "decoder_blocks."))}
    assert set(state) - block_keys == EXPECTED_KEYS
    names = {k.split(".", 2)[2] for k in block_keys}
    assert names == {f"{m}.{t}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2") for t in ("weight", "bias")}
    for key in state:
        assert ssl_vit_to_reference_key(reference_to_ssl_vit_key(key)) == key


@pytest.mark.parametrize("ratio", [0.0, 0.75])
def test_predictions_equal_the_reference_forward(reference, ratio):
    model, _, path = reference
    mae = load_mae(path, num_heads=HEADS, decoder_num_heads=DHEADS)
    torch.manual_seed(1)
    images = torch.randn(3, C, IMG, IMG)
    noise = torch.rand(3, L)
    with torch.no_grad():
        expected, expected_mask = model(images, noise, ratio)
    if ratio == 0.0:
        pred, mask = mae.reconstruct(images, mask_ratio=0.0)  # no noise: natural order, nothing hidden
    else:
        pred, mask = mae.reconstruct(images, mask_ratio=ratio, noise=noise)
    assert torch.equal(mask, expected_mask)
    torch.testing.assert_close(pred, expected, rtol=1e-5, atol=1e-5)
    assert pred.abs().mean() > 0.1  # not a trivially small output


def test_architecture_is_read_from_the_shapes(reference):
    _, state, path = reference
    config = infer_reference_config(state, num_heads=HEADS, decoder_num_heads=DHEADS)
    assert config == dict(
        arch=None, img_size=IMG, patch_size=P, in_chans=C, embed_dim=D, depth=DEPTH, num_heads=HEADS,
        mlp_ratio=MLP, decoder_embed_dim=DD, decoder_depth=DDEPTH, decoder_num_heads=DHEADS,
    )
    with pytest.raises(ValueError, match="num_heads"):
        load_mae(path)  # a 32-wide encoder has no standard head count


def test_standard_sizes_are_named_and_get_the_table_heads():
    shapes = {
        "cls_token": (1, 1, 768), "pos_embed": (1, 197, 768), "patch_embed.proj.weight": (768, 3, 16, 16),
        "blocks.0.mlp.fc1.weight": (3072, 768), "decoder_embed.weight": (512, 768),
    }
    state = {k: torch.empty(s) for k, s in shapes.items()}
    state.update({f"blocks.{i}.norm1.weight": torch.empty(768) for i in range(12)})
    state.update({f"decoder_blocks.{i}.norm1.weight": torch.empty(512) for i in range(8)})
    config = infer_reference_config(state)
    assert config == dict(
        arch="vit_base_patch16", img_size=224, in_chans=3, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16
    )
    state["cls_token"] = torch.empty(1, 1, 1024)
    state["pos_embed"] = torch.empty(1, 257, 768)
    state["patch_embed.proj.weight"] = torch.empty(1024, 3, 14, 14)
    state["blocks.0.mlp.fc1.weight"] = torch.empty(4096, 1024)
    config = infer_reference_config(state)
    assert (config["embed_dim"], config["num_heads"], config["depth"], config["img_size"]) == (1024, 16, 12, 224)


def _save(tmp_path, state, name="bad.pth"):
    path = tmp_path / name
    torch.save({"model": state}, path)
    return path


def test_wrong_checkpoints_fail_naming_the_keys(reference, tmp_path):
    _, state, _ = reference
    kw = dict(num_heads=HEADS, decoder_num_heads=DHEADS)
    extra = dict(state, head_weight=torch.zeros(3))
    with pytest.raises(KeyError, match=r"unexpected keys \(1\): head_weight"):
        load_mae(_save(tmp_path, extra), **kw)
    missing = {k: v for k, v in state.items() if k != "decoder_blocks.1.mlp.fc2.bias"}
    with pytest.raises(KeyError, match=r"missing keys \(1\): decoder_blocks.1.mlp.fc2.bias"):
        load_mae(_save(tmp_path, missing), **kw)
    wrong = dict(state, **{"decoder_pred.bias": torch.zeros(7)})
    with pytest.raises(ValueError, match=r"decoder_pred.bias: file \(7,\) vs model \(48,\)"):
        load_mae(_save(tmp_path, wrong), **kw)
    encoder_only = {k: v for k, v in state.items() if not k.startswith(("decoder", "mask_token"))}
    with pytest.raises(KeyError, match="decoder_embed.weight"):
        load_mae(_save(tmp_path, encoder_only), **kw)
    odd_grid = dict(state, pos_embed=torch.zeros(1, 1 + 15, D))
    with pytest.raises(ValueError, match="square grid"):
        load_mae(_save(tmp_path, odd_grid), **kw)
    with pytest.raises(ValueError, match="unknown MAE arguments"):
        load_mae(_save(tmp_path, state), bogus=1, **kw)
    torch.save({"weights": state}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="unrecognised checkpoint"):
        load_mae(tmp_path / "other.pth")
