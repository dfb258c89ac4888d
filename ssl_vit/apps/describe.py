"""`ssl-vit describe`: what a backbone costs at each resolution: parameters, tokens, forward FLOPs
per image and the share of them spent in attention, counted, not estimated.

    ssl-vit describe vit_base_patch16                        # 224, 448 and 896
    ssl-vit describe vit_base_patch16 --img-size 224 384     # the ViT paper's 35.1 / 111.3 GFLOPs
    ssl-vit describe vit_small_patch4 --img-size 32 --pos-embed sincos --global-pool avg

How it counts:

* ``torch.utils.flop_counter.FlopCounterMode`` records every matrix product and convolution of one
  forward pass of a batch of one image. It counts **2 FLOPs per multiply-add**; so does the ViT
  paper's GFLOPs column (ViT-B/16 at 224: 17.6 G multiply-adds, 35.1 GFLOPs). Element-wise work
  (softmax, GELU, LayerNorm, residual adds) is not counted, by that convention.
* The model is built and run on the ``meta`` device: shapes only, no memory, no arithmetic, so a
  ViT-G at 896 is described in seconds.
* Attention runs on timm's manual path (``fused_attn = False``) while counting. The fused path's
  ``F.scaled_dot_product_attention`` is not counted everywhere: on CPU it dispatches to
  ``_scaled_dot_product_flash_attention_for_cpu``, which the counter does not know (ViT-B/16 at 224
  counts 33.7 GFLOPs there, the two attention matrix products missing). The manual path is plain
  ``q @ k^T`` and ``attn @ v``, counted on every device.
* The attention share is counted by module: the FLOPs inside each attention module minus those of
  its child modules (the ``qkv`` and ``proj`` linears, any norms), i.e. the ``softmax(q k^T) v``
  products that grow with the square of the token count. Everything else (patch embedding, qkv and
  output projections, MLPs) grows linearly.
"""
import argparse
import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ssl_vit.models.backbone import create_backbone, patch_size

DEFAULT_SIZES = (224, 448, 896)


@dataclass
class Cost:
    """What one backbone costs for one image of ``img_size`` x ``img_size``."""
    img_size: int
    tokens: int  # prefix tokens (CLS, registers) + patches
    params: int  # every parameter, frozen ones (a sin-cos position embedding) included
    flops: int  # forward FLOPs per image, 2 per multiply-add
    attention_flops: int  # of which in the softmax(q k^T) v products

    @property
    def attention_share(self) -> float:
        return self.attention_flops / self.flops if self.flops else 0.0


@contextmanager
def counted_attention(model: nn.Module) -> Iterator[List[str]]:
    """Every attention module of ``model`` on timm's manual path (flags restored on exit); yields
    the modules' names (``blocks.0.attn`` ...), the modules whose own FLOPs are attention."""
    saved = {name: (module, module.fused_attn, "fused_attn" in vars(module))
             for name, module in model.named_modules() if hasattr(module, "fused_attn")}
    try:
        for module, _, _ in saved.values():
            module.fused_attn = False
        yield list(saved)
    finally:
        for module, value, own in saved.values():
            if own:
                module.fused_attn = value
            else:  # a class attribute: drop the instance override
                vars(module).pop("fused_attn", None)


def own_flops(counts: Dict[str, Dict[Any, int]], prefix: str, name: str, children: Sequence[str]) -> int:
    """FLOPs a module spends itself, outside its child modules, from ``FlopCounterMode.get_flop_counts()``."""
    def total(key: str) -> int:
        return sum(counts.get(f"{prefix}.{key}", {}).values())
    return total(name) - sum(total(f"{name}.{child}") for child in children)


def measure(model: nn.Module, img_size: int) -> Cost:
    """The cost of one forward of ``model`` (a timm ViT, on any device, ``meta`` included) on one
    ``img_size`` x ``img_size`` RGB image.

    Raises:
        ValueError: ``img_size`` is not a positive multiple of the patch size.
    """
    patch = patch_size(model)
    if img_size < patch or img_size % patch:
        raise ValueError(f"--img-size {img_size} is not a multiple of the patch size {patch}")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    images = torch.zeros(1, 3, img_size, img_size, device=device, dtype=dtype)
    prefix = type(model).__name__  # how FlopCounterMode names the root module
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), counted_attention(model) as attention, FlopCounterMode(display=False) as counter:
            model(images)
    finally:
        model.train(was_training)
    counts = counter.get_flop_counts()
    modules = dict(model.named_modules())
    attention_flops = sum(own_flops(counts, prefix, name, [child for child, _ in modules[name].named_children()])
                          for name in attention)
    grid = (img_size // patch) ** 2
    return Cost(img_size=img_size, tokens=int(getattr(model, "num_prefix_tokens", 0)) + grid,
                params=sum(p.numel() for p in model.parameters()), flops=int(counter.get_total_flops()),
                attention_flops=int(attention_flops))


def describe(arch: str, img_sizes: Sequence[int] = DEFAULT_SIZES, **backbone_kwargs: Any) -> List[Cost]:
    """``create_backbone(arch, img_size=N, **backbone_kwargs)`` measured at each ``N``, on the meta
    device (the position embedding is built for ``N``, as for a model trained or finetuned there)."""
    if not img_sizes:
        raise ValueError("describe needs at least one --img-size")
    costs = []
    for size in img_sizes:
        with torch.device("meta"):
            model = create_backbone(arch, img_size=size, **backbone_kwargs)
        costs.append(measure(model, size))
    return costs


def gflops(flops: int) -> str:
    """GFLOPs with two decimals, four below 1 (the digits models cost a few MFLOPs)."""
    return f"{flops / 1e9:.2f}" if flops >= 1e9 else f"{flops / 1e9:.4f}"


def format_costs(arch: str, costs: Sequence[Cost], backbone_kwargs: Dict[str, Any]) -> str:
    """The table ``ssl-vit describe`` prints, with growth relative to the first resolution."""
    options = " ".join(f"{k}={v}" for k, v in backbone_kwargs.items())
    lines = [f"{arch}{' ' + options if options else ''}: {costs[0].params / 1e6:.2f} M parameters at "
             f"{costs[0].img_size} (forward, per image; 1 multiply-add = 2 FLOPs, as in the ViT paper)",
             f"{'img':>5} {'tokens':>7} {'params (M)':>11} {'GFLOPs':>9} {'x':>6} {'attn GFLOPs':>12} {'attn %':>7}"]
    for cost in costs:
        lines.append(f"{cost.img_size:>5} {cost.tokens:>7} {cost.params / 1e6:>11.2f} {gflops(cost.flops):>9} "
                     f"{cost.flops / costs[0].flops:>6.1f} {gflops(cost.attention_flops):>12} "
                     f"{100 * cost.attention_share:>6.1f}%")
    return "\n".join(lines)


def parse_value(text: str) -> Any:
    """Option values on a command line: int, float, true/false, else the string itself (``none`` stays
    the string ``"none"``: ``pos_embed=none`` is a value of its own)."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def backbone_options(parser: argparse.ArgumentParser) -> None:
    """The ``create_backbone`` options shared by ``describe`` (and read back by ``option_kwargs``)."""
    group = parser.add_argument_group("backbone options (create_backbone keyword arguments; default: the arch's)")
    group.add_argument("--pos-embed", help="position embedding (learn, sincos, none, ...)")
    group.add_argument("--global-pool", help="pooling (token, avg, map)")
    group.add_argument("--stem", help="patch embedding stem (patch, conv)")
    group.add_argument("--embed-dim", type=int, help="width")
    group.add_argument("--depth", type=int, help="blocks")
    group.add_argument("--num-heads", type=int, help="attention heads")
    group.add_argument("--mlp-ratio", type=float, help="MLP width / embed_dim")
    group.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="any other create_backbone keyword argument (repeatable), e.g. --set class_token=false")


def option_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """The ``create_backbone`` kwargs given on the command line (the ones left out keep the default).

    Raises:
        ValueError: a ``--set`` without ``=``.
    """
    kwargs = {key: getattr(args, key) for key in ("pos_embed", "global_pool", "stem", "embed_dim", "depth",
                                                  "num_heads", "mlp_ratio") if getattr(args, key) is not None}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. --set class_token=false")
        kwargs[key.replace("-", "_")] = parse_value(value)
    return kwargs


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ssl-vit describe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("arch", help="backbone name: vit_<size>_patch<P>[_<img>] or a timm ViT name")
    parser.add_argument("--img-size", type=int, nargs="+", default=list(DEFAULT_SIZES),
                        help="square input sides to measure (default: 224 448 896)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    backbone_options(parser)
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    kwargs = option_kwargs(args)
    costs = describe(args.arch, args.img_size, **kwargs)
    if args.json:
        print(json.dumps({"arch": args.arch, "backbone_kwargs": kwargs, "flops_per_multiply_add": 2,
                          "costs": [{**asdict(c), "attention_share": c.attention_share} for c in costs]}))
    else:
        print(format_costs(args.arch, costs, kwargs))
    return 0
