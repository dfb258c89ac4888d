"""Write an ImageFolder tree as webdataset shards plus NAME.json (see ssl_vit.data.shards).

    ssl-vit make-shards --input cifar10/train --output shards --split train --shard-size 5000
"""
import argparse
import logging
import sys
from typing import List, Optional

from ssl_vit.data.shards import write_shards


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="ssl-vit make-shards", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="ImageFolder root: DIR/<class>/<image>")
    parser.add_argument("--output", required=True, help="directory for NAME-000000.tar ... and NAME.json")
    parser.add_argument("--split", required=True, help="shard name prefix, e.g. train")
    parser.add_argument("--shard-size", type=int, required=True, help="samples per shard")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    parser.add_argument("--workers", type=int, default=0, help="processes reading and checking images (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing split of the same name")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        info = write_shards(
            args.input, args.output, args.split, args.shard_size, seed=args.seed,
            overwrite=args.overwrite, num_workers=args.workers, progress=not args.no_progress,
        )
    except (OSError, ValueError) as exc:
        print(f"ssl-vit make-shards: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"{info['num_samples']} samples in {len(info['shards'])} shards, {len(info['classes'])} classes, "
        f"{len(info['skipped'])} files skipped -> {args.output}/{args.split}.json"
    )
    return 0
