"""Export in timm's own format: the directory loads through plain ``timm.create_model("local-dir:DIR")``
(no network, no ssl_vit) and through load_backbone with the source backbone's outputs, carries its
own data config, and is what ``push_to_hf_hub`` would upload (the upload mocked: no network here)."""
import inspect
import json
import os
import runpy
from pathlib import Path
from unittest import mock

import pytest
import timm
import timm.models._hub as timm_hub
import torch
from timm.data import resolve_data_config

from ssl_vit.checkpoints.format import backbone_metadata
from ssl_vit.checkpoints.load import load_backbone
from ssl_vit.checkpoints.timm_export import DATA_DEFAULTS, export_backbone, verify_export
from ssl_vit.data.transforms import EvalTransform
from ssl_vit.models.backbone import create_backbone

TINY = dict(embed_dim=32, depth=2, num_heads=2)
ROOT = Path(__file__).resolve().parents[2]


def timm_user_load(out: Path) -> torch.nn.Module:
    """What the export promises, written out as a timm user would."""
    return timm.create_model(f"local-dir:{out}", pretrained=True).eval()


def outputs(model: torch.nn.Module, size: int = 32) -> torch.Tensor:
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return model.eval()(x)


def distinct(model: torch.nn.Module) -> torch.nn.Module:
    """Every weight moved off its init (tokens start near zero, norms at one)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("kwargs", [{}, {"global_pool": "avg"}, {"pos_embed": "sincos"},
                                    {"img_size": 24, "reg_tokens": 2}, {"img_size": 48, "qkv_bias": False}])
def test_export_loads_with_timm_local_dir_and_load_backbone(tmp_path, kwargs):
    torch.manual_seed(0)
    source = distinct(create_backbone("vit_tiny_patch4_32", **TINY, **kwargs))
    out = export_backbone(source, tmp_path / "out")
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json"}
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"]  # not safetensors' private 0600
    size = source.patch_embed.img_size[0]
    model = timm_user_load(out)
    torch.testing.assert_close(outputs(model, size), outputs(source, size))
    torch.testing.assert_close(outputs(load_backbone(out), size), outputs(source, size))
    torch.testing.assert_close(outputs(load_backbone(f"local-dir:{out}"), size), outputs(source, size))
    torch.testing.assert_close(outputs(load_backbone(out / "model.safetensors"), size), outputs(source, size))

    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224" and config["num_classes"] == 0
    assert config["num_features"] == 32
    args = config["model_args"]
    assert (args["embed_dim"], args["depth"], args["num_heads"], args["patch_size"]) == (32, 2, 2, 4)
    assert args["img_size"] == [size, size]
    cfg = config["pretrained_cfg"]
    assert not {"hf_hub_id", "url", "file", "tag", "license"} & set(cfg), cfg  # nothing of another model
    assert cfg["input_size"] == [3, size, size]
    data = resolve_data_config({}, model=model)
    assert data["input_size"] == (3, size, size)
    assert tuple(data["mean"]) == DATA_DEFAULTS["mean"] and tuple(data["std"]) == DATA_DEFAULTS["std"]
    assert (data["interpolation"], data["crop_pct"]) == ("bicubic", DATA_DEFAULTS["crop_pct"])


def test_data_defaults_are_ssl_vits_eval_transform_and_can_be_given(tmp_path):
    defaults = inspect.signature(EvalTransform).parameters
    assert DATA_DEFAULTS["mean"] == tuple(defaults["mean"].default) and DATA_DEFAULTS["std"] == tuple(defaults["std"].default)
    assert DATA_DEFAULTS["crop_pct"] == defaults["crop_pct"].default
    source = distinct(create_backbone("vit_tiny_patch4_32", **TINY))
    given = dict(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), crop_pct=1.0, interpolation="bilinear")
    out = export_backbone(source, tmp_path / "out", data_config=given)
    data = resolve_data_config({}, model=timm_user_load(out))
    assert {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in data.items() if k in given} == given
    with pytest.raises(ValueError, match=r"data_config keys \['size'\] are not known"):
        export_backbone(source, tmp_path / "x", data_config={"size": 32})
    with pytest.raises(ValueError, match="mean has 1 values for a 3-channel backbone"):
        export_backbone(source, tmp_path / "x", data_config={"mean": (0.5,)})


def test_dino_resampling_is_exact_at_the_exported_size_and_documented_elsewhere(tmp_path):
    """timm has no DINO interpolate_pos_encoding: at the export's input size timm's model is the
    source; at another size it resamples its own way, which the config's notes say, and
    load_backbone (which restores the mode from config["ssl_vit"]) reproduces the source."""
    torch.manual_seed(3)
    source = distinct(create_backbone("vit_tiny_patch4_32", **TINY, pos_embed_resample="dino"))
    out = export_backbone(source, tmp_path / "out")
    model = timm_user_load(out)
    torch.testing.assert_close(outputs(model, 32), outputs(source, 32))
    assert not torch.allclose(outputs(model, 48), outputs(source, 48), atol=1e-4)
    assert any("interpolate_pos_encoding" in note for note in model.pretrained_cfg["notes"])
    torch.testing.assert_close(outputs(load_backbone(out), 48), outputs(source, 48))


class FakeHfApi:
    """``huggingface_hub.HfApi`` as ``push_to_hf_hub`` uses it, keeping the uploaded folder's files."""
    uploaded: dict = {}

    def __init__(self, **kwargs) -> None:
        pass

    def create_repo(self, repo_id: str, **kwargs) -> mock.Mock:
        return mock.Mock(repo_id=repo_id)

    def file_exists(self, **kwargs) -> bool:
        return False

    def upload_folder(self, folder_path: str, **kwargs) -> None:
        FakeHfApi.uploaded = {n: Path(folder_path, n).read_bytes() for n in os.listdir(folder_path)}


def test_push_to_hf_hub_of_the_loaded_export_uploads_the_same_config(tmp_path):
    """No network: HfApi is replaced, and what push_to_hf_hub would upload is compared with the export."""
    source = distinct(create_backbone("vit_tiny_patch4_32", **TINY, img_size=24))
    out = export_backbone(source, tmp_path / "out")
    with mock.patch.object(timm_hub, "HfApi", FakeHfApi):
        timm.models.push_to_hf_hub(timm_user_load(out), "someone/tiny")
    assert {"config.json", "model.safetensors"} <= set(FakeHfApi.uploaded)
    ours = json.loads((out / "config.json").read_text())
    ours.pop("ssl_vit")
    assert json.loads(FakeHfApi.uploaded["config.json"]) == ours
    (tmp_path / "hub").mkdir()
    for name, data in FakeHfApi.uploaded.items():
        (tmp_path / "hub" / name).write_bytes(data)
    torch.testing.assert_close(outputs(timm_user_load(tmp_path / "hub"), 24), outputs(source, 24))


def test_export_from_dino_checkpoint_role_and_tool(tmp_path, capsys):
    torch.manual_seed(1)
    teacher, student = create_backbone("vit_tiny_patch4_32", **TINY), create_backbone("vit_tiny_patch4_32", **TINY)
    state = {f"teacher.backbone.{k}": v for k, v in teacher.state_dict().items()}
    state.update({f"student.backbone.{k}": v for k, v in student.state_dict().items()})
    meta = backbone_metadata("dino", "vit_tiny_patch4_32", TINY, {"teacher": "teacher.backbone.", "student": "student.backbone."}, "teacher")
    torch.save({"state_dict": state, "ssl_vit": meta}, tmp_path / "dino.ckpt")
    out = export_backbone(tmp_path / "dino.ckpt", tmp_path / "teacher")
    torch.testing.assert_close(outputs(timm_user_load(out)), outputs(teacher))
    config = json.loads((out / "config.json").read_text())
    assert config["ssl_vit"]["arch"] == "vit_tiny_patch4_32" and config["ssl_vit"]["backbone_kwargs"] == TINY

    tool = runpy.run_path(str(ROOT / "tools/export_backbone.py"))  # the script itself, in-process
    assert tool["main"](["--weights", str(tmp_path / "dino.ckpt"), "--role", "student", "--img-size", "48",
                         "--crop-pct", "1.0", "--output", str(tmp_path / "student")]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert f"wrote {tmp_path / 'student' / 'model.safetensors'}" in printed
    assert any(line.startswith(f"wrote {tmp_path / 'student' / 'config.json'}: ") and "input (3, 48, 48)" in line for line in printed)
    one_liner = next(line.strip() for line in printed if "timm.create_model(" in line)
    assert one_liner == f'model = timm.create_model("local-dir:{tmp_path / "student"}", pretrained=True)'
    scope = {"timm": timm}
    exec(one_liner, scope)  # the printed line, run as printed
    exported = scope["model"].eval()
    assert exported.pos_embed.shape == (1, 1 + 12 * 12, 32) and exported.pretrained_cfg["crop_pct"] == 1.0
    torch.testing.assert_close(outputs(exported, 48), outputs(student, 48))  # resampled = timm's dynamic resampling


def test_export_check_catches_an_incomplete_description(tmp_path):
    torch.manual_seed(2)
    source = create_backbone("vit_tiny_patch4_32", **TINY).eval()
    export_backbone(source, tmp_path / "out")
    config_path = tmp_path / "out" / "config.json"
    config = json.loads(config_path.read_text())
    config["model_args"]["num_heads"] = 4  # same tensor shapes, different model
    config_path.write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match="does not reproduce the backbone"):
        verify_export(source, tmp_path / "out")
    with pytest.raises(ValueError, match="role only applies"):
        export_backbone(source, tmp_path / "x", role="teacher")
