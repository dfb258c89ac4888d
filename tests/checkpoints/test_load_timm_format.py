"""load_backbone reads timm's own format (``save_for_hf`` / ``push_to_hf_hub`` directories, ``local-dir:``
paths), with a classifier dropped, and refuses a broken directory naming the file at fault."""
import json

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models import save_for_hf

from ssl_vit.checkpoints.load import build_backbone, load_backbone
from ssl_vit.models.backbone import create_backbone

TINY = dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2)


def timm_model(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", **{**TINY, **kwargs})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def pooled(model: torch.nn.Module, size: int = 32) -> torch.Tensor:
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.forward_head(model.forward_features(x), pre_logits=True)


@pytest.mark.parametrize("safe", [False, True, "both"])
def test_save_for_hf_directories_load_with_the_classifier_dropped(tmp_path, safe):
    source = timm_model(num_classes=10, global_pool="avg", reg_tokens=1)
    save_for_hf(source, tmp_path / "hf", safe_serialization=safe)
    for path in (tmp_path / "hf", f"local-dir:{tmp_path / 'hf'}"):
        model = load_backbone(path)
        assert model.num_classes == 0 and model.global_pool == "avg" and model.num_reg_tokens == 1
        torch.testing.assert_close(pooled(model), pooled(source))
    weights = "pytorch_model.bin" if safe is False else "model.safetensors"
    torch.testing.assert_close(pooled(load_backbone(tmp_path / "hf" / weights)), pooled(source))
    model, arch, kwargs = build_backbone(str(tmp_path / "hf"), None, None, None)
    assert arch == "vit_tiny_patch16_224" and kwargs["embed_dim"] == 32 and "num_classes" not in kwargs
    torch.testing.assert_close(pooled(model), pooled(source))


def test_a_broken_timm_directory_is_refused_naming_the_file(tmp_path):
    save_for_hf(timm_model(num_classes=0), tmp_path / "hf", safe_serialization=True)
    config = tmp_path / "hf" / "config.json"
    good = config.read_text()

    config.write_text(good[: len(good) // 2])
    with pytest.raises(ValueError, match=f"{config} cannot be read as JSON"):
        load_backbone(tmp_path / "hf")
    config.write_text(json.dumps({k: v for k, v in json.loads(good).items() if k != "architecture"}))
    with pytest.raises(KeyError, match=f"{config} names no 'architecture'"):
        load_backbone(tmp_path / "hf")
    config.write_text(json.dumps({**json.loads(good), "model_args": [1, 2]}))
    with pytest.raises(ValueError, match="'model_args' must be an object"):
        load_backbone(tmp_path / "hf")

    config.write_text(good)
    weights = tmp_path / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"{weights} cannot be read as a safetensors file"):
        load_backbone(tmp_path / "hf")
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="holds no weights: expected model.safetensors or pytorch_model.bin"):
        load_backbone(tmp_path / "hf")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_backbone(weights)


def test_exports_of_the_earlier_layout_still_load(tmp_path):
    """Exports written before timm's format (top-level "kwargs", a template architecture) carry the
    ssl_vit entry, which load_backbone reads."""
    torch.manual_seed(0)
    source = create_backbone("vit_tiny_patch4_32", embed_dim=32, depth=2, num_heads=2).eval()
    (tmp_path / "old").mkdir()
    save_file(source.state_dict(), str(tmp_path / "old" / "model.safetensors"))
    (tmp_path / "old" / "config.json").write_text(json.dumps({
        "architecture": "vit_small_patch16_224.dino", "num_features": 32,
        "kwargs": {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": [32, 32]},
        "ssl_vit": {"arch": "vit_tiny_patch4_32", "backbone_kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2}},
    }))
    torch.testing.assert_close(pooled(load_backbone(tmp_path / "old")), pooled(source))
