#!/usr/bin/env python
"""Re-measure the CPU figures the docs quote (ssl_vit.apps.figures): `make figures`."""
import sys

from ssl_vit.apps.figures import main

if __name__ == "__main__":
    sys.exit(main())
