#!/usr/bin/env python
"""`ssl-vit reconstruct` as a script (ssl_vit.apps.reconstruct), for checkouts: `python tools/visualize_mae.py --help`."""
import sys

from ssl_vit.apps.reconstruct import main

if __name__ == "__main__":
    sys.exit(main())
