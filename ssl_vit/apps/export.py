"""Export a ViT backbone as a timm-loadable model.safetensors + config.json (see ssl_vit/checkpoints/timm_export.py).

    ssl-vit export --weights runs/dino/last.ckpt --output exported/dino_vits16
    ssl-vit export --weights dino_deitsmall16_pretrain.pth --arch vit_small_patch16 --output out/
    ssl-vit export --weights checkpoint.pth --role student --output out/

Then, with timm only and no network:

    cfg = json.load(open("out/config.json"))
    timm.create_model(cfg["architecture"], pretrained=True, num_classes=0,
                      pretrained_cfg_overlay=dict(file="out/model.safetensors"), **cfg["kwargs"])
"""
import argparse
import json
from typing import List, Optional

from ssl_vit.checkpoints.timm_export import export_backbone


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="ssl-vit export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, help="any checkpoint ssl_vit.load_backbone reads")
    parser.add_argument("--arch", default=None, help="backbone name, for files that do not name their architecture")
    parser.add_argument("--role", default=None, help="backbone of a multi-backbone file: teacher (default for DINO) or student")
    parser.add_argument("--img-size", type=int, default=None, help="export at another resolution (resamples pos_embed)")
    parser.add_argument("--num-heads", type=int, default=None, help="heads, for non-standard widths without --arch")
    parser.add_argument("--output", required=True, help="output directory")
    args = parser.parse_args(argv)
    kwargs = {k: v for k, v in dict(img_size=args.img_size, num_heads=args.num_heads).items() if v is not None}
    out = export_backbone(args.weights, args.output, arch=args.arch, role=args.role, **kwargs)
    print(json.dumps(json.loads((out / "config.json").read_text()), indent=2))
    return 0
