#!/usr/bin/env python
"""Write a folder of images as webdataset shards plus NAME.json: ``ssl_vit.data.shard_tools.make_shards_main``.

    python tools/make_shards.py --input cifar10/train --output shards --split train --shard-size 5000
"""
import sys

from ssl_vit.data.shard_tools import make_shards_main as main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
