"""The ``jpeg_decoder="torchvision"`` switch: torchvision decodes a JPEG's pixels inside the one decode path
(PIL still checks the header), gives PIL's pixels, falls back to PIL for everything else, and reaches the
transforms that take uint8 tensors through both data modules."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

import ssl_vit.data.decode as decode
from ssl_vit.data import ImageFolderDataModule, PretrainTransform, ShardDataModule, write_shards
from ssl_vit.data.decode import CorruptSampleError, decode_hooks, decode_image, decode_sample, open_image, to_rgb
from ssl_vit.data.gpu_augment import MultiCropCrops
from ssl_vit.data.multicrop import MultiCropTransform

TV = "torchvision"


def photo(h: int, w: int, seed: int) -> np.ndarray:
    """Smooth colour, a fine texture and noise: content that exercises every DCT coefficient."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([128 + 70 * np.sin(rng.uniform(2, 12) * (xx + yy * c) / max(h, w)) for c in range(3)], -1)
    texture = 40 * np.sin(2 * np.pi * (xx * np.cos(seed) + yy * np.sin(seed)) / rng.uniform(3, 9))
    return np.clip(base + texture[..., None] + rng.normal(0, 10, (h, w, 3)), 0, 255).astype(np.uint8)


def encode(image: Image.Image, fmt: str = "JPEG", orientation: int = 1, **kwargs) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    image.save(out, fmt, exif=exif.tobytes(), **kwargs)
    return out.getvalue()


def pil_pixels(data: bytes) -> torch.Tensor:
    """The PIL path's upright RGB pixels, ``uint8`` ``[3, H, W]``."""
    return torch.from_numpy(np.array(to_rgb(open_image(data)))).permute(2, 0, 1)


def levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    assert a.shape == b.shape
    return (a.int() - b.int()).abs()


@pytest.mark.parametrize("mode, options", [
    ("RGB", dict(quality=90)), ("RGB", dict(quality=75, progressive=True)), ("RGB", dict(quality=95, subsampling=0)),
    ("L", dict(quality=90)), ("CMYK", dict(quality=90)),
])
def test_torchvision_gives_pils_pixels_as_a_channels_last_tensor(mode, options):
    """Both decoders are libjpeg-turbo; IDCT rounding could differ between versions by one level, so one
    level is allowed (measured here: identical, max and mean difference 0, in every mode)."""
    data = encode(Image.fromarray(photo(75, 100, seed=3)).convert(mode), **options)
    assert Image.open(io.BytesIO(data)).mode == mode
    x = decode_image(data, jpeg_decoder=TV)
    assert type(x) is torch.Tensor and x.dtype == torch.uint8 and x.shape == (3, 75, 100)
    assert x.stride() == (1, 300, 3)  # channels-last: what torch_resize crops fastest, no copy needed
    diff = levels(x, pil_pixels(data))
    assert diff.max() <= 1 and diff.float().mean() < 0.01, (diff.max(), diff.float().mean())
    image = decode_image(data)  # the default stays PIL's
    assert isinstance(image, Image.Image) and image.mode == "RGB"


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_gives_the_pil_paths_upright_image(orientation):
    data = encode(Image.fromarray(photo(30, 40, seed=4)), orientation=orientation)
    x, upright = decode_image(data, jpeg_decoder=TV), pil_pixels(data)
    assert x.shape == upright.shape == ((3, 40, 30) if orientation >= 5 else (3, 30, 40))
    assert levels(x, upright).max() <= 1


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_other_formats_go_the_pil_way(fmt):
    data = encode(Image.fromarray(photo(20, 24, seed=5)), fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    image = decode_image(data, jpeg_decoder=TV)
    assert isinstance(image, Image.Image) and image.mode == "RGB"
    assert np.array_equal(np.array(image), np.array(to_rgb(open_image(data))))


def test_a_draft_is_pils_and_wins():
    data = encode(Image.fromarray(photo(64, 80, seed=6)))
    drafted = decode_image(data, lambda w, h: (w // 2, h // 2), jpeg_decoder=TV)
    assert isinstance(drafted, Image.Image) and drafted.size == (40, 32)
    assert type(decode_image(data, lambda w, h: None, jpeg_decoder=TV)) is torch.Tensor


def test_corrupt_bytes_raise_corrupt_sample_error(monkeypatch):
    data = encode(Image.fromarray(photo(64, 64, seed=7)))
    for bad in (data[: len(data) // 2], data[:-40], b"\xff\xd8\xff\xe0 not a jpeg", b""):
        with pytest.raises(CorruptSampleError, match="undecodable image"):
            decode_image(bad, jpeg_decoder=TV)
    with pytest.raises(CorruptSampleError, match="no image member"):
        decode_sample({"cls": b"1"}, jpeg_decoder=TV)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL's header check still guards torchvision
    with pytest.raises(CorruptSampleError, match="DecompressionBomb"):
        decode_image(data, jpeg_decoder=TV)


def test_what_torchvision_cannot_decode_is_left_to_pil(monkeypatch):
    def fails(*args, **kwargs):
        raise RuntimeError("decode_jpeg: unsupported")

    monkeypatch.setattr(decode, "decode_jpeg", fails)
    data = encode(Image.fromarray(photo(20, 30, seed=8)))
    image = decode_image(data, jpeg_decoder=TV)
    assert isinstance(image, Image.Image) and np.array_equal(np.array(image), np.array(to_rgb(open_image(data))))


def test_the_switch_is_off_by_default_and_checked_at_construction():
    for transform in (PretrainTransform(), MultiCropTransform(), MultiCropCrops(), None):
        assert decode_hooks(transform)["jpeg_decoder"] == "pil"
    for make in (PretrainTransform, MultiCropTransform, MultiCropCrops):
        assert make(torch_resize=True, jpeg_decoder=TV).jpeg_decoder == TV
        with pytest.raises(ValueError, match=r"jpeg_decoder='torchvision' needs torch_resize=True") as err:
            make(jpeg_decoder=TV)
        assert make.__name__ in str(err.value)
        with pytest.raises(ValueError, match=r"jpeg_decoder must be one of 'pil', 'torchvision', got 'nvjpeg'"):
            make(torch_resize=True, jpeg_decoder="nvjpeg")
    with pytest.raises(ValueError, match="jpeg_decoder must be one of"):
        decode_image(b"", jpeg_decoder="turbo")


@pytest.mark.parametrize("make", [
    lambda: PretrainTransform(size=32, torch_resize=True, jpeg_decoder=TV),
    lambda: MultiCropTransform(32, 16, num_local=2, torch_resize=True, jpeg_decoder=TV),
    lambda: MultiCropCrops(32, 16, num_local=2, torch_resize=True, jpeg_decoder=TV),
])
def test_transforms_give_the_same_views_from_either_decoder(make):
    """Same seed, same views as from PIL's decode (within a level): the crop, flip and colour draws and
    the resampling see the same pixels in the same layout, so every distribution test of the
    ``torch_resize`` path holds with the switch on."""
    transform = make()
    for seed in range(4):
        data = encode(Image.fromarray(photo(60 + 7 * seed, 80, seed=seed)), orientation=1 + 2 * seed)
        outputs = []
        for image in (decode_image(data, **decode_hooks(transform)), to_rgb(open_image(data))):
            torch.manual_seed(seed)
            out = transform(image)
            outputs.append(out if isinstance(out, list) else [out])
        assert type(decode_image(data, **decode_hooks(transform))) is torch.Tensor
        for a, b in zip(*outputs):
            scale = 1 if a.dtype == torch.uint8 else 255 * torch.tensor(transform.std).view(3, 1, 1)
            assert ((a.float() - b.float()) * scale).abs().max() <= 1.01


class Recording(PretrainTransform):
    """PretrainTransform that records the type of what it is given."""

    seen: list

    def __call__(self, image):
        self.seen.append(type(image))
        return super().__call__(image)


@pytest.mark.parametrize("source", ["shards", "folder"])
def test_data_modules_decode_with_the_transforms_switch(tmp_path, source):
    for i in range(8):
        (tmp_path / "src" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo(24, 32, seed=i)).save(tmp_path / "src" / f"c{i % 2}" / f"{i}.jpg", quality=90)
    transform = Recording(size=16, torch_resize=True, jpeg_decoder=TV)
    transform.seen = []
    common = dict(batch_size=4, num_workers=0, train_transform=transform, pin_memory=False)
    if source == "shards":
        write_shards(tmp_path / "src", tmp_path / "shards", "train", 4, progress=False)
        module = ShardDataModule(str(tmp_path / "shards" / "train-{000000..000001}.tar"), **common)
    else:
        module = ImageFolderDataModule(str(tmp_path / "src"), **common)
    module.setup("fit")
    images, labels = next(iter(module.train_dataloader()))
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.float32 and labels.shape == (4,)
    assert transform.seen and set(transform.seen) == {torch.Tensor}  # torchvision decoded every image
