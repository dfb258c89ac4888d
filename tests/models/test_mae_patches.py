"""Patchify / unpatchify: the reference (p, q, c) layout and exact round trips."""
import pytest
import torch

from ssl_vit.models.patches import patchify, unpatchify


def reference_patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """facebookresearch/mae `patchify`, written out with reshape + permute (square images)."""
    n, c, height, _ = images.shape
    h = height // p
    x = images.reshape(n, c, h, p, h, p)
    x = x.permute(0, 2, 4, 3, 5, 1)  # n h w p q c
    return x.reshape(n, h * h, p * p * c)


def test_patchify_matches_the_reference_layout():
    images = torch.randn(2, 3, 16, 16)
    patches = patchify(images, 4)
    assert torch.equal(patches, reference_patchify(images, 4))
    # patch (row 1, col 2), pixel (p=3, q=0), channel 2 sits at index (3 * 4 + 0) * 3 + 2
    assert patches[1, 1 * 4 + 2, (3 * 4 + 0) * 3 + 2] == images[1, 2, 1 * 4 + 3, 2 * 4 + 0]


@pytest.mark.parametrize("shape,p", [((2, 3, 16, 16), 4), ((1, 3, 12, 20), 4), ((3, 1, 14, 14), 7)])
def test_unpatchify_inverts_patchify(shape, p):
    images = torch.randn(shape)
    grid = (shape[2] // p, shape[3] // p)
    patches = patchify(images, p)
    assert patches.shape == (shape[0], grid[0] * grid[1], p * p * shape[1])
    assert torch.equal(unpatchify(patches, p, grid), images)
    assert torch.equal(patchify(unpatchify(patches, p, grid), p), patches)


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="not divisible"):
        patchify(torch.randn(1, 3, 15, 16), 4)
    with pytest.raises(ValueError, match="square grid"):
        unpatchify(torch.randn(1, 12, 48), 4)
    with pytest.raises(ValueError, match="does not hold"):
        unpatchify(torch.randn(1, 12, 48), 4, (2, 5))
