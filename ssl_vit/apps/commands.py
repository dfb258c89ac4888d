"""The `ssl-vit` command (also `python -m ssl_vit`): the apps' subcommands, then LightningCLI's.

    ssl-vit demo --output runs/demo                  # ssl_vit.apps.demo
    ssl-vit fit --config recipes/...yaml             # ssl_vit.cli (fit, validate, test, predict)
"""
import sys
from typing import List, Optional

from ssl_vit.apps import demo
from ssl_vit.cli import main as lightning_main

COMMANDS = {"demo": demo.main}
SUMMARIES = {"demo": "the end-to-end example on scikit-learn's digits (ssl-vit demo --help)"}


def main(args: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if args is None else args)
    if not argv or argv[0] in ("-h", "--help"):
        print("ssl-vit commands:\n" + "".join(f"  {name:<9} {SUMMARIES[name]}\n" for name in COMMANDS)
              + "  fit, validate, test, predict: LightningCLI's, below\n")
    if argv and argv[0] in COMMANDS:
        COMMANDS[argv[0]](argv[1:])
        return
    lightning_main(None if args is None else argv)


if __name__ == "__main__":
    main()
