"""Export a ViT backbone in timm's own format: model.safetensors + config.json (see ssl_vit/checkpoints/timm_export.py).

    ssl-vit export --weights runs/dino/last.ckpt --output exported/dino_vits16
    ssl-vit export --weights dino_deitsmall16_pretrain.pth --arch vit_small_patch16 --output out/
    ssl-vit export --weights checkpoint.pth --role student --output out/
    ssl-vit export --weights runs/cifar/last.ckpt --crop-pct 1.0 --output out/   # 32x32 data, no crop

Then, with timm alone and no network:

    model = timm.create_model("local-dir:out", pretrained=True)
    data_config = timm.data.resolve_data_config({}, model=model)

--mean, --std, --interpolation and --crop-pct record the preprocessing the backbone was trained and
evaluated with (default: ssl_vit's, ImageNet statistics, bicubic, crop 0.875).
"""
import argparse
from typing import List, Optional

from ssl_vit.checkpoints.timm_export import export_backbone, export_summary


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="ssl-vit export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, help="any checkpoint ssl_vit.load_backbone reads")
    parser.add_argument("--arch", default=None, help="backbone name, for files that do not name their architecture")
    parser.add_argument("--role", default=None, help="backbone of a multi-backbone file: teacher (default for DINO) or student")
    parser.add_argument("--img-size", type=int, default=None, help="export at another resolution (resamples pos_embed)")
    parser.add_argument("--num-heads", type=int, default=None, help="heads, for non-standard widths without --arch")
    parser.add_argument("--mean", type=float, nargs=3, default=None, help="normalisation mean (RGB)")
    parser.add_argument("--std", type=float, nargs=3, default=None, help="normalisation std (RGB)")
    parser.add_argument("--interpolation", default=None, help="resize interpolation (bicubic, bilinear...)")
    parser.add_argument("--crop-pct", type=float, default=None, help="eval centre-crop fraction (1.0: no crop)")
    parser.add_argument("--output", required=True, help="output directory")
    args = parser.parse_args(argv)
    kwargs = {k: v for k, v in dict(img_size=args.img_size, num_heads=args.num_heads).items() if v is not None}
    data = dict(mean=args.mean, std=args.std, interpolation=args.interpolation, crop_pct=args.crop_pct)
    out = export_backbone(args.weights, args.output, arch=args.arch, role=args.role,
                          data_config={k: v for k, v in data.items() if v is not None}, **kwargs)
    print("\n".join(export_summary(out)))
    return 0
