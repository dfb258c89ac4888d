"""`ssl-vit analyze attention-distance`: a checkpoint and a folder of images in, JSON and plots out."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_vit.apps.analyze import main
from ssl_vit.models.backbone import create_backbone


@pytest.fixture()
def weights_and_images(tmp_path):
    torch.manual_seed(0)
    model = create_backbone("vit_tiny_patch4_16")  # 12 blocks, 3 heads; 17 tokens
    weights = tmp_path / "vit.pth"
    torch.save(model.state_dict(), weights)
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "a_notes.txt").write_text("not an image")
    return weights, folder


def test_writes_json_and_plots_per_layer_and_head(weights_and_images, tmp_path, capsys):
    weights, folder = weights_and_images
    out = tmp_path / "out"
    assert main(["attention-distance", "--weights", str(weights), "--arch", "vit_tiny_patch4_16",
                 "--images", str(folder), "--output", str(out), "--max-images", "10", "--batch-size", "3"]) == 0
    report = json.loads((out / "attention_distance.json").read_text())
    assert report["images"] == 5 and report["image_size"] == 16 and report["patch_size"] == 4
    assert [layer["layer"] for layer in report["layers"]] == list(range(12))
    max_distance = 4 * np.hypot(3, 3)
    for layer in report["layers"]:
        assert len(layer["distance_px"]) == len(layer["entropy"]) == 3
        assert all(0 < d < max_distance for d in layer["distance_px"])
        assert all(0 < e <= np.log(17) + 1e-6 for e in layer["entropy"])
    assert (out / "attention_distance.png").is_file() and (out / "attention_entropy.png").is_file()
    printed = capsys.readouterr().out
    assert "a_notes.txt: not an image file" in printed and "5 images, 12 layers" in printed


def test_no_images_is_one_clear_error(weights_and_images, tmp_path):
    weights, folder = weights_and_images
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="--images: no readable images"):
        main(["attention-distance", "--weights", str(weights), "--arch", "vit_tiny_patch4_16",
              "--images", str(empty), "--output", str(tmp_path / "out")])
    with pytest.raises(ValueError, match="tensor shapes do not match the model"):
        main(["attention-distance", "--weights", str(weights), "--arch", "vit_small_patch4_16",
              "--images", str(folder), "--output", str(tmp_path / "out")])
    state = torch.load(weights)
    del state["norm.weight"]
    torch.save(state, tmp_path / "cut.pth")
    with pytest.raises(ValueError, match=r"state dict does not match the model.\n  missing keys \(1\): norm.weight"):
        main(["attention-distance", "--weights", str(tmp_path / "cut.pth"), "--arch", "vit_tiny_patch4_16",
              "--images", str(folder), "--output", str(tmp_path / "out")])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(["attention-distance", "--weights", str(weights), "--arch", "vit_tiny_patch4_16",
              "--images", str(tmp_path / "missing"), "--output", str(tmp_path / "out")])
