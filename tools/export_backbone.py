#!/usr/bin/env python
"""`ssl-vit export` as a script (ssl_vit.apps.export), for checkouts: `python tools/export_backbone.py --help`."""
import sys

from ssl_vit.apps.export import main

if __name__ == "__main__":
    sys.exit(main())
