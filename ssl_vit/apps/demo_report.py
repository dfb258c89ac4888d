"""What `ssl-vit demo` shows: the results table, the one-line reading of it, and ``index.html``.

``index.html`` is one self-contained page next to the demo's outputs: the table, the MAE
reconstruction grids, the DINO attention maps (the gallery's own PNGs) and a t-SNE scatter of the
DINO features of the held-out digits, drawn as inline SVG (no plotting dependency). Every link is
relative, so the folder can be moved or zipped.
"""
import html
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np

# ten distinguishable colours (the "tab10" palette), one per digit
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
COLUMNS = ("features", "k-NN top-1", "{n}-label probe", "stage time")


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def _probe(row: Dict[str, Any]) -> str:
    probe = row["few_label"]
    return f"{100 * probe['mean']:.1f}% ± {100 * probe['std']:.1f}"


def _stage(row: Dict[str, Any]) -> str:
    return f"{row['stage']} {row['time_s']:.0f} s"


def table_rows(summary: Dict[str, Any]) -> List[List[str]]:
    """Header then one row per feature set, as strings: features | k-NN | probe | stage time."""
    per_class = summary["few_label"]["per_class"]
    header = [c.format(n=per_class) for c in COLUMNS]
    return [header] + [[r["features"], _percent(r["knn_top1"]), _probe(r), _stage(r)] for r in summary["results"]]


def verdict(summary: Dict[str, Any]) -> str:
    """One line saying what the numbers mean, whichever way they came out."""
    rows = {r["features"].split(" (")[0]: r for r in summary["results"]}
    pixels = rows["raw pixels"]
    lifts = []
    for name in summary["methods"]:
        trained, random = rows[f"{name.upper()} pretrained"], rows[f"{name.upper()} random weights"]
        lifts.append(f"{name.upper()} {_percent(random['knn_top1'])} -> {_percent(trained['knn_top1'])}")
    best = max((rows[f"{m.upper()} pretrained"] for m in summary["methods"]), key=lambda r: r["few_label"]["mean"])
    gap = 100 * (best["few_label"]["mean"] - pixels["few_label"]["mean"])
    n = summary["few_label"]["per_class"]
    if round(gap, 1) > 0:
        few = f"with {n} labels per digit the best pretrained features beat raw pixels by {gap:.1f} points"
    elif round(gap, 1) == 0:
        few = (f"with {n} labels per digit the best pretrained features match raw pixels: on these clean 8x8 "
               "digits, minutes of pretraining give features a linear classifier separates as well as pixels, "
               "not better")
    else:
        few = (f"with {n} labels per digit raw pixels still win by {-gap:.1f} points: on these clean "
               "8x8 digits, minutes of pretraining do not yet give features a linear classifier "
               "separates better than pixels")
    return f"Pretraining without labels lifts k-NN from random weights ({', '.join(lifts)}); {few}."


def _side_by_side(summary: Dict[str, Any]) -> str:
    """What the total time covers when the pretrainings overlapped (their stage times add up to more)."""
    return " (MAE and DINO pretrained side by side, one process each)" if summary.get("side_by_side") else ""


def format_table(summary: Dict[str, Any]) -> str:
    """The printed table, the verdict, any notes and the total time."""
    rows = table_rows(summary)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    lines = [line(rows[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in rows[1:]]
    lines.append(verdict(summary))
    lines += [f"note: {note}" for note in summary["notes"]]
    lines.append(f"total time {summary['timings']['total_s']:.0f} s{_side_by_side(summary)}; details in summary.json")
    return "\n".join(lines)


def tsne_svg(points: np.ndarray, labels: Sequence[int], size: int = 480, title: str = "") -> str:
    """A scatter of 2-D ``points`` ``[N, 2]`` coloured by ``labels`` (0-9), with a legend, as SVG text."""
    points = np.asarray(points, dtype=float)
    pad, legend = 12, 60
    low, high = points.min(0), points.max(0)
    scaled = (points - low) / np.where(high > low, high - low, 1.0) * (size - 2 * pad) + pad
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{size + legend}" height="{size}" '
             f'viewBox="0 0 {size + legend} {size}" role="img" aria-label="{html.escape(title)}">',
             f'<rect width="{size}" height="{size}" fill="white" stroke="#ccc"/>']
    for (x, y), label in zip(scaled, labels):
        parts.append(f'<circle cx="{x:.1f}" cy="{size - y:.1f}" r="3.5" fill="{PALETTE[int(label) % 10]}" '
                     f'fill-opacity="0.8"><title>{int(label)}</title></circle>')
    for digit in range(10):
        y = pad + 20 * digit + 10
        parts.append(f'<circle cx="{size + 16}" cy="{y}" r="6" fill="{PALETTE[digit]}"/>')
        parts.append(f'<text x="{size + 28}" y="{y + 5}" font-family="sans-serif" font-size="14">{digit}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def _relative(path: Path, root: Path) -> str:
    return Path(path).resolve().relative_to(root.resolve()).as_posix()


def write_index_html(output: Path, summary: Dict[str, Any], tsne: str = "") -> Path:
    """``output/index.html``: the table, reconstructions, attention maps and the t-SNE scatter.

    Args:
        output: the demo's folder; every picture linked must lie under it.
        summary: the demo's summary (``results``, ``paths``, ``timings``...).
        tsne: inline SVG of the DINO features (``tsne_svg``), or "" to leave the section out.
    """
    output = Path(output)
    esc = html.escape
    rows = table_rows(summary)
    body = [f"<h1>ssl_vit demo: self-supervised ViTs on {esc(summary['data']['dataset'])}</h1>",
            f"<p>{summary['data']['train']} training images (labels unused in pretraining), "
            f"{summary['data']['test']} held-out images. k-NN: k = {summary['knn']['k']}, cosine, "
            f"T = {summary['knn']['temperature']}; probe: logistic regression on "
            f"{summary['few_label']['per_class']} labelled images per digit, frozen features standardised with the "
            f"training images' mean and std (no labels), "
            f"mean ± std over {summary['few_label']['draws']} random draws.</p>",
            "<table><thead><tr>" + "".join(f"<th>{esc(c)}</th>" for c in rows[0]) + "</tr></thead><tbody>"]
    body += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows[1:]]
    body.append("</tbody></table>")
    body.append(f"<p><b>{esc(verdict(summary))}</b></p>")
    body += [f"<p>note: {esc(n)}</p>" for n in summary["notes"]]
    body.append(f"<p>Total time {summary['timings']['total_s']:.0f} s{esc(_side_by_side(summary))}. "
                f"<a href=\"summary.json\">summary.json</a> holds every number.</p>")
    paths = summary["paths"]
    if "mae_reconstructions" in paths:
        body.append("<h2>MAE: reconstructions</h2><p>Each row: the image, the 25% of patches the encoder "
                    "saw, the decoder's guess for every patch, and the guess pasted into the visible ones.</p>")
        for grid in summary["paths"]["mae_reconstruction_pages"]:
            body.append(f'<img class="grid" src="{esc(_relative(Path(grid), output))}" alt="MAE reconstructions">')
    if "dino_attention" in paths:
        gallery = Path(paths["dino_attention"])
        body.append("<h2>DINO: attention of the CLS token (last block, mean over heads)</h2>"
                    f'<p>The full gallery, every head: <a href="{esc(_relative(gallery, output))}">'
                    f"{esc(_relative(gallery, output))}</a></p><div class=\"attn\">")
        for folder in sorted(p for p in gallery.parent.iterdir() if p.is_dir()):
            cells = [folder / "image.png", folder / "heat_mean.png", folder / "overlay_mean.png"]
            if all(c.is_file() for c in cells):
                body.append("<figure>" + "".join(
                    f'<img src="{esc(_relative(c, output))}" alt="{esc(c.stem)}">' for c in cells) + "</figure>")
        body.append("</div>")
    if tsne:
        body.append("<h2>DINO features of the held-out digits (t-SNE, coloured by the true digit)</h2>")
        body.append(tsne)
    style = ("body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 10px}"
             "td:not(:first-child){text-align:right}img{image-rendering:pixelated}"
             "img.grid{display:block;max-width:100%;width:520px;margin-bottom:8px}"
             ".attn figure{display:inline-block;margin:4px}.attn img{width:64px;height:64px;margin:1px}")
    page = ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>ssl_vit demo</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    index = output / "index.html"
    index.write_text(page, encoding="utf-8")
    return index


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: List[str] = []

    def handle_starttag(self, tag: str, attrs: List) -> None:
        self.links += [value for name, value in attrs if name in ("href", "src") and value]


def page_links(page: str) -> List[str]:
    """Every ``href`` and ``src`` of an HTML page, in order."""
    parser = _Links()
    parser.feed(page)
    return parser.links
