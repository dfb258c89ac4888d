"""Input-pipeline benchmark (``ssl-vit benchmark --data-only``): images per second per CPU core, from
JPEG bytes to the tensors a training step takes, for the reference pipelines and ours side by side.

Every pipeline starts from the bytes of :func:`ssl_vit.apps.benchmark_images.benchmark_jpegs` (decode
included) and runs in ``torch.utils.data.DataLoader`` workers (one thread each, batches of 8,
collated as in training) at each worker count. The rate per core is measured by the workers' CPU time
(``time.process_time`` around each batch's transforms and collation), which other processes on a
shared machine do not inflate; the wall-clock rate per worker is reported beside it. All pipelines and worker counts are measured in
one run, interleaved round by round (each round in a rotated order), so that on a shared, noisy
machine the ratios to the reference, taken within each round, hold; the summary gives medians over
the rounds.

The reference pipelines are built here from torchvision v1 transforms as the references compose
them: DINO's ``DataAugmentationDINO`` (facebookresearch/dino ``main_dino.py``: global crops 224 at
scale (0.4, 1), local crops 96 at (0.05, 0.4), flip, colour jitter p 0.8, grayscale p 0.2, PIL
Gaussian blur p 1.0 / 0.1 / 0.5, solarisation p 0.2 on the second global crop, ``ToTensor`` and
``Normalize``), with 10 local crops, and MAE's ``main_pretrain.py`` (``RandomResizedCrop(224,
scale=(0.2, 1.0), interpolation=3)``, flip, ``ToTensor``, ``Normalize``), both after
``Image.open(...).convert("RGB")`` as torchvision's ``ImageFolder`` loads.
"""
import argparse
import datetime
import io
import json
import os
import platform
import random
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import PIL
import torch
import torchvision
from PIL import Image, ImageFilter, ImageOps
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision import transforms as T

from ssl_vit.apps.benchmark_images import benchmark_jpegs, describe
from ssl_vit.data.decode import decode_hooks, decode_image
from ssl_vit.data.gpu_augment import MultiCropCrops
from ssl_vit.data.multicrop import MultiCropTransform
from ssl_vit.data.transforms import PretrainTransform

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
LOCAL_CROPS = 10  # DINO ViT-S/16's 2 x 224 + 10 x 96
BATCH = 8


# -- the reference pipelines (torchvision v1, as the references compose them) --------------------------
class _ReferenceBlur:
    """DINO's ``utils.GaussianBlur``: PIL's blur with radius ~ U(0.1, 2.0), with probability ``p``."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, image: Image.Image) -> Image.Image:
        if random.random() <= self.p:
            return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))
        return image


class _ReferenceSolarize:
    """DINO's ``utils.Solarization``: ``ImageOps.solarize`` with probability ``p``."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, image: Image.Image) -> Image.Image:
        return ImageOps.solarize(image) if random.random() < self.p else image


def reference_dino(local_crops: int = LOCAL_CROPS) -> Callable[[Image.Image], List[torch.Tensor]]:
    """DINO's ``DataAugmentationDINO`` rebuilt from torchvision v1 transforms."""
    bicubic = T.InterpolationMode.BICUBIC
    flip_and_jitter = T.Compose([
        T.RandomHorizontalFlip(p=0.5),
        T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
    ])
    normalize = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])
    global1 = T.Compose([T.RandomResizedCrop(224, scale=(0.4, 1.0), interpolation=bicubic), flip_and_jitter,
                         _ReferenceBlur(1.0), normalize])
    global2 = T.Compose([T.RandomResizedCrop(224, scale=(0.4, 1.0), interpolation=bicubic), flip_and_jitter,
                         _ReferenceBlur(0.1), _ReferenceSolarize(0.2), normalize])
    local = T.Compose([T.RandomResizedCrop(96, scale=(0.05, 0.4), interpolation=bicubic), flip_and_jitter,
                       _ReferenceBlur(0.5), normalize])
    return lambda image: [global1(image), global2(image)] + [local(image) for _ in range(local_crops)]


def reference_mae() -> Callable[[Image.Image], torch.Tensor]:
    """MAE ``main_pretrain.py``'s ``transform_train``."""
    return T.Compose([T.RandomResizedCrop(224, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])


def _reference_load(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")  # torchvision's pil_loader


def _ours(transform: Any) -> Callable[[bytes], Any]:
    """Our decode as the data modules run it (``decode_image`` with the transform's draft hook and JPEG
    decoder), then the transform."""
    hooks = decode_hooks(transform)
    return lambda data: transform(decode_image(data, **hooks))


FAST = dict(torch_resize=True, draft=True)
TVDECODE = dict(FAST, jpeg_decoder="torchvision")
# name -> (what it is, factory of a bytes -> output function); the factory runs in each worker
PIPELINES: Dict[str, tuple] = {
    "decode": ("decode only (PIL, ssl_vit.data.decode)", lambda: lambda data: decode_image(data).size),
    "decode-tvdecode": ("decode only, jpeg_decoder='torchvision'", lambda: lambda data: tuple(
        decode_image(data, jpeg_decoder="torchvision").shape)),
    "dino-reference": ("DINO DataAugmentationDINO, torchvision v1", lambda: (
        lambda f: lambda data: f(_reference_load(data)))(reference_dino())),
    "dino-cpu-v2blur": ("MultiCropTransform, separable_blur=False (the old blur)", lambda: _ours(
        MultiCropTransform(num_local=LOCAL_CROPS, separable_blur=False))),
    "dino-cpu": ("MultiCropTransform, defaults", lambda: _ours(MultiCropTransform(num_local=LOCAL_CROPS))),
    "dino-cpu-fast": ("MultiCropTransform, torch_resize + draft", lambda: _ours(
        MultiCropTransform(num_local=LOCAL_CROPS, **FAST))),
    "dino-cpu-tvdecode": ("MultiCropTransform, torch_resize + draft + jpeg_decoder='torchvision'", lambda: _ours(
        MultiCropTransform(num_local=LOCAL_CROPS, **TVDECODE))),
    "dino-cpu-fused": ("MultiCropTransform, torch_resize + draft + jpeg_decoder='torchvision' + fused_views",
                       lambda: _ours(MultiCropTransform(num_local=LOCAL_CROPS, fused_views=True, **TVDECODE))),
    "dino-cpu-uint8": ("MultiCropTransform, torch_resize + draft + jpeg_decoder='torchvision' + fused_views + "
                       "uint8_views (normalised on the device)", lambda: _ours(MultiCropTransform(
                           num_local=LOCAL_CROPS, fused_views=True, uint8_views=True, **TVDECODE))),
    "dino-crops": ("MultiCropCrops (crops only), defaults", lambda: _ours(MultiCropCrops(num_local=LOCAL_CROPS))),
    "dino-crops-fast": ("MultiCropCrops, torch_resize + draft", lambda: _ours(
        MultiCropCrops(num_local=LOCAL_CROPS, **FAST))),
    "dino-crops-tvdecode": ("MultiCropCrops, torch_resize + draft + jpeg_decoder='torchvision'", lambda: _ours(
        MultiCropCrops(num_local=LOCAL_CROPS, **TVDECODE))),
    "mae-reference": ("MAE main_pretrain.py transform, torchvision v1", lambda: (
        lambda f: lambda data: f(_reference_load(data)))(reference_mae())),
    "mae": ("PretrainTransform, defaults", lambda: _ours(PretrainTransform())),
    "mae-fast": ("PretrainTransform, torch_resize + draft", lambda: _ours(PretrainTransform(**FAST))),
    "mae-tvdecode": ("PretrainTransform, torch_resize + draft + jpeg_decoder='torchvision'", lambda: _ours(
        PretrainTransform(**TVDECODE))),
}


def reference_of(name: str) -> Optional[str]:
    """The reference a pipeline is compared with (``dino-*``: DINO's, ``mae-*``: MAE's), or None."""
    family = name.split("-")[0]
    ref = f"{family}-reference"
    return ref if ref in PIPELINES and name != ref else None


# -- timing -----------------------------------------------------------------------------------------------
class _Batches(Dataset):
    """Batch ``i`` = images ``i * BATCH ...`` of the JPEG list through the pipeline, collated, with the
    CPU seconds the worker spent on it (``time.process_time``: the time it ran, whatever else
    shares the cores). Each worker builds its pipeline on first use."""

    def __init__(self, jpegs: Sequence[bytes], pipeline: str) -> None:
        self.jpegs, self.pipeline = jpegs, pipeline
        self.fn: Optional[Callable[[bytes], Any]] = None

    def __len__(self) -> int:
        return 10**8

    def __getitem__(self, index: int) -> Tuple[Any, float]:
        if self.fn is None:
            self.fn = PIPELINES[self.pipeline][1]()
        cpu = time.process_time()
        items = [self.fn(self.jpegs[(index * BATCH + k) % len(self.jpegs)]) for k in range(BATCH)]
        batch = default_collate(items)
        return batch, time.process_time() - cpu


def measure(jpegs: Sequence[bytes], pipeline: str, workers: int, seconds: float, offset: int = 0) -> Dict[str, Any]:
    """Images per second of ``pipeline`` with ``workers`` DataLoader workers (prefetch 1), by the wall
    clock and by the CPU time the workers spent (``img_per_cpu_s``: images per second of one core's
    time, robust to other processes sharing the cores).

    Warm-up is two batches per worker: process start, pipeline construction, and the batch each
    worker had prefetched (which would arrive at once and inflate a short window). Then batches are
    counted until ``seconds`` have passed and at least two batches per worker have arrived."""
    sampler = range(offset, offset + 10**7)  # each measurement starts elsewhere in the set
    loader = DataLoader(_Batches(jpegs, pipeline), batch_size=None, sampler=sampler, num_workers=workers,
                        prefetch_factor=1)
    it = iter(loader)
    for _ in range(2 * workers):
        next(it)
    start, batches, cpu = time.perf_counter(), 0, 0.0
    while time.perf_counter() - start < seconds or batches < 2 * workers:
        cpu += next(it)[1]
        batches += 1
    elapsed = time.perf_counter() - start
    del it
    rate, images = batches * BATCH / elapsed, batches * BATCH
    return {"pipeline": pipeline, "workers": workers, "images": images, "seconds": round(elapsed, 3),
            "img_per_s": round(rate, 2), "img_per_s_per_core": round(rate / workers, 2),
            "cpu_s": round(cpu, 3), "img_per_cpu_s": round(images / cpu, 2)}


def machine() -> Dict[str, Any]:
    """The machine and software, for the report."""
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": model, "date": datetime.date.today().isoformat(),
            "torch": torch.__version__, "torchvision": torchvision.__version__, "pillow": PIL.__version__}


def run(jpegs: Sequence[bytes], pipelines: Sequence[str], workers: Sequence[int], rounds: int, seconds: float,
        log: Callable[[str], None] = print) -> List[Dict[str, Any]]:
    """Every (pipeline, workers) pair once per round, rounds interleaved (order rotated per round)."""
    rows, pairs = [], [(p, w) for p in pipelines for w in workers]
    for r in range(rounds):
        shift = (r * len(pairs)) // max(rounds, 1)
        for i, (pipeline, w) in enumerate(pairs[shift:] + pairs[:shift]):
            row = {"round": r, "load": round(os.getloadavg()[0], 2),
                   **measure(jpegs, pipeline, w, seconds, offset=(r * 7919 + i * 131) % len(jpegs))}
            rows.append(row)
            log(json.dumps(row))
    return rows


def summarise(rows: Sequence[Dict[str, Any]], metric: str = "img_per_cpu_s") -> List[Dict[str, Any]]:
    """Per (pipeline, workers): the median over rounds of ``metric`` and of the wall-clock rate per core,
    and the median over rounds of the ratio to the reference measured in the same round."""
    out = []
    for pipeline in dict.fromkeys(r["pipeline"] for r in rows):
        for w in sorted({r["workers"] for r in rows if r["pipeline"] == pipeline}):
            mine = {r["round"]: r for r in rows if r["pipeline"] == pipeline and r["workers"] == w}
            ref = reference_of(pipeline)
            theirs = {r["round"]: r for r in rows if r["pipeline"] == ref and r["workers"] == w}
            ratios = [mine[k][metric] / theirs[k][metric] for k in mine if k in theirs]
            out.append({"pipeline": pipeline, "workers": w,
                        metric: round(statistics.median(r[metric] for r in mine.values()), 1),
                        "img_per_s_per_core": round(statistics.median(r["img_per_s_per_core"] for r in mine.values()), 1),
                        "x_reference": round(statistics.median(ratios), 2) if ratios else None})
    return out


def markdown(summary: Sequence[Dict[str, Any]], workers: Sequence[int]) -> str:
    """The summary as a markdown table: one row per pipeline; per worker count, images per CPU-second
    (x the reference) and, after the slash, wall-clock images per second per worker."""
    head = "| pipeline | what | " + " | ".join(f"{w} worker{'s' if w > 1 else ''}" for w in workers) + " |"
    lines = [head, "|" + "---|" * (2 + len(workers))]
    cells = {(s["pipeline"], s["workers"]): s for s in summary}
    for pipeline in dict.fromkeys(s["pipeline"] for s in summary):
        row = []
        for w in workers:
            s = cells.get((pipeline, w))
            ratio = f" ({s['x_reference']:.2f}x)" if s and s["x_reference"] is not None else ""
            row.append(f"{s['img_per_cpu_s']:.1f}{ratio} / {s['img_per_s_per_core']:.1f}" if s else "")
        lines.append(f"| `{pipeline}` | {PIPELINES[pipeline][0]} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(prog="ssl-vit benchmark --data-only", description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000, help="benchmark JPEGs generated (default 2000)")
    p.add_argument("--size", type=int, nargs=2, default=[500, 375], metavar=("W", "H"), help="image size (500 375)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    p.add_argument("--workers", default="1,2,N", help="comma-separated worker counts; N = os.cpu_count() (1,2,N)")
    p.add_argument("--pipelines", default=",".join(PIPELINES), help=f"comma-separated, of: {', '.join(PIPELINES)}")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--seconds", type=float, default=2.0, help="timed seconds per measurement (default 2)")
    p.add_argument("--out", default=None, help="write every measurement and the summary here (JSONL)")
    args = p.parse_args(argv)
    try:
        workers = sorted({os.cpu_count() or 1 if w.strip() == "N" else int(w) for w in args.workers.split(",")})
    except ValueError:
        p.error(f"--workers takes comma-separated integers or N, got {args.workers!r}")
    pipelines = [name.strip() for name in args.pipelines.split(",") if name.strip()]
    unknown = [name for name in pipelines if name not in PIPELINES]
    if unknown:
        p.error(f"--pipelines: unknown {', '.join(unknown)} (known: {', '.join(PIPELINES)})")
    if min(workers) < 1 or args.rounds < 1 or args.seconds <= 0:
        p.error("--workers must be >= 1, --rounds >= 1 and --seconds > 0")
    try:
        jpegs = benchmark_jpegs(args.images, args.size, args.quality)
    except (ValueError, RuntimeError) as err:
        p.error(str(err))
    header = {"machine": machine(), "images": describe(jpegs), "load_start": os.getloadavg()[0]}
    print(json.dumps(header), flush=True)
    rows = run(jpegs, pipelines, workers, args.rounds, args.seconds, log=lambda line: print(line, flush=True))
    summary = summarise(rows)
    result = {**header, "load_end": os.getloadavg()[0], "summary": summary}
    print(markdown(summary, workers), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
            f.write(json.dumps(result) + "\n")
    return result
