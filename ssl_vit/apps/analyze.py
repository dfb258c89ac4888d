"""`ssl-vit analyze`: measurements of a trained backbone on images.

    ssl-vit analyze attention-distance --weights dino.ckpt --images photos/ --output analysis/
    ssl-vit analyze attention-distance --weights vit.pth --arch vit_small_patch16 \\
        --images "shards/val-{000000..000003}.tar" --max-images 256 --image-size 224

``attention-distance``: the mean attention distance in pixels of every head of every block (the
ViT paper's Figure 7), its attention entropy and the share of attention patch queries give the CLS
and register tokens (``ssl_vit.viz.attention_distance`` says how each is defined). Writes
``attention_distance.json``, ``attention_distance.png`` and ``attention_entropy.png`` (layers on x,
one dot per head) to ``--output``.
"""
import argparse
import json
import time
from pathlib import Path
from typing import List, Optional

import torch

from ssl_vit.apps.attention import add_model_and_image_args
from ssl_vit.checkpoints.load import read_backbone
from ssl_vit.models.backbone import patch_size
from ssl_vit.viz.attention_distance import load_images, measure_attention_distance, plot_attention_distance
from ssl_vit.viz.images import MAX_TOKENS


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ssl-vit analyze", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    analyses = parser.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")
    distance = analyses.add_parser("attention-distance", help="mean attention distance and entropy per head and layer",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_and_image_args(distance)
    distance.add_argument("--max-images", type=int, default=256, help="use the first N images (default 256)")
    distance.add_argument("--batch-size", type=int, default=32)
    distance.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def attention_distance(args: argparse.Namespace) -> int:
    if args.max_images < 1 or args.batch_size < 1:
        raise ValueError(f"--max-images and --batch-size must be >= 1, got {args.max_images}, {args.batch_size}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available on this machine")
    start = time.perf_counter()
    try:
        loaded = read_backbone(args.weights, arch=args.arch)
    except KeyError as err:  # keys or shapes that do not match: a user error, named in the message
        raise ValueError(err.args[0] if err.args else str(err)) from err
    model = loaded.model.to(device).eval()
    patch = patch_size(model)
    image_size = args.image_size or int(model.patch_embed.img_size[0])
    images, skipped = load_images(args.images, image_size, patch, limit=args.max_images, max_tokens=MAX_TOKENS)
    for item in skipped:
        print(f"skipped {item['path']}: {item['reason']}")
    if not images:
        raise ValueError(f"--images: no readable images in {args.images}")
    read_s = time.perf_counter() - start
    result = measure_attention_distance(model, [tensor for _, tensor in images], batch_size=args.batch_size)
    measure_s = time.perf_counter() - start - read_s
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    report = {"weights": str(args.weights), "arch": loaded.arch, "backbone_kwargs": loaded.kwargs,
              "image_size": image_size, "device": str(device), "load_s": read_s, "measure_s": measure_s,
              "skipped": skipped, **result.to_json()}
    (output / "attention_distance.json").write_text(json.dumps(report, indent=1))
    plots = plot_attention_distance(result, output, title=f"{loaded.arch}, patch {patch}, at {image_size} px")
    per_layer = result.distance.mean(dim=1)
    print(f"{result.images} images, {len(per_layer)} layers: mean distance per layer (px) "
          + " ".join(f"{d:.1f}" for d in per_layer.tolist()))
    print(f"wrote {output / 'attention_distance.json'}, {', '.join(p.name for p in plots)} "
          f"(read {read_s:.1f} s, measured {measure_s:.1f} s)")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.analysis == "attention-distance":
        return attention_distance(args)
    raise ValueError(f"unknown analysis {args.analysis!r}")
