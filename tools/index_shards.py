#!/usr/bin/env python
"""Write the info JSON for webdataset shards ssl_vit did not write: ``ssl_vit.data.shard_tools.index_shards_main``.

    python tools/index_shards.py --shards 'data/train-{000000..000099}.tar'
"""
import sys

from ssl_vit.data.shard_tools import index_shards_main as main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
