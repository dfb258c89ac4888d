"""The attention gallery's page: ``index.html`` with one row per image and one column per head, the
row's colour scale beside it, relative links only (no server, no network)."""
import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence
from urllib.parse import quote

import numpy as np
from PIL import Image

# Anchor colours of matplotlib's viridis at 0, 1/8, ..., 1 (interpolated linearly to 256 entries).
_VIRIDIS = np.array(
    [[68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 145, 140],
     [39, 173, 129], [92, 200, 99], [170, 220, 50], [253, 231, 37]], dtype=np.float64,
)
COLORMAP = np.stack(
    [np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_VIRIDIS)), _VIRIDIS[:, c]) for c in range(3)], axis=1
).round().astype(np.uint8)  # [256, 3]


@dataclass
class GalleryEntry:
    """One row of ``index.html``: the image's folder name, its columns, optional scores, and the
    row's colour scale (``shared_scale``)."""

    name: str
    columns: List[str]
    scores: Dict[str, float] = field(default_factory=dict)
    scale: Dict[str, float] = field(default_factory=dict)


def _link(name: str, file: str) -> str:
    return quote(f"{name}/{file}")


COLORBAR_NAME = "colorbar.png"


def write_colorbar(output: Path) -> None:
    """The colour scale, left (0) to right (the row's maximum), as ``colorbar.png``."""
    Image.fromarray(np.repeat(COLORMAP[None], 12, axis=0)).save(Path(output) / COLORBAR_NAME)


def _scale_cell(scale: Dict[str, float]) -> str:
    """A row's colour bar, from 0 to its maximum, with the uniform level marked."""
    if not scale or scale.get("vmax", 0) <= 0:
        return "<td></td>"
    vmax, uniform = scale["vmax"], scale["uniform"]
    at = min(uniform / vmax, 1.0) * 100
    text = f"0 &ndash; {vmax:.4f}<br>uniform {uniform:.4f}"
    if "rollout_vmax" in scale:
        text += f"<br>rollout: 0 &ndash; {scale['rollout_vmax']:.4f}"
    return (f'<td class="scale"><div class="bar"><img src="{COLORBAR_NAME}" alt="colour scale">'
            f'<span class="tick" style="left:{at:.1f}%"></span></div>{text}</td>')


def write_index(output: Path, entries: Sequence[GalleryEntry], title: str, note: str = "") -> Path:
    """``<output>/index.html``: one row per image, one column per head (+ mean, rollout, baseline),
    the row's colour scale, and a layout that fits the page width."""
    columns = entries[0].columns if entries else []
    head = "".join(f"<th>{html.escape(col)}</th>" for col in ["image", *columns, "scale"])
    write_colorbar(output)
    rows = []
    for entry in entries:
        cells = [
            f'<td><a href="{_link(entry.name, "image.png")}"><img src="{_link(entry.name, "image.png")}" alt=""></a>'
            f'<br>{html.escape(entry.name)}<br><a href="{_link(entry.name, "attention.npy")}">attention.npy</a></td>'
        ]
        for col in entry.columns:
            score = f"<br>J = {entry.scores[col]:.3f}" if col in entry.scores else ""
            heat, over, mask = (_link(entry.name, f"{kind}_{col}.png") for kind in ("heat", "overlay", "mask"))
            cells.append(
                f'<td><a href="{heat}"><img src="{heat}" alt=""></a><a href="{over}"><img src="{over}" alt=""></a>'
                f'<br><a href="{mask}">mask</a>{score}</td>'
            )
        cells.append(_scale_cell(entry.scale))
        rows.append("<tr>" + "".join(cells) + "</tr>")
    page = (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>" + html.escape(title) + "</title><style>"
        "body{font-family:sans-serif;font-size:12px}table{table-layout:fixed;width:100%}"
        "td,th{padding:2px;text-align:center;vertical-align:top;overflow-wrap:anywhere}"
        "img{width:100%;max-width:160px;display:block;margin:auto;image-rendering:pixelated}"
        ".bar{position:relative}.bar img{height:12px;max-width:none}"
        ".tick{position:absolute;top:-3px;width:2px;height:18px;background:#d00}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>{html.escape(note)}</p><p>Every map of a row shares the colour scale "
        "of its last column: 0 (dark) to the row's largest attention weight (yellow); the red tick marks "
        "the uniform level (1 / patches), what attention spread evenly would show.</p>"
        f"<table><tr>{head}</tr>\n"
        + "\n".join(rows) + "\n</table></body></html>\n"
    )
    path = Path(output) / "index.html"
    path.write_text(page, encoding="utf-8")
    return path
