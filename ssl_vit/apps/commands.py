"""The `ssl-vit` command (also `python -m ssl_vit`): LightningCLI's stages and the apps.

    ssl-vit --help                                   # every command, one line each
    ssl-vit fit --config mae/vit_base_patch16_in1k   # ssl_vit.cli (fit, validate, predict)
    ssl-vit demo --output runs/demo                  # ssl_vit.apps.demo
    ssl-vit make-shards --help                       # each command has its own --help

Each command is named by ``module:function`` and imported only when it runs, so ``ssl-vit --help``
and the light commands do not pay for importing Lightning, scikit-learn and the rest. The function
takes the arguments after the command's name and returns an exit status (``None`` and non-integers
mean 0).

Errors a user can fix (a missing file, a bad value: ``OSError``, ``ValueError``) are printed as one
message, not a traceback; ``SSL_VIT_TRACEBACK=1`` shows the traceback too.
"""
import importlib
import os
import sys
from typing import Callable, Dict, List, NamedTuple, Optional


class Command(NamedTuple):
    target: str  # "module:function"
    summary: str


LIGHTNING = "ssl_vit.cli:main"
COMMANDS: Dict[str, Command] = {
    "fit": Command(LIGHTNING, "train with a recipe: ssl-vit fit --config mae/vit_base_patch16_in1k"),
    "validate": Command(LIGHTNING, "evaluate with a recipe (k-NN, probes): ssl-vit validate --config probe/..."),
    "predict": Command(LIGHTNING, "write features to disk: ssl-vit predict --config predict/features ..."),
    "demo": Command("ssl_vit.apps.demo:main", "the end-to-end example on scikit-learn's digits, on CPU"),
    "make-shards": Command("ssl_vit.data.shard_tools:make_shards_main", "write a folder of images as webdataset shards + JSON"),
    "index-shards": Command("ssl_vit.data.shard_tools:index_shards_main",
                            "write the JSON for existing webdataset shards so they stream as they are"),
    "export": Command("ssl_vit.apps.export:main", "export a backbone for timm (model.safetensors + config.json)"),
    "attention": Command("ssl_vit.apps.attention:main", "attention maps of any ViT as .npy, PNGs and an HTML gallery"),
    "reconstruct": Command("ssl_vit.apps.reconstruct:main", "MAE reconstruction grids for any images"),
    "benchmark": Command("ssl_vit.apps.benchmark:main", "training throughput of MAE or DINO (one JSON line)"),
    "quality": Command("ssl_vit.apps.quality:command", "the CIFAR-10 representation-quality benchmark (one GPU)"),
    "analyze": Command("ssl_vit.apps.analyze:main", "measure a backbone on images: analyze attention-distance (ViT Fig. 7)"),
    "study": Command("ssl_vit.apps.study:main", "train a grid of backbone options (one recipe run each) into one table"),
    "describe": Command("ssl_vit.apps.describe:main", "parameters, tokens, counted GFLOPs and attention share per resolution"),
}
REFUSED = {
    "test": "`ssl-vit test` is not offered: no stage has a test split. Held-out accuracy is `ssl-vit validate` "
            "(k-NN: --config probe/knn_...) or the val/ metrics of `ssl-vit fit` (probes, finetuning)",
}
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


def usage() -> str:
    """What ``ssl-vit --help`` prints: every command with its one-line summary."""
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {cmd.summary}" for name, cmd in COMMANDS.items()]
    return ("usage: ssl-vit COMMAND [ARGS...]   (ssl-vit COMMAND --help for its options)\n\ncommands:\n"
            + "\n".join(lines) + "\n")


def resolve(name: str) -> Callable[[List[str]], object]:
    """The function behind command ``name``.

    Raises:
        ValueError: ``name`` is not a command, or its module is missing from this installation.
    """
    if name in REFUSED:
        raise ValueError(REFUSED[name])
    if name not in COMMANDS:
        raise ValueError(f"unknown command {name!r}; the commands are {', '.join(COMMANDS)} (ssl-vit --help)")
    module_name, _, function = COMMANDS[name].target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise  # a dependency of the module is missing: that error names it
        raise ValueError(f"`ssl-vit {name}` is not available in this installation: its module {module_name} "
                         "is missing") from exc
    if not hasattr(module, function):
        raise ValueError(f"`ssl-vit {name}` is not available in this installation: {module_name} has no {function}()")
    return getattr(module, function)


def main(args: Optional[List[str]] = None) -> None:
    try:
        code = run(args)
    except USER_ERRORS as exc:
        if os.environ.get("SSL_VIT_TRACEBACK"):
            raise
        print(f"ssl-vit: error: {error_message(exc)}\n(SSL_VIT_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        sys.exit(1)
    if code:
        sys.exit(code)


def run(args: Optional[List[str]] = None) -> int:
    """The command without the error formatting (what ``main`` runs); returns its exit status."""
    argv = list(sys.argv[1:] if args is None else args)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    function = resolve(argv[0])
    if COMMANDS[argv[0]].target == LIGHTNING:
        # LightningCLI parses the stage name itself; None lets it read sys.argv (no "args given" warning)
        result = function(None if args is None else argv)
    else:
        result = function(argv[1:])
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


if __name__ == "__main__":
    main()
