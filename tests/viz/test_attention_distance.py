"""Mean attention distance (ViT paper, Fig. 7) and attention entropy on hand-built attention, where
the answer is known exactly, and on a real ViT."""
import itertools
import math

import pytest
import torch

from ssl_vit.models.backbone import create_backbone
from ssl_vit.viz.attention import self_attention
from ssl_vit.viz.attention_distance import attention_statistics, measure_attention_distance, plot_attention_distance
from ssl_vit.viz.images import normalise


def mean_pairwise_distance(n: int, patch: int) -> float:
    """Mean Euclidean distance between the centres of two cells of an n x n grid (pairs with itself
    included), by enumeration."""
    cells = list(itertools.product(range(n), repeat=2))
    total = sum(math.dist(a, b) for a in cells for b in cells)
    return patch * total / len(cells) ** 2


def identity(tokens: int, batch: int = 2, heads: int = 3) -> torch.Tensor:
    return torch.eye(tokens).expand(batch, heads, tokens, tokens).clone()


@pytest.mark.parametrize("prefix", [0, 1, 5])
def test_attending_only_to_itself_is_distance_zero(prefix):
    stats = attention_statistics(identity(prefix + 16), (4, 4), 8, prefix)
    assert torch.equal(stats["distance"], torch.zeros(2, 3, dtype=torch.float64))
    assert torch.equal(stats["entropy"], torch.zeros(2, 3, dtype=torch.float64))
    assert torch.equal(stats["prefix_share"], torch.zeros(2, 3, dtype=torch.float64))


@pytest.mark.parametrize("n, patch, prefix", [(2, 16, 1), (3, 4, 1), (5, 8, 0), (7, 16, 2)])
def test_uniform_attention_is_the_mean_pairwise_distance(n, patch, prefix):
    tokens = prefix + n * n
    attention = torch.full((1, 2, tokens, tokens), 1.0 / tokens)
    stats = attention_statistics(attention, (n, n), patch, prefix)
    assert stats["distance"] == pytest.approx(torch.full((1, 2), mean_pairwise_distance(n, patch)), rel=1e-6)
    assert stats["entropy"] == pytest.approx(torch.full((1, 2), math.log(tokens)), rel=1e-6)
    assert stats["prefix_share"] == pytest.approx(torch.full((1, 2), prefix / tokens), rel=1e-6)


def test_the_cls_share_is_left_out_not_counted_as_zero_distance():
    """Each patch attends half to CLS, half to the patch on its right (wrapping): the distance is
    that of the patch part alone, and the CLS half is the prefix share."""
    h, w, patch = 2, 4, 10
    tokens = 1 + h * w
    attention = torch.zeros(1, 1, tokens, tokens)
    attention[0, 0, 0, 0] = 1
    for r, c in itertools.product(range(h), range(w)):
        query = 1 + r * w + c
        attention[0, 0, query, 0] = 0.5
        attention[0, 0, query, 1 + r * w + (c + 1) % w] = 0.5
    stats = attention_statistics(attention, (h, w), patch, 1)
    expected = patch * ((w - 1) * 1 + (w - 1)) / w  # w-1 steps of one patch, one wrap of w-1 patches
    assert float(stats["distance"]) == pytest.approx(expected)
    assert float(stats["prefix_share"]) == pytest.approx(0.5)
    assert float(stats["entropy"]) == pytest.approx(math.log(2))


def test_attention_that_does_not_fit_the_grid_is_an_error():
    with pytest.raises(ValueError, match=r"does not fit 1 prefix tokens \+ a 4x4 grid"):
        attention_statistics(identity(16), (4, 4), 8, 1)


def test_a_vit_per_layer_and_head(tmp_path):
    torch.manual_seed(0)
    model = create_backbone("vit_tiny_patch4", img_size=16, embed_dim=32, depth=3, num_heads=2).eval()
    images = [torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8) for _ in range(3)]
    images.append(torch.randint(0, 256, (3, 16, 24), dtype=torch.uint8))  # another grid: its own batch
    result = measure_attention_distance(model, images, batch_size=2)
    assert result.distance.shape == result.entropy.shape == (3, 2) and result.images == 4
    # the last block, image by image, from the single-block path
    per_image = [attention_statistics(self_attention(model, normalise(im[None])), (im.shape[1] // 4, im.shape[2] // 4),
                                      4, 1)["distance"][0] for im in images]
    assert result.distance[-1] == pytest.approx(torch.stack(per_image).mean(dim=0), rel=1e-5)
    assert (result.distance > 0).all() and (result.distance < math.dist((0, 0), (12, 20))).all()
    written = plot_attention_distance(result, tmp_path, title="tiny")
    assert [p.name for p in written] == ["attention_distance.png", "attention_entropy.png"]
    assert all(p.stat().st_size > 1000 for p in written)


def test_no_images_is_an_error():
    with pytest.raises(ValueError, match="at least one image"):
        measure_attention_distance(create_backbone("vit_tiny_patch4", img_size=16, embed_dim=32, depth=1,
                                                   num_heads=2), [])
