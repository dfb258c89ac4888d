#!/usr/bin/env python
"""`ssl-vit make-shards` as a script (ssl_vit.apps.make_shards), for checkouts: `python tools/make_shards.py --help`."""
import sys

from ssl_vit.apps.make_shards import main

if __name__ == "__main__":
    sys.exit(main())
