"""Export round trip: files exported from every source load through plain timm.create_model (no
network, no ssl_vit) and through load_backbone, with the source backbone's outputs."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from ssl_vit.checkpoints.format import backbone_metadata
from ssl_vit.checkpoints.load import load_backbone
from ssl_vit.checkpoints.timm_export import export_backbone, verify_export
from ssl_vit.models.backbone import create_backbone

TINY = dict(embed_dim=32, depth=2, num_heads=2)
ROOT = Path(__file__).resolve().parents[2]


def timm_user_load(out: Path) -> torch.nn.Module:
    """What the export promises, written out as a timm user would."""
    config = json.loads((out / "config.json").read_text())
    return timm.create_model(config["architecture"], pretrained=True, num_classes=0,
                             pretrained_cfg_overlay=dict(file=str(out / "model.safetensors")), **config["kwargs"]).eval()


def outputs(model: torch.nn.Module, size: int = 32) -> torch.Tensor:
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("kwargs", [{}, {"global_pool": "avg"}, {"pos_embed": "sincos"}, {"img_size": 24, "reg_tokens": 2}])
def test_export_model_object_round_trip(tmp_path, kwargs):
    torch.manual_seed(0)
    source = create_backbone("vit_tiny_patch4_32", **TINY, **kwargs).eval()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = export_backbone(source, tmp_path / "out")
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json"}
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"]  # not safetensors' private 0600
    size = source.patch_embed.img_size[0]
    torch.testing.assert_close(outputs(timm_user_load(out), size), outputs(source, size))
    torch.testing.assert_close(outputs(load_backbone(out), size), outputs(source, size))
    torch.testing.assert_close(outputs(load_backbone(out / "model.safetensors"), size), outputs(source, size))


def test_export_from_dino_checkpoint_role_and_tool(tmp_path):
    torch.manual_seed(1)
    teacher, student = create_backbone("vit_tiny_patch4_32", **TINY), create_backbone("vit_tiny_patch4_32", **TINY)
    state = {f"teacher.backbone.{k}": v for k, v in teacher.state_dict().items()}
    state.update({f"student.backbone.{k}": v for k, v in student.state_dict().items()})
    meta = backbone_metadata("dino", "vit_tiny_patch4_32", TINY, {"teacher": "teacher.backbone.", "student": "student.backbone."}, "teacher")
    torch.save({"state_dict": state, "ssl_vit": meta}, tmp_path / "dino.ckpt")
    out = export_backbone(tmp_path / "dino.ckpt", tmp_path / "teacher")
    torch.testing.assert_close(outputs(timm_user_load(out)), outputs(teacher))
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "vit_small_patch16_224.dino" and config["kwargs"]["patch_size"] == 4
    assert (config["kwargs"]["embed_dim"], config["kwargs"]["depth"], config["kwargs"]["num_heads"]) == (32, 2, 2)
    assert config["ssl_vit"] == {"arch": "vit_tiny_patch4_32", "backbone_kwargs": TINY}

    result = subprocess.run([sys.executable, str(ROOT / "tools/export_backbone.py"), "--weights", str(tmp_path / "dino.ckpt"),
                             "--role", "student", "--img-size", "48", "--output", str(tmp_path / "student")],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    exported = timm_user_load(tmp_path / "student")
    assert exported.pos_embed.shape == (1, 1 + 12 * 12, 32)
    torch.testing.assert_close(outputs(exported, 48), outputs(student, 48))  # resampled = timm's dynamic resampling


def test_export_check_catches_an_incomplete_description(tmp_path):
    torch.manual_seed(2)
    source = create_backbone("vit_tiny_patch4_32", **TINY).eval()
    export_backbone(source, tmp_path / "out")
    config_path = tmp_path / "out" / "config.json"
    config = json.loads(config_path.read_text())
    config["kwargs"]["num_heads"] = 4  # same tensor shapes, different model
    config_path.write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match="does not reproduce the backbone"):
        verify_export(source, tmp_path / "out")
    with pytest.raises(ValueError, match="role only applies"):
        export_backbone(source, tmp_path / "x", role="teacher")
