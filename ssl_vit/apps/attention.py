"""Export self-attention maps of a ViT backbone as a browsable gallery (see ssl_vit/viz/gallery.py).

    ssl-vit attention --weights dino_teacher.ckpt --images photos/ --output attn/
    ssl-vit attention --weights vit.pth --arch vit_small_patch16 \
        --images "shards/val-{000000..000003}.tar" --output attn/ --masks voc_masks/ --threshold 0.6

Writes <output>/<image>/{image.png, attention.npy, heat_*.png, mask_*.png, overlay_*.png},
<output>/index.html, <output>/skipped.json and, with --masks, <output>/jaccard.json.
"""
import argparse
from typing import List, Optional

import torch

from ssl_vit.checkpoints.load import read_backbone
from ssl_vit.models.backbone import create_backbone
from ssl_vit.viz.gallery import export_attention
from ssl_vit.viz.images import MAX_TOKENS


def add_model_and_image_args(parser: argparse.ArgumentParser) -> None:
    """The arguments every command that runs a backbone over images takes (``attention``, ``analyze``):
    ``--weights``, ``--arch``, ``--images``, ``--output``, ``--image-size``."""
    parser.add_argument("--weights", required=True, help="any checkpoint ssl_vit.load_backbone reads")
    parser.add_argument("--arch", default=None, help="backbone name, for files without ssl_vit metadata")
    parser.add_argument("--images", nargs="+", required=True, help="image files, folders, shard patterns (*.tar)")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--image-size", type=int, default=None,
                        help="shorter side after resizing (default: the model's own resolution)")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ssl-vit attention", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_and_image_args(parser)
    parser.add_argument("--baseline", choices=["random"], default=None,
                        help="random: add the same architecture with random weights beside each row, on the same scale")
    parser.add_argument("--threshold", type=float, default=0.6, help="fraction of attention mass the masks keep")
    parser.add_argument("--layer", type=int, default=-1, help="block whose attention is shown (default: last)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rollout", action="store_true", help="add an attention-rollout column")
    parser.add_argument("--masks", default=None, help="folder of binary foreground PNGs <stem>.png: Jaccard index")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--max-tokens", type=int, default=MAX_TOKENS,
                        help="skip images whose crop holds more patches than this (attention memory grows as its square)")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: CUDA is not available on this machine")
        loaded = read_backbone(args.weights, arch=args.arch)
        model = loaded.model.to(device)
        baseline = None
        if args.baseline == "random":
            torch.manual_seed(0)
            baseline = create_backbone(loaded.arch, **loaded.kwargs).eval().to(device)
        result = export_attention(
            model, args.images, args.output, image_size=args.image_size, threshold=args.threshold,
            layer=args.layer, batch_size=args.batch_size, rollout=args.rollout, masks=args.masks,
            progress=not args.no_progress, baseline=baseline, max_tokens=args.max_tokens,
        )
    except (ValueError, FileNotFoundError, KeyError, TypeError, RuntimeError) as err:
        raise SystemExit(f"ssl-vit attention: error: {err}") from err
    print(f"exported {len(result.exported)} images to {result.output / 'index.html'}")
    if result.skipped:
        print(f"skipped {len(result.skipped)} inputs (listed in {result.output / 'skipped.json'}):")
        for item in result.skipped:
            print(f"  {item['path']}: {item['reason']}")
    if result.jaccard is not None:
        mean = result.jaccard["mean"]
        print(f"Jaccard index over {result.jaccard['images']} images (threshold {args.threshold}):")
        print("  " + "  ".join(f"{col} {value:.3f}" for col, value in mean.items()))
        if result.jaccard["missing_masks"]:
            print(f"  no mask for {len(result.jaccard['missing_masks'])} images (listed in jaccard.json)")
    return 0
