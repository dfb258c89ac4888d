"""MAE and DINO train with each design-lab option (one tiny step: every parameter gets a gradient, the
checkpoint records the option), or refuse at start-up naming it: a relative bias table fits one patch
grid, so DINO's local crops are refused."""
import pytest
import torch

from ssl_vit.checkpoints.load import read_backbone
from ssl_vit.data.multicrop import MultiCropTransform
from ssl_vit.methods.base import param_groups
from ssl_vit.methods.mae import MAE
from ssl_vit.models.backbone import backbone_options
from ssl_vit.training.checks import check_fixed_sizes, model_fixed_sizes
from test_dino_method import CropsModule, tiny_dino, trainer

OPTIONS = [dict(pos_embed="factorized"), dict(pos_embed="rope"), dict(pos_embed="rel_bias"), dict(stem="conv"),
           dict(stem="conv", pos_embed="rope")]
ids = ["-".join(o.values()) for o in OPTIONS]
MAE_TINY = dict(arch="vit_tiny_patch4_32", img_size=16, embed_dim=32, depth=1, num_heads=2,
                decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)


@pytest.mark.parametrize("option", OPTIONS, ids=ids)
def test_mae_step_trains_every_parameter_with_the_option(option, tmp_path):
    torch.manual_seed(0)
    model = MAE(**MAE_TINY, **option)
    assert backbone_options(model.encoder.vit) == {"pos_embed": "sincos", "stem": "patch", **option}
    loss, pred, mask = model(torch.randn(4, 3, 16, 16))
    loss.backward()
    assert torch.isfinite(loss) and pred.shape == (4, 16, 48) and mask.sum() == 4 * 12
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    assert not missing, missing
    checkpoint = {}
    model.on_save_checkpoint(checkpoint)
    assert checkpoint["ssl_vit"]["backbone_kwargs"]["pos_embed"] == option.get("pos_embed", "sincos")
    assert checkpoint["ssl_vit"]["backbone_kwargs"].get("stem", "patch") == option.get("stem", "patch")


@pytest.mark.parametrize("option", [o for o in OPTIONS if o.get("pos_embed") != "rel_bias"],
                         ids=[i for i, o in zip(ids, OPTIONS) if o.get("pos_embed") != "rel_bias"])
def test_dino_steps_with_the_option_and_its_checkpoint_rebuilds_it(option, tmp_path):
    torch.manual_seed(0)
    model = tiny_dino(**option)
    before = [p.detach().clone() for p in model.student.backbone.parameters()]
    run = trainer(max_steps=2, default_root_dir=tmp_path)
    run.fit(model, CropsModule())
    moved = [not torch.equal(a, b) for a, b in zip(before, model.student.backbone.parameters())]
    assert all(moved)  # every backbone parameter took an update
    run.save_checkpoint(tmp_path / "dino.ckpt")
    loaded = read_backbone(tmp_path / "dino.ckpt")
    assert backbone_options(loaded.model) == backbone_options(model.teacher.backbone)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(images), model.teacher.backbone.eval()(images))


def test_dino_with_a_relative_bias_refuses_local_crops_naming_the_option():
    model = tiny_dino(pos_embed="rel_bias")
    fixed = model_fixed_sizes(model)
    assert [size for size, _ in fixed] == [(32, 32)]
    # the start-up check (StartupChecks, before any step), on the recipe's multi-crop transform
    with pytest.raises(ValueError, match=r"view 2 makes 16x16 images, but the model takes 32x32 only: pos_embed='rel_bias'"):
        check_fixed_sizes({"data.train_transform": MultiCropTransform(32, 16, num_local=2)}, fixed)
    check_fixed_sizes({"data.train_transform": MultiCropTransform(32, 16, num_local=0)}, fixed)  # global crops only
    # a loader without sizes to read: the first forward says which crop does not fit
    with pytest.raises(ValueError, match="crop 2 is 16x16, but this backbone takes 32x32 images only \\(pos_embed='rel_bias'"):
        trainer(max_steps=1).fit(model, CropsModule())
    # with the global crops only, it trains
    crops = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)]
    assert model.student(crops).shape == (4, 64)


def test_factorised_tables_and_the_bias_table_are_tokens_for_weight_decay():
    """``wd_exempt_tokens`` keeps every position parameter from weight decay, as it does ``pos_embed``."""
    for option, names in ((dict(pos_embed="factorized"), ("pos_embed_row", "pos_embed_col")),
                          (dict(pos_embed="rel_bias"), ("relative_position_bias_table",))):
        model = tiny_dino(**option)
        params = dict(model.student.named_parameters())
        decayed, kept = param_groups(model.student.named_parameters(), 0.04, exempt_tokens=True)[:2]
        for name in names:
            param = next(p for n, p in params.items() if n.endswith(name))
            assert any(param is p for p in kept["params"]) and not any(param is p for p in decayed["params"])
