"""Scatter plots as PNG files, drawn with PIL (matplotlib is not a dependency of ssl_vit).

One function, :func:`scatter_png`: labelled axes with round tick values (linear or log10 x), one
colour per named series, a legend. Used for the attention-distance plot (layers on x, one dot per
head) and the design study's accuracy against parameters and FLOPs.
"""
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

from PIL import Image, ImageDraw, ImageFont

Point = Tuple[float, float]
# Tableau 10: distinguishable, and readable on white.
COLOURS = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
           "#bab0ac"]


def nice_ticks(low: float, high: float, count: int = 6) -> List[float]:
    """About ``count`` round values (1, 2 or 5 times a power of ten apart) covering ``[low, high]``."""
    if not math.isfinite(low) or not math.isfinite(high):
        raise ValueError(f"cannot place ticks on [{low}, {high}]")
    if high <= low:
        low, high = low - 0.5, high + 0.5
    raw = (high - low) / max(count - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    start = math.floor(low / step) * step
    return [start + i * step for i in range(int(math.ceil((high - start) / step + 1e-9)) + 1)]


def _label(value: float) -> str:
    return f"{value:.6g}" if abs(value) < 1e5 else f"{value:.1e}"


def scatter_png(
    path: Union[str, Path],
    series: Dict[str, Sequence[Point]],
    x_label: str,
    y_label: str,
    title: str = "",
    log_x: bool = False,
    x_ticks: Optional[Sequence[float]] = None,
    y_from_zero: bool = False,
    size: Tuple[int, int] = (720, 480),
) -> Path:
    """Draw each series' points in its own colour and write a PNG.

    Args:
        path: output file (its folder is created).
        series: legend label -> ``(x, y)`` points; a single series with label ``""`` gets no legend.
        x_label, y_label, title: axis labels and the title above the plot.
        log_x: log10 x axis (every x must be > 0), ticks at powers of ten and their 2x / 5x.
        x_ticks: explicit x tick values (e.g. the layer indices), else round values.
        y_from_zero: start the y axis at 0 (distances), not just below the smallest value.
        size: image ``(width, height)`` in pixels.

    Returns:
        ``path``.

    Raises:
        ValueError: no points, a non-finite value, or ``x <= 0`` with ``log_x``.
    """
    points = [p for pts in series.values() for p in pts]
    if not points:
        raise ValueError(f"nothing to plot in {path}")
    if not all(math.isfinite(v) for p in points for v in p):
        raise ValueError(f"non-finite values in the points of {path}")
    if log_x and min(x for x, _ in points) <= 0:
        raise ValueError(f"log x axis of {path} needs every x > 0")
    fx = (lambda v: math.log10(v)) if log_x else (lambda v: v)
    xs, ys = [fx(x) for x, _ in points], [y for _, y in points]
    lo, hi = min(xs), max(xs)
    if log_x and hi - lo < 0.5:  # at least half a decade, so that a tick falls inside
        lo, hi = (lo + hi) / 2 - 0.25, (lo + hi) / 2 + 0.25
    if x_ticks is not None:
        x_values = list(x_ticks)
    elif log_x:
        x_values = [m * 10 ** e for e in range(math.floor(lo), math.ceil(hi) + 1) for m in (1, 2, 5)
                    if lo - 0.05 <= math.log10(m * 10 ** e) <= hi + 0.05]
    else:
        x_values = nice_ticks(lo, hi)
    y_values = nice_ticks(min(ys + [0.0]) if y_from_zero else min(ys), max(ys))
    x_low, x_high = min([fx(v) for v in x_values] + [lo]), max([fx(v) for v in x_values] + [hi])
    y_low, y_high = min(y_values + ys), max(y_values + ys)
    if x_high == x_low:
        x_low, x_high = x_low - 1, x_high + 1
    pad_x = 0.04 * (x_high - x_low)
    x_low, x_high = x_low - pad_x, x_high + pad_x

    width, height = size
    left, right, top, bottom = 70, 20 + (150 if any(series) else 0), 36, 50
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()

    def px(x: float, y: float) -> Tuple[float, float]:
        return (left + (x - x_low) / (x_high - x_low) * (width - left - right),
                height - bottom - (y - y_low) / (y_high - y_low) * (height - top - bottom))

    for value in y_values:
        _, y = px(x_low, value)
        draw.line([(left, y), (width - right, y)], fill="#e6e6e6")
        draw.text((left - 6, y), _label(value), fill="black", font=font, anchor="rm")
    for value in x_values:
        x, _ = px(fx(value), y_low)
        draw.line([(x, top), (x, height - bottom)], fill="#e6e6e6")
        draw.text((x, height - bottom + 6), _label(value), fill="black", font=font, anchor="ma")
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    draw.text(((left + width - right) / 2, height - 18), x_label + (" (log scale)" if log_x else ""), fill="black",
              font=font, anchor="ma")
    draw.text((8, top - 22), y_label, fill="black", font=font)
    draw.text((width / 2, 6), title, fill="black", font=font, anchor="ma")
    for i, (name, pts) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        for x, y in pts:
            cx, cy = px(fx(x), y)
            draw.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=colour, outline="black")
        if name:
            ly = top + 8 + 18 * i
            draw.ellipse([width - right + 12, ly - 4, width - right + 20, ly + 4], fill=colour, outline="black")
            draw.text((width - right + 26, ly), name, fill="black", font=font, anchor="lm")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
