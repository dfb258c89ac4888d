"""The `ssl-vit` command (also `python -m ssl_vit`): the apps' subcommands, then LightningCLI's.

    ssl-vit demo --output runs/demo                  # ssl_vit.apps.demo
    ssl-vit fit --config recipes/...yaml             # ssl_vit.cli (fit, validate, test, predict)

Errors a user can fix (a missing file, a bad value: ``OSError``, ``ValueError``) are printed as one
message, not a traceback; ``SSL_VIT_TRACEBACK=1`` shows the traceback too.
"""
import os
import sys
from typing import List, Optional

from ssl_vit.apps import demo
from ssl_vit.cli import main as lightning_main

COMMANDS = {"demo": demo.main}
SUMMARIES = {"demo": "the end-to-end example on scikit-learn's digits (ssl-vit demo --help)"}


USER_ERRORS = (OSError, ValueError)


def error_message(exc: BaseException) -> str:
    """The exception's message and those of its causes, outermost first, each once."""
    parts: List[str] = []
    while exc is not None:
        text = f"{type(exc).__name__}: {exc}"
        if not any(text in p or str(exc) in p for p in parts):
            parts.append(text)
        exc = exc.__cause__
    return "\n  caused by ".join(parts)


def main(args: Optional[List[str]] = None) -> None:
    try:
        run(args)
    except USER_ERRORS as exc:
        if os.environ.get("SSL_VIT_TRACEBACK"):
            raise
        print(f"ssl-vit: error: {error_message(exc)}\n(SSL_VIT_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        sys.exit(1)


def run(args: Optional[List[str]] = None) -> None:
    """The command without the error formatting (what ``main`` runs)."""
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
