"""PNG scatter plots drawn with PIL: round ticks covering the data, one colour per series, clear errors."""
import numpy as np
import pytest
from PIL import Image

from ssl_vit.viz.plot import COLOURS, nice_ticks, scatter_png


@pytest.mark.parametrize("low, high, step", [(0.0, 1.0, 0.2), (33.3, 91.1, 20.0), (14.3, 17.5, 1.0), (5.0, 5.0, 0.2)])
def test_ticks_are_round_and_cover_the_range(low, high, step):
    ticks = nice_ticks(low, high)
    assert ticks[0] <= low and ticks[-1] >= high
    assert np.allclose(np.diff(ticks), step)


def test_each_series_is_drawn_in_its_colour(tmp_path):
    path = scatter_png(tmp_path / "plot.png", {"a": [(1, 1), (2, 3)], "b": [(10, 2)]}, "x", "y", log_x=True)
    pixels = {tuple(p) for p in np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)}
    for colour in COLOURS[:2]:
        assert tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5)) in pixels
    assert tuple(int(COLOURS[2][i:i + 2], 16) for i in (1, 3, 5)) not in pixels


def test_y_from_zero_moves_the_points_up(tmp_path):
    def lowest_dot_row(path):
        pixels = np.asarray(Image.open(path).convert("RGB"))
        colour = np.array([int(COLOURS[0][i:i + 2], 16) for i in (1, 3, 5)])
        return np.nonzero((pixels == colour).all(axis=-1))[0].max()
    points = {"": [(1, 15.0), (2, 17.0)]}
    tight = scatter_png(tmp_path / "tight.png", points, "layer", "px", x_ticks=[1, 2])
    zero = scatter_png(tmp_path / "zero.png", points, "layer", "px", x_ticks=[1, 2], y_from_zero=True)
    assert lowest_dot_row(zero) < lowest_dot_row(tight) - 100  # 15 px is far above the bottom of a 0-20 axis


@pytest.mark.parametrize("series, log_x, message", [
    ({"a": []}, False, "nothing to plot"), ({"a": [(1, float("nan"))]}, False, "non-finite"),
    ({"a": [(0, 1)]}, True, "needs every x > 0"),
])
def test_bad_points_are_named(tmp_path, series, log_x, message):
    with pytest.raises(ValueError, match=message):
        scatter_png(tmp_path / "p.png", series, "x", "y", log_x=log_x)
