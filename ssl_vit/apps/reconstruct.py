"""Write MAE reconstruction grids (original | masked | reconstruction | reconstruction + visible)
for any images, from any MAE checkpoint ssl_vit or facebookresearch/mae wrote.

    ssl-vit reconstruct --weights runs/mae/last.ckpt --images photos/ --output runs/vis
    ssl-vit reconstruct --weights mae_visualize_vit_large.pth --images a.jpg b.jpg --output vis
"""
import argparse
from typing import List, Optional

from ssl_vit.viz.reconstruction import visualize_mae


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="ssl-vit reconstruct", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, help="MAE checkpoint (.ckpt from ssl_vit, .pth from facebookresearch/mae)")
    parser.add_argument("--images", required=True, nargs="+", help="image files and/or folders")
    parser.add_argument("--output", required=True, help="folder for reconstructions_XXX.png")
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    parser.add_argument("--image-size", type=int, default=None, help="default: the model's image size")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random mask")
    args = parser.parse_args(argv)
    for path in visualize_mae(args.weights, args.images, args.output, args.mask_ratio, args.image_size, args.seed):
        print(path)
    return 0
