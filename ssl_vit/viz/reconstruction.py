"""MAE reconstructions as pictures: one row per image, four panels

    original | masked input | reconstruction | reconstruction with the visible patches pasted back

Used by the ``ReconstructionLogger`` callback during training and by ``tools/visualize_mae.py`` for
any image files and any MAE checkpoint ``load_mae`` reads.
"""
import math
from pathlib import Path
from typing import List, Optional, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.utils import make_grid
from tqdm.auto import tqdm

from ssl_vit.checkpoints.io import PathLike
from ssl_vit.checkpoints.mae import load_mae
from ssl_vit.data.decode import IMAGE_SUFFIXES, CorruptSampleError, to_rgb
from ssl_vit.data.transforms import EvalTransform
from ssl_vit.models.patches import unpatchify

MASK_GREY = 0.5  # colour of hidden patches in the "masked input" panel


def mask_noise(batch_size: int, num_patches: int, seed: int) -> torch.Tensor:
    """Reproducible masking scores ``[B, L]`` (the same seed hides the same patches)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch_size, num_patches, generator=generator)


def _to_display(images: torch.Tensor, mean: Optional[Sequence[float]], std: Optional[Sequence[float]]) -> torch.Tensor:
    if mean is None or std is None:
        return images.clamp(0, 1)
    channels = images.shape[1]
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean/std have {len(mean)}/{len(std)} values for {channels}-channel images")
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images * std_t + mean_t).clamp(0, 1)


@torch.no_grad()
def reconstruction_panels(
    module: "torch.nn.Module",
    images: torch.Tensor,
    mask_ratio: float = 0.75,
    mean: Optional[Sequence[float]] = IMAGENET_DEFAULT_MEAN,
    std: Optional[Sequence[float]] = IMAGENET_DEFAULT_STD,
    noise: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The four panels of each image, in ``[0, 1]``, computed in eval mode.

    Args:
        module: an ``ssl_vit.methods.mae.MAE`` (anything with ``reconstruct``,
            ``predictions_to_images`` and ``patch_size``).
        images: normalised images ``[B, C, H, W]`` (moved to the module's device).
        mask_ratio: fraction of patches hidden.
        mean, std: the normalisation to undo for display; ``None`` if ``images`` are in ``[0, 1]``.
        noise: optional ``[B, L]`` masking scores (see :func:`mask_noise`).

    Returns:
        ``[B, 4, C, H, W]``: original, masked, reconstruction, reconstruction + visible patches.
    """
    device = next(module.parameters()).device
    images = images.to(device=device, dtype=torch.float32)
    was_training = module.training
    module.eval()
    try:
        pred, mask = module.reconstruct(images, mask_ratio=mask_ratio, noise=noise)  # [B, L, ppC], [B, L]
        recon = module.predictions_to_images(pred.float(), images)  # [B, C, H, W]
    finally:
        module.train(was_training)
    p, (height, width) = module.patch_size, images.shape[-2:]
    pixel_mask = unpatchify(
        mask.unsqueeze(-1).expand(-1, -1, p * p * images.shape[1]).float(), p, (height // p, width // p)
    )  # [B, C, H, W], 1 = hidden
    original = _to_display(images, mean, std)
    recon = _to_display(recon, mean, std)
    masked = original * (1 - pixel_mask) + MASK_GREY * pixel_mask
    pasted = original * (1 - pixel_mask) + recon * pixel_mask
    return torch.stack([original, masked, recon, pasted], dim=1).cpu()


def reconstruction_grid(
    module: "torch.nn.Module",
    images: torch.Tensor,
    mask_ratio: float = 0.75,
    mean: Optional[Sequence[float]] = IMAGENET_DEFAULT_MEAN,
    std: Optional[Sequence[float]] = IMAGENET_DEFAULT_STD,
    noise: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """:func:`reconstruction_panels` laid out as one picture, a row of four panels per image.

    Returns:
        ``[C, rows * (H + 2) + 2, 4 * (W + 2) + 2]`` float tensor in ``[0, 1]``.
    """
    panels = reconstruction_panels(module, images, mask_ratio, mean, std, noise)  # [B, 4, C, H, W]
    return make_grid(panels.flatten(0, 1), nrow=4, padding=2, pad_value=1.0)


def grid_to_pil(grid: torch.Tensor) -> Image.Image:
    """``[C, H, W]`` float in ``[0, 1]`` -> PIL image."""
    array = grid.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to(torch.uint8).numpy()
    return Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array)


COLUMNS = ("original", "masked", "reconstruction", "pasted")  # the panels of reconstruction_panels
LABEL_HEIGHT = 14


def labelled(grid: torch.Tensor, columns: Sequence[str] = COLUMNS, padding: int = 2) -> Image.Image:
    """The grid with a header naming its columns; small images are enlarged (nearest neighbour, so
    every pixel stays as it is) until each label fits above its column."""
    image = grid_to_pil(grid).convert("RGB")
    cell = (image.width - padding) / len(columns)
    font = ImageFont.load_default()
    widest = max(ImageDraw.Draw(image).textlength(c, font=font) for c in columns) + 4
    scale = max(1, math.ceil(widest / cell))
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
        cell *= scale
    out = Image.new("RGB", (image.width, image.height + LABEL_HEIGHT), "white")
    out.paste(image, (0, LABEL_HEIGHT))
    draw = ImageDraw.Draw(out)
    for i, name in enumerate(columns):
        x = padding * scale + i * cell + (cell - draw.textlength(name, font=font)) / 2
        draw.text((x, 1), name, fill="black", font=font)
    return out


def image_files(paths: Sequence[PathLike]) -> List[Path]:
    """Image files named directly or found (recursively, sorted) in the folders named."""
    files: List[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {path}")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"image path not found: {path}")
    return files


def load_images(
    files: Sequence[PathLike],
    size: int,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> torch.Tensor:
    """Read image files (upright, as 8-bit RGB: :func:`ssl_vit.data.decode.to_rgb`), resize the shorter side to
    ``size``, centre-crop, normalise.

    Returns:
        ``[N, 3, size, size]`` float32.
    """
    transform = EvalTransform(size=size, crop_pct=1.0, mean=mean, std=std)
    images = []
    for file in files:
        try:
            with Image.open(file) as image:
                images.append(transform(to_rgb(image)))
        except (OSError, CorruptSampleError) as err:
            raise ValueError(f"cannot read image {file}: {err}") from err
    return torch.stack(images)


def visualize_mae(
    weights: PathLike,
    images: Sequence[PathLike],
    output: PathLike,
    mask_ratio: float = 0.75,
    image_size: Optional[int] = None,
    seed: int = 0,
    per_page: int = 8,
    progress: bool = True,
) -> List[Path]:
    """Write reconstruction grids of image files for an MAE checkpoint (see ``load_mae``).

    Args:
        weights: an ssl_vit MAE Lightning checkpoint or a facebookresearch/mae checkpoint.
        images: image files and/or folders.
        output: folder for ``reconstructions_000.png``, ``reconstructions_001.png``... (``per_page``
            images each).
        mask_ratio: fraction of patches hidden.
        image_size: side the images are resized and cropped to; defaults to the model's.
        seed: seed of the masking noise.
        per_page: rows per picture.
        progress: show a bar of the images reconstructed (tqdm, on stderr).

    Returns:
        The PNG files written.
    """
    if per_page < 1:
        raise ValueError(f"per_page must be >= 1, got {per_page}")
    module = load_mae(weights)
    if image_size is None:
        grid = module.encoder.vit.patch_embed.grid_size
        image_size = grid[0] * module.patch_size
    if image_size % module.patch_size:
        raise ValueError(f"image size {image_size} is not a multiple of the patch size {module.patch_size}")
    batch = load_images(image_files(images), image_size)
    num_patches = (image_size // module.patch_size) ** 2
    noise = mask_noise(len(batch), num_patches, seed)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    written = []
    with tqdm(total=len(batch), unit="img", disable=not progress, desc="MAE reconstructions") as bar:
        for page, start in enumerate(range(0, len(batch), per_page)):
            chunk = slice(start, start + per_page)
            grid = reconstruction_grid(module, batch[chunk], mask_ratio, noise=noise[chunk])
            path = output / f"reconstructions_{page:03d}.png"
            labelled(grid).save(path)
            written.append(path)
            bar.update(len(batch[chunk]))
    return written
