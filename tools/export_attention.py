#!/usr/bin/env python
"""`ssl-vit attention` as a script (ssl_vit.apps.attention), for checkouts: `python tools/export_attention.py --help`."""
import sys

from ssl_vit.apps.attention import main

if __name__ == "__main__":
    sys.exit(main())
