"""Decoding to 8-bit RGB: 16-bit images keep their range, every mode converts faithfully or is refused
by name, and the EXIF orientation is applied alike in shards, image folders and the attention tools."""
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_vit.data import ImageFolderDataModule, ShardDataModule, write_shards
from ssl_vit.data.decode import CorruptSampleError, decode_sample, to_rgb
from ssl_vit.viz.images import prepare_image
from ssl_vit.viz.reconstruction import load_images


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def as_array(image: Image.Image) -> torch.Tensor:
    """PIL -> uint8 ``[H, W, 3]`` tensor, untouched (the loaders' transform in these tests)."""
    return torch.from_numpy(np.array(image))


GRADIENT16 = np.linspace(0, 65535, 64 * 8).round().astype(np.uint16).reshape(8, 64)
EXPECTED8 = np.round(GRADIENT16 / 257).astype(np.uint8)


def test_16_bit_png_keeps_its_range_through_the_shards(tmp_path):
    data = png(Image.fromarray(GRADIENT16))
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    image, label = decode_sample({"png": data})
    assert image.mode == "RGB" and label == -1
    pixels = np.asarray(image)
    assert (pixels == EXPECTED8[..., None]).all()  # convert("RGB") made every pixel above 255 white

    (tmp_path / "src" / "c0").mkdir(parents=True)
    (tmp_path / "src" / "c0" / "deep.png").write_bytes(data)
    write_shards(tmp_path / "src", tmp_path / "out", "train", 4, progress=False)
    module = ShardDataModule(str(tmp_path / "out" / "train-000000.tar"), val=str(tmp_path / "out" / "train-000000.tar"),
                             batch_size=1, num_workers=0, val_transform=as_array, pin_memory=False)
    module.setup()
    (images, _), = list(module.val_dataloader())
    assert (images[0].numpy() == EXPECTED8[..., None]).all()


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I"])
def test_16_bit_modes_scale_to_8_bits(mode):
    if mode == "I":
        image = Image.fromarray(GRADIENT16.astype(np.int32))
    else:
        order = ">" if mode == "I;16B" else "<"
        image = Image.frombytes(mode, (64, 8), GRADIENT16.astype(order + "u2").tobytes())
    assert image.mode == mode and (np.asarray(image) == GRADIENT16).all()
    assert (np.asarray(to_rgb(image)) == EXPECTED8[..., None]).all()


def test_other_modes_convert_like_pil_and_unfaithful_ones_are_refused():
    rgba = Image.fromarray(np.random.default_rng(0).integers(0, 256, (4, 4, 4), dtype=np.uint8), "RGBA")
    for mode in ("1", "L", "LA", "P", "RGBA", "CMYK", "YCbCr"):
        image = rgba.convert(mode)
        assert np.array_equal(np.asarray(to_rgb(image)), np.asarray(image.convert("RGB"))), mode
    palette = Image.new("P", (2, 2), 1)
    palette.putpalette([0, 0, 0, 10, 20, 30])
    palette.info["transparency"] = 0
    assert to_rgb(palette).getpixel((0, 0)) == (10, 20, 30)
    with pytest.raises(CorruptSampleError, match="image mode 'F'"):
        to_rgb(Image.new("F", (2, 2), 0.5))
    with pytest.raises(CorruptSampleError, match="image mode 'LAB'"):
        to_rgb(Image.new("LAB", (2, 2)))
    with pytest.raises(CorruptSampleError, match=r"'I' with values in \[-1, 70000\]"):
        to_rgb(Image.fromarray(np.array([[-1, 70000]], dtype=np.int32)))


def rotated_jpeg() -> bytes:
    """An 8 wide, 4 high JPEG, left half black, right half white, tagged "rotate 90 clockwise" (6)."""
    pixels = np.zeros((4, 8, 3), dtype=np.uint8)
    pixels[:, 4:] = 255
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    image.save(buf, format="JPEG", exif=exif, quality=100)
    return buf.getvalue()


def test_exif_orientation_is_applied_in_every_reader(tmp_path):
    data = rotated_jpeg()
    (tmp_path / "src" / "c0").mkdir(parents=True)
    path = tmp_path / "src" / "c0" / "rotated.jpg"
    path.write_bytes(data)
    upright = np.asarray(decode_sample({"jpg": data})[0])
    assert upright.shape == (8, 4, 3)  # 6: turned 90 degrees clockwise, so the white half is the bottom
    assert upright[:3].max() < 30 and upright[5:].min() > 225

    folder = ImageFolderDataModule(str(tmp_path / "src"), val=str(tmp_path / "src"), batch_size=1, num_workers=0,
                                   val_transform=as_array, pin_memory=False)
    (images, _), = list(folder.val_dataloader())
    assert np.array_equal(images[0].numpy(), upright)
    gallery = prepare_image(Image.open(path), image_size=8, patch=4)  # [3, H, W], shorter side 8
    assert tuple(gallery.shape) == (3, 16, 8) and gallery[:, :6].max() < 30 and gallery[:, 10:].min() > 225
    reconstruction = load_images([path], size=4, mean=(0, 0, 0), std=(1, 1, 1))  # centre 4x4 of the 4x8 upright
    assert reconstruction.shape == (1, 3, 4, 4)
    with pytest.raises(CorruptSampleError, match="image mode 'F'"):
        prepare_image(Image.new("F", (8, 8)), image_size=8, patch=4)
    Image.new("F", (8, 8)).save(tmp_path / "float.tif")
    with pytest.raises(ValueError, match=r"float\.tif.*image mode 'F'"):
        load_images([Path(tmp_path / "float.tif")], size=4)
