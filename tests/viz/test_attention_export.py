"""The attention gallery on disk: files and shapes, the HTML, bad inputs, shards, Jaccard, the tool."""
import importlib.util
import io
import json
import tarfile
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_vit.checkpoints.format import CHECKPOINT_KEY, backbone_metadata
from ssl_vit.models.backbone import create_backbone
from ssl_vit.viz import gallery
from ssl_vit.viz.attention import attention_maps, mass_threshold_masks
from ssl_vit.viz.gallery import export_attention, normalise, prepare_image

TINY = dict(img_size=32, embed_dim=32, depth=2, num_heads=2)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    model = create_backbone("vit_tiny_patch8_32", **TINY)
    with torch.no_grad():
        model.cls_token.normal_()
        model.pos_embed.normal_(std=0.5)
    return model.eval()


def save_image(path: Path, width: int, height: int, seed: int, fmt: str = "PNG") -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path, format=fmt)
    return path


def image_bytes(width: int, height: int, seed: int, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


class Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links, self.headers, self.rows, self._th = [], [], 0, False

    def handle_starttag(self, tag, attrs):
        self.links += [value for key, value in attrs if key in ("src", "href")]
        self.rows += tag == "tr"
        self._th = tag == "th"

    def handle_data(self, data):
        if self._th:
            self.headers.append(data)
            self._th = False


def check_gallery(output: Path) -> Links:
    parser = Links()
    parser.feed((output / "index.html").read_text(encoding="utf-8"))
    assert parser.links
    for link in parser.links:
        assert not link.startswith(("/", "http:", "https:")), link
        assert (output / unquote(link)).is_file(), link
    return parser


@pytest.fixture()
def folder(tmp_path):
    root = tmp_path / "images"
    save_image(root / "a.png", 56, 40, 0)  # shorter side 40 -> 32: 32x45 -> crop 32x40 -> grid 4x5
    save_image(root / "sub" / "b.jpg", 48, 48, 1, "JPEG")  # 32x32 -> grid 4x4
    save_image(root / "sub" / "a.png", 40, 56, 2)  # same stem as a.png, portrait: crop 40x32
    (root / "notes.txt").write_text("not an image")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    return root


def test_export_writes_maps_masks_overlays_and_skips_bad_files(vit, folder, tmp_path):
    out = tmp_path / "out"
    result = export_attention(vit, [folder], out, image_size=32, threshold=0.6, batch_size=2, progress=False)
    assert result.exported == ["a", "a_1", "b"]  # input order; the second a.png gets a unique name
    skipped = json.loads((out / "skipped.json").read_text())
    assert sorted(Path(s["path"]).name for s in skipped) == ["broken.jpg", "notes.txt"]
    assert all(s["reason"] for s in skipped)

    expected_grid = {"a": (4, 5), "a_1": (5, 4), "b": (4, 4)}
    sources = {"a": folder / "a.png", "a_1": folder / "sub" / "a.png", "b": folder / "sub" / "b.jpg"}
    for name, (h, w) in expected_grid.items():
        directory = out / name
        attention = np.load(directory / "attention.npy")
        assert attention.shape == (2, h, w) and attention.dtype == np.float32
        image = prepare_image(Image.open(sources[name]), 32, 8)
        maps, _ = attention_maps(vit, normalise(image[None]))
        np.testing.assert_allclose(attention, maps[0].numpy(), atol=1e-6)
        assert np.asarray(Image.open(directory / "image.png")).shape == (h * 8, w * 8, 3)
        for col, values in [("head_00", maps[0, 0]), ("head_01", maps[0, 1]), ("mean", maps[0].mean(0))]:
            assert Image.open(directory / f"heat_{col}.png").size == (w * 8, h * 8)
            assert np.asarray(Image.open(directory / f"overlay_{col}.png")).shape == (h * 8, w * 8, 3)
            mask = np.asarray(Image.open(directory / f"mask_{col}.png"))
            assert set(np.unique(mask)) <= {0, 255}
            expected = mass_threshold_masks(values, 0.6).numpy().repeat(8, 0).repeat(8, 1)
            np.testing.assert_array_equal(mask > 0, expected)
    heat = np.asarray(Image.open(out / "a" / "heat_head_00.png"))
    assert len(np.unique(heat.reshape(-1, 3), axis=0)) > 2  # a real heat map, not a flat picture

    parser = check_gallery(out)
    assert parser.headers == ["image", "head_00", "head_01", "mean", "scale"]
    assert parser.rows == 4  # header + one row per image
    page = (out / "index.html").read_text()
    assert "colorbar.png" in page and "uniform 0.0500" in page  # a (4x5 patches): uniform = 1/20


def test_maps_share_one_scale_from_zero_and_the_export_runs_at_the_models_resolution(vit, folder, tmp_path):
    """Heat maps are not min-max stretched each on its own: a row shares [0, its largest weight], so a
    near-uniform map looks flat. Without image_size the model's own resolution is used."""
    out = tmp_path / "native"
    export_attention(vit, [folder / "sub" / "b.jpg"], out, progress=False)
    assert Image.open(out / "b" / "image.png").size == (32, 32)  # vit is a 32-px model
    assert "own resolution (32 px)" in (out / "index.html").read_text()
    uniform = np.full((4, 4), 1 / 16)
    flat = gallery.heatmap(uniform, (4, 4), vmax=uniform.max())
    assert len(np.unique(flat.reshape(-1, 3), axis=0)) == 1  # one colour: the maximum's
    peaked = np.full((4, 4), 0.5 / 15)
    peaked[0, 0] = 0.5
    maps = {"mean": uniform, "head_00": peaked}
    scale = gallery.shared_scale(maps)
    assert scale == {"vmax": 0.5, "uniform": 1 / 16}
    low = gallery.heatmap(uniform, (4, 4), gallery.column_vmax("mean", scale))
    assert tuple(low[0, 0]) != tuple(gallery.COLORMAP[-1])  # 1/16 of the max is not drawn as the max


def test_random_baseline_columns_sit_beside_the_trained_ones(vit, folder, tmp_path):
    torch.manual_seed(1)
    random = create_backbone("vit_tiny_patch8_32", **TINY).eval()
    out = tmp_path / "baseline"
    export_attention(vit, [folder / "sub" / "b.jpg"], out, progress=False, baseline=random)
    parser = check_gallery(out)
    assert parser.headers == ["image", "head_00", "head_01", "mean", "baseline_mean", "scale"]
    assert (out / "b" / "heat_baseline_mean.png").is_file()
    assert "baseline" in (out / "index.html").read_text()


def test_shards_brace_and_glob_patterns(vit, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    members = {
        "shard-000000.tar": [("s0.jpg", image_bytes(40, 32, 3, "JPEG")), ("s0.cls", b"1"), ("s1.png", image_bytes(32, 32, 4, "PNG"))],
        "shard-000001.tar": [("dir/s2.png", image_bytes(48, 32, 5, "PNG")), ("dir/s2.json", b"{}")],
    }
    for name, files in members.items():
        with tarfile.open(shards / name, "w") as tar:
            for member, data in files:
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "out"
    result = export_attention(vit, [str(shards / "shard-{000000..000001}.tar")], out, image_size=32, progress=False)
    assert sorted(result.exported) == ["s0", "s1", "s2"] and result.skipped == []
    assert np.load(out / "s2" / "attention.npy").shape == (2, 4, 6)
    out2 = tmp_path / "out2"
    assert sorted(export_attention(vit, [str(shards / "*.tar")], out2, image_size=32, progress=False).exported) == ["s0", "s1", "s2"]
    check_gallery(out2)
    (shards / "broken.tar").write_bytes(b"not a tar archive" * 40)
    with pytest.raises(ValueError, match="cannot read shard .*broken.tar"):
        export_attention(vit, [str(shards / "broken.tar")], tmp_path / "x", image_size=32, progress=False)
    with pytest.raises(FileNotFoundError, match="nothing matches"):
        export_attention(vit, [str(shards / "other-*.tar")], tmp_path / "x", image_size=32, progress=False)


def test_jaccard_with_foreground_masks(vit, folder, tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.fromarray(np.full((40, 56), 255, np.uint8)).save(masks / "a.png")  # everything is foreground
    save_image(tmp_path / "c.png", 40, 32, 7)  # already 32 high and 40 wide: no resize, no crop
    blob = np.zeros((32, 40), np.uint8)
    blob[5:21, 3:31] = 1  # a binary 0/1 PNG, not aligned with the 8x8 patches
    Image.fromarray(blob).save(masks / "c.png")
    out = tmp_path / "out"
    images = [folder / "a.png", folder / "sub" / "b.jpg", tmp_path / "c.png"]
    result = export_attention(vit, images, out, image_size=32, masks=masks, rollout=True, progress=False)
    report = json.loads((out / "jaccard.json").read_text())
    assert report == result.jaccard and report["missing_masks"] == ["b"] and report["images"] == 2
    columns = ("head_00", "head_01", "mean", "rollout")
    for col in columns:
        kept = np.asarray(Image.open(out / "a" / f"mask_{col}.png")) > 0
        assert report["per_image"]["a"][col] == pytest.approx(kept.mean())  # all foreground: J = kept fraction
        attention = np.load(out / "c" / "attention.npy")
        values = {"head_00": attention[0], "head_01": attention[1], "mean": attention.mean(0),
                  "rollout": np.load(out / "c" / "rollout.npy")}[col]
        kept = mass_threshold_masks(torch.from_numpy(values), 0.6).numpy().repeat(8, 0).repeat(8, 1)
        expected = (kept & (blob > 0)).sum() / (kept | (blob > 0)).sum()
        assert report["per_image"]["c"][col] == pytest.approx(expected)
    for name in ("a", "c"):
        scores = report["per_image"][name]
        assert scores["best"] == max(scores["head_00"], scores["head_01"])
        assert scores["best_head"] == int(scores["head_01"] > scores["head_00"])
    assert report["mean"]["best"] == pytest.approx((report["per_image"]["a"]["best"] + report["per_image"]["c"]["best"]) / 2)
    assert 0 < report["per_image"]["c"]["mean"] < 1
    assert np.load(out / "a" / "rollout.npy").shape == (4, 5)
    assert "J = " in (out / "index.html").read_text()
    check_gallery(out)


def test_no_images_is_an_error(vit, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("nothing to see")
    (empty / "fake.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="no readable images"):
        export_attention(vit, [empty], tmp_path / "out", image_size=32, progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_attention(vit, [tmp_path / "missing.png"], tmp_path / "out", image_size=32, progress=False)


def load_tool():
    spec = importlib.util.spec_from_file_location("export_attention_tool", ROOT / "tools" / "export_attention.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tool_end_to_end(vit, folder, tmp_path, capsys):
    checkpoint = tmp_path / "probe.ckpt"
    state = {f"backbone.{k}": v for k, v in vit.state_dict().items()}
    meta = backbone_metadata("probe", "vit_tiny_patch8_32", TINY, {"backbone": "backbone."}, "backbone")
    torch.save({"state_dict": state, CHECKPOINT_KEY: meta}, checkpoint)
    tool = load_tool()
    out = tmp_path / "out"
    argv = ["--weights", str(checkpoint), "--images", str(folder), "--output", str(out), "--image-size", "32",
            "--device", "cpu", "--batch-size", "2", "--rollout", "--no-progress"]
    assert tool.main(argv) == 0
    printed = capsys.readouterr().out
    assert "exported 3 images" in printed and "notes.txt" in printed and "broken.jpg" in printed
    assert (out / "a" / "heat_rollout.png").is_file()
    np.testing.assert_allclose(
        np.load(out / "b" / "attention.npy"),
        attention_maps(vit, normalise(prepare_image(Image.open(folder / "sub" / "b.jpg"), 32, 8)[None]))[0][0].numpy(),
        atol=1e-6,
    )
    assert check_gallery(out).headers[-2:] == ["rollout", "scale"]
    base = ["--weights", str(checkpoint), "--images", str(folder), "--output", str(tmp_path / "base"), "--device", "cpu",
            "--baseline", "random", "--no-progress"]  # no --image-size: the model's own
    assert tool.main(base) == 0
    assert check_gallery(tmp_path / "base").headers[-3:] == ["mean", "baseline_mean", "scale"]
    assert "own resolution (32 px)" in (tmp_path / "base" / "index.html").read_text()
    with pytest.raises(SystemExit) as exit_info:
        tool.main(argv[:2] + ["--images", str(folder / "notes.txt"), "--output", str(tmp_path / "o"), "--no-progress"])
    assert exit_info.value.code != 0 and "no readable images" in str(exit_info.value.code)


# -- thin images: a bounded token count, skips named, the page always written ----------------------
def test_a_thin_image_is_skipped_with_a_warning_naming_it_and_the_others_are_exported(vit, tmp_path):
    """A 1x300 PNG at a 32-px shorter side becomes 32x9600 px: 4,800 patches of 8 px (the issue's
    1x1000 image gave 64,000 at 4 px and a 32 GB allocation). It is skipped before it is decoded."""
    root = tmp_path / "images"
    save_image(root / "good.png", 32, 32, 0)
    thin = save_image(root / "thin.png", 1, 300, 1)
    with pytest.warns(UserWarning, match=rf"skipped {thin}: a 1x300 image .* is 32x9600 px: 4800 patches of 8 px, "
                                         r"more than max_tokens=4096"):
        result = export_attention(vit, [root], tmp_path / "out", image_size=32, progress=False)
    assert result.exported == ["good"]
    assert [s["path"] for s in result.skipped] == [str(thin)]
    assert json.loads((tmp_path / "out" / "skipped.json").read_text())[0]["path"] == str(thin)
    assert check_gallery(tmp_path / "out").rows == 2  # the header and the good image
    assert not (tmp_path / "out" / "thin").exists()
    assert export_attention(vit, [thin], tmp_path / "all", image_size=32, progress=False, max_tokens=None).exported == ["thin"]


def test_large_crops_go_in_smaller_batches():
    assert gallery.batch_size_for((224, 224), 16, 16, 4096) == 16  # 196 patches
    assert gallery.batch_size_for((512, 512), 8, 16, 4096) == 1  # 4,096 patches: one image's worth
    assert gallery.batch_size_for((512, 256), 8, 16, 4096) == 4
    assert gallery.batch_size_for((512, 512), 8, 16, None) == 16


def test_the_page_of_the_images_done_is_written_when_a_batch_fails(vit, folder, tmp_path, monkeypatch):
    calls = []
    original = gallery.export_batch

    def fail_second(model, images, names, *args, **kwargs):
        calls.append(names)
        if len(calls) == 2:
            raise RuntimeError("out of memory (simulated)")
        return original(model, images, names, *args, **kwargs)

    monkeypatch.setattr(gallery, "export_batch", fail_second)
    with pytest.raises(RuntimeError, match=r"attention export failed on .*images.* \(\d+x\d+ px, \d+ patches each\): "
                                           r"out of memory \(simulated\)"):
        export_attention(vit, [folder], tmp_path / "out", image_size=32, batch_size=1, progress=False)
    parser = check_gallery(tmp_path / "out")
    assert parser.rows == 2 and calls[0][0] in (tmp_path / "out" / "index.html").read_text()


def test_prepare_image_refuses_too_many_patches_before_resizing():
    thin = Image.new("RGB", (1, 300))
    with pytest.raises(ValueError, match="a 1x300 image .* 4800 patches of 8 px, more than max_tokens=4096"):
        prepare_image(thin, 32, 8, max_tokens=4096)
    assert prepare_image(thin, 32, 8).shape == (3, 9600, 32)
