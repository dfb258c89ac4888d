"""The shard commands: ``make-shards`` (a folder of images -> shards + JSON) and ``index-shards``
(the JSON for shards written elsewhere). Each ``main(argv) -> int`` returns 0 on success and 2 with
one ``error:`` line on bad input; ``tools/make_shards.py`` and ``tools/index_shards.py`` call them."""
import argparse
import json
import logging
import sys
from typing import List, Optional

from ssl_vit.data.decode import ShardReadError
from ssl_vit.data.shard_index import index_shards
from ssl_vit.data.shards import write_shards

MAKE_SHARDS_HELP = """Write a folder of images as webdataset shards plus NAME.json (see ssl_vit.data.shards).

Labels: with class folders (DIR/<class>/<image>, the ImageFolder layout) each sample gets its
folder's class index. A folder that holds images and no sub-folder at its top level is written
unlabelled (no .cls member, label -1, an empty classes list); --unlabelled does the same for any
tree, nested or not. A top level mixing images and folders is refused unless --unlabelled is given.

    python tools/make_shards.py --input cifar10/train --output shards --split train --shard-size 5000
    python tools/make_shards.py --input photos --output shards --split train --shard-size 1000 --unlabelled
"""

INDEX_SHARDS_HELP = """Write the info JSON (samples per shard, classes if any) for webdataset shards that
ssl_vit did not write, so that ShardDataModule streams them as they are (see ssl_vit.data.shard_index).

A sample is a key with a .jpg/.jpeg/.png/.webp image and, optionally, a .cls class index; other
members are ignored. Every shard is read once to count.

    python tools/index_shards.py --shards 'data/train-{000000..000099}.tar'       # -> data/train.json
    python tools/index_shards.py --shards 'data/{00000..00099}.tar' --output data/train.json
"""


def _logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")


def make_shards_main(argv: Optional[List[str]] = None) -> int:
    """``make-shards``: see :data:`MAKE_SHARDS_HELP`."""
    parser = argparse.ArgumentParser(
        prog="ssl-vit make-shards", description=MAKE_SHARDS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", required=True, help="DIR/<class>/<image>, or a folder of unlabelled images")
    parser.add_argument("--output", required=True, help="directory for NAME-000000.tar ... and NAME.json")
    parser.add_argument("--split", required=True, help="shard name prefix, e.g. train")
    parser.add_argument("--shard-size", type=int, required=True, help="samples per shard")
    parser.add_argument("--unlabelled", action="store_true", help="no labels: every image under --input, recursively")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    parser.add_argument("--workers", type=int, default=0, help="processes reading and checking images (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing split of the same name")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    _logging()
    try:
        info = write_shards(
            args.input, args.output, args.split, args.shard_size, seed=args.seed, overwrite=args.overwrite,
            num_workers=args.workers, progress=not args.no_progress, labels="none" if args.unlabelled else "auto",
        )
    except (OSError, ValueError) as exc:
        print(f"make-shards: error: {exc}", file=sys.stderr)
        return 2
    classes = f"{len(info['classes'])} classes" if info["classes"] else "unlabelled"
    print(
        f"{info['num_samples']} samples in {len(info['shards'])} shards, {classes}, "
        f"{len(info['skipped'])} files skipped -> {args.output}/{args.split}.json"
    )
    return 0


def index_shards_main(argv: Optional[List[str]] = None) -> int:
    """``index-shards``: see :data:`INDEX_SHARDS_HELP`."""
    parser = argparse.ArgumentParser(
        prog="ssl-vit index-shards", description=INDEX_SHARDS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shards", required=True, help="path, brace pattern or URL of the shards")
    parser.add_argument("--output", help="the JSON to write (default DIR/NAME.json beside DIR/NAME-INDEX.tar)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    _logging()
    try:
        path = index_shards(args.shards, args.output, overwrite=args.overwrite, progress=not args.no_progress)
    except (OSError, ValueError, ShardReadError) as exc:
        print(f"index-shards: error: {exc}", file=sys.stderr)
        return 2
    with open(path) as f:
        info = json.load(f)
    classes = f"{len(info['classes'])} classes" if info["classes"] else "no classes"
    print(f"{info['num_samples']} samples in {len(info['shards'])} shards, {classes} -> {path}")
    return 0
