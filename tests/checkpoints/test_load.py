"""load_backbone reads every known layout, gives the same weights, and refuses bad files clearly."""
import argparse
import builtins

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from ssl_vit.checkpoints.format import backbone_metadata
from ssl_vit.checkpoints.load import infer_arch, load_backbone, read_backbone
from ssl_vit.models.backbone import create_backbone

TINY = dict(embed_dim=32, depth=2, num_heads=2)
ARCH = "vit_tiny_patch4_32"


def tiny(seed: int = 0, **kwargs) -> VisionTransformer:
    torch.manual_seed(seed)
    model = create_backbone(ARCH, **{**TINY, **kwargs}).eval()
    with torch.no_grad():  # make every tensor distinctive (init leaves tokens near zero, norms at 1)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def assert_same_weights(loaded: torch.nn.Module, source: torch.nn.Module) -> None:
    a, b = loaded.state_dict(), source.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def assert_same_outputs(loaded: torch.nn.Module, source: torch.nn.Module, size: int = 32) -> None:
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), source.eval()(x))


def test_ssl_vit_checkpoints_mae_and_dino_roles(tmp_path):
    encoder = tiny(0)
    state = {f"encoder.vit.{k}": v for k, v in encoder.state_dict().items()}
    state["decoder.pred.weight"] = torch.randn(4, 4)
    meta = backbone_metadata("mae", ARCH, dict(TINY), {"encoder": "encoder.vit."}, "encoder")
    torch.save({"state_dict": state, "ssl_vit": meta, "epoch": 3}, tmp_path / "mae.ckpt")
    loaded = read_backbone(tmp_path / "mae.ckpt")
    assert loaded.arch == ARCH and loaded.kwargs == TINY
    assert_same_weights(loaded.model, encoder)

    teacher, student = tiny(1), tiny(2)
    state = {f"teacher.backbone.{k}": v for k, v in teacher.state_dict().items()}
    state.update({f"student.backbone.{k}": v for k, v in student.state_dict().items()})
    state["teacher.head.last_layer.weight"] = torch.randn(8, 4)
    meta = backbone_metadata("dino", ARCH, dict(TINY), {"teacher": "teacher.backbone.", "student": "student.backbone."}, "teacher")
    torch.save({"state_dict": state, "ssl_vit": meta}, tmp_path / "dino.ckpt")
    assert_same_weights(load_backbone(tmp_path / "dino.ckpt"), teacher)
    assert_same_weights(load_backbone(tmp_path / "dino.ckpt", role="student"), student)
    with pytest.raises(ValueError, match="roles \\['student', 'teacher'\\], not 'momentum'"):
        load_backbone(tmp_path / "dino.ckpt", role="momentum")
    with pytest.raises(ValueError, match="vit_tiny_patch4_32 backbone"):
        load_backbone(tmp_path / "dino.ckpt", arch="vit_small_patch16")


def test_sincos_checkpoint_keeps_its_frozen_pos_embed(tmp_path):
    encoder = create_backbone(ARCH, pos_embed="sincos", **TINY)
    assert not encoder.pos_embed.requires_grad and "pos_embed" in encoder.state_dict()
    meta = backbone_metadata("mae", ARCH, {**TINY, "pos_embed": "sincos"}, {"encoder": "encoder.vit."}, "encoder")
    torch.save({"state_dict": {f"encoder.vit.{k}": v for k, v in encoder.state_dict().items()}, "ssl_vit": meta}, tmp_path / "m.ckpt")
    assert_same_weights(load_backbone(tmp_path / "m.ckpt"), encoder)


def test_reference_dino_backbone_and_training_checkpoint(tmp_path):
    teacher, student = tiny(3), tiny(4)
    torch.save(teacher.state_dict(), tmp_path / "dino_backbone.pth")  # the released backbone layout
    assert_same_outputs(load_backbone(tmp_path / "dino_backbone.pth", num_heads=2), teacher)

    head = {"mlp.0.weight": torch.randn(16, 32), "last_layer.weight_g": torch.ones(64, 1)}
    checkpoint = {
        "student": {**{f"module.backbone.{k}": v for k, v in student.state_dict().items()}, **{f"module.head.{k}": v for k, v in head.items()}},
        "teacher": {**{f"backbone.{k}": v for k, v in teacher.state_dict().items()}, **{f"head.{k}": v for k, v in head.items()}},
        "optimizer": {"state": {}, "param_groups": []},
        "epoch": 10,
        "args": argparse.Namespace(arch="vit_tiny", patch_size=4, out_dim=64, lr=0.0005),
        "dino_loss": {"center": torch.zeros(1, 64)},
    }
    torch.save(checkpoint, tmp_path / "checkpoint.pth")
    loaded = read_backbone(tmp_path / "checkpoint.pth", **TINY)
    assert loaded.arch == "vit_tiny_patch4" and loaded.kwargs["img_size"] == 32
    assert_same_weights(loaded.model, teacher)
    assert_same_weights(load_backbone(tmp_path / "checkpoint.pth", role="student", **TINY), student)
    checkpoint["teacher"] = {f"module.{k}": v for k, v in checkpoint["teacher"].items()}  # DDP-wrapped teacher
    torch.save(checkpoint, tmp_path / "ddp.pth")
    assert_same_weights(load_backbone(tmp_path / "ddp.pth", **TINY), teacher)


def test_reference_mae_pretrain_and_finetuned_checkpoints(tmp_path):
    encoder = tiny(5)
    decoder = {"decoder_embed.weight": torch.randn(16, 32), "decoder_pos_embed": torch.randn(1, 65, 16),
               "decoder_blocks.0.norm1.weight": torch.randn(16), "decoder_norm.weight": torch.randn(16),
               "decoder_pred.weight": torch.randn(48, 16), "mask_token": torch.randn(1, 1, 16)}
    torch.save({"model": {**encoder.state_dict(), **decoder}}, tmp_path / "mae_pretrain.pth")
    loaded = read_backbone(tmp_path / "mae_pretrain.pth", num_heads=2)
    assert "MAE pretraining" in loaded.source
    assert_same_weights(loaded.model, encoder)

    finetuned = tiny(6, global_pool="avg")  # MAE finetuning: fc_norm after the mean, no final norm
    assert "fc_norm.weight" in finetuned.state_dict() and "norm.weight" not in finetuned.state_dict()
    head = {"head.weight": torch.randn(10, 32), "head.bias": torch.randn(10)}
    torch.save({"model": {**finetuned.state_dict(), **head}}, tmp_path / "mae_finetuned.pth")
    loaded = load_backbone(tmp_path / "mae_finetuned.pth", arch="vit_tiny_patch4", **TINY)
    assert loaded.global_pool == "avg"
    assert_same_outputs(loaded, finetuned)


def test_token_pooled_weights_into_average_pooled_model_follow_mae(tmp_path):
    """MAE finetuning from pretraining weights: the final norm is dropped, fc_norm starts fresh."""
    encoder = tiny(7)
    torch.save(encoder.state_dict(), tmp_path / "enc.pth")
    model = load_backbone(tmp_path / "enc.pth", num_heads=2, global_pool="avg")
    assert torch.equal(model.fc_norm.weight, torch.ones(32)) and torch.equal(model.fc_norm.bias, torch.zeros(32))
    for key, value in encoder.state_dict().items():
        if not key.startswith("norm."):
            assert torch.equal(model.state_dict()[key], value), key


def test_plain_timm_state_dicts_and_wrappers(tmp_path):
    torch.manual_seed(8)
    classifier = timm.create_model("vit_tiny_patch16_224", patch_size=4, img_size=32, num_classes=10, **TINY).eval()
    backbone = tiny(0)
    backbone.load_state_dict({k: v for k, v in classifier.state_dict().items() if not k.startswith("head.")})
    for name, obj in [("bare", classifier.state_dict()), ("sd", {"state_dict": classifier.state_dict()}),
                      ("model", {"model": classifier.state_dict()})]:
        torch.save(obj, tmp_path / f"{name}.pth")
        loaded = load_backbone(tmp_path / f"{name}.pth", arch="vit_tiny_patch16_224", patch_size=4, **TINY)
        assert_same_outputs(loaded, backbone)
    assert_same_weights(load_backbone(tmp_path / "bare.pth", num_heads=2), backbone)


def test_architecture_inferred_from_shapes_standard_width(tmp_path):
    torch.manual_seed(9)
    source = create_backbone("vit_tiny_patch8", img_size=32, depth=2).eval()  # 192 wide -> 3 heads (ViT table)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    loaded = read_backbone(tmp_path / "w.pth")
    assert loaded.arch == "vit_tiny_patch8"
    assert loaded.kwargs["img_size"] == 32 and loaded.kwargs["depth"] == 2 and loaded.kwargs["num_heads"] == 3
    assert_same_outputs(loaded.model, source)
    arch, kwargs = infer_arch(create_backbone("vit_small_patch16", depth=12).state_dict())
    assert arch == "vit_small_patch16" and kwargs == {"mlp_ratio": 4.0, "img_size": 224}


def test_other_resolution_resamples_the_position_embedding(tmp_path):
    source = tiny(10)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    model = load_backbone(tmp_path / "w.pth", num_heads=2, img_size=48)
    assert model.pos_embed.shape == (1, 1 + 12 * 12, 32)
    # timm's dynamic-size path resamples the same way on the fly: both give the same features at 48
    assert_same_outputs(model, source, size=48)


def test_mismatch_names_keys_inference_and_formats(tmp_path):
    state = tiny(11).state_dict()
    state.pop("blocks.1.mlp.fc2.bias")
    state["blocks.1.extra.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(KeyError) as info:
        load_backbone(tmp_path / "bad.pth", num_heads=2)
    message = str(info.value)
    assert "missing keys (1): blocks.1.mlp.fc2.bias" in message and "unexpected keys (1): blocks.1.extra.weight" in message
    assert "inferred from tensor shapes: vit_tiny_patch4" in message and "facebookresearch/dino" in message
    with pytest.raises(ValueError, match="32-wide ViT.*pass arch=... or num_heads"):
        load_backbone(tmp_path / "bad.pth")
    state = tiny(11).state_dict()
    torch.save(state, tmp_path / "ok.pth")
    with pytest.raises(ValueError, match="(?s)tensor shapes do not match.*blocks.0.mlp.fc1.weight: file \\(128, 32\\) vs model \\(64, 32\\)"):
        load_backbone(tmp_path / "ok.pth", arch=ARCH, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)
    with pytest.raises(ValueError, match="no backbone roles"):
        load_backbone(tmp_path / "ok.pth", role="teacher", num_heads=2)
    with pytest.raises(FileNotFoundError):
        load_backbone(tmp_path / "missing.pth")


class Payload:
    """Unpickling this calls ``open(path, "w")``: it creates a file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (builtins.open, (self.path, "w"))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    refused, proof = tmp_path / "pwned_refused", tmp_path / "pwned_proof"
    state = tiny(12).state_dict()
    torch.save({**state, "evil": Payload(refused)}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="weights-only"):
        load_backbone(tmp_path / "evil.pth", num_heads=2)
    assert not refused.exists()
    # the payload is live: an unsafe load would have run it
    torch.save({"evil": Payload(proof)}, tmp_path / "evil2.pth")
    torch.load(tmp_path / "evil2.pth", weights_only=False)
    assert proof.exists()
