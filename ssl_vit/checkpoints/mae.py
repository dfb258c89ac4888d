"""Load a whole masked autoencoder (encoder + decoder) for reconstruction, from either

* a Lightning checkpoint written by ``ssl_vit.methods.mae.MAE`` (rebuilt from its
  ``hyper_parameters``, loaded strictly), or
* a facebookresearch/mae pretraining checkpoint ``{"model": state_dict}`` that includes the
  decoder (e.g. the ``mae_visualize_*`` releases); its architecture is read off the tensor shapes.

Every key and shape is checked; a wrong file fails with a message naming the keys.
"""
import inspect
import math
import re
from typing import Any, Dict, Mapping, Tuple

import torch

from ssl_vit.checkpoints.format import CHECKPOINT_KEY
from ssl_vit.checkpoints.io import PathLike, check_keys, check_shapes, safe_torch_load
from ssl_vit.methods.mae import MAE
from ssl_vit.models.backbone import VIT_SIZES

FORMATS_HINT = (
    "load_mae reads (a) Lightning checkpoints of ssl_vit.methods.mae.MAE (keys state_dict + "
    "hyper_parameters) and (b) facebookresearch/mae checkpoints {'model': state_dict} WITH the decoder "
    "(decoder_embed, decoder_blocks, decoder_pred...); encoder-only releases cannot reconstruct images."
)

# (reference prefix, ssl_vit prefix); a prefix without a trailing dot is a whole key.
_RENAMES: Tuple[Tuple[str, str], ...] = (
    ("decoder_embed.", "decoder.embed."),
    ("decoder_pos_embed", "decoder.pos_embed"),
    ("decoder_blocks.", "decoder.blocks."),
    ("decoder_norm.", "decoder.norm."),
    ("decoder_pred.", "decoder.pred."),
    ("mask_token", "decoder.mask_token"),
    ("", "encoder.vit."),
)

# Decoder heads of the reference models: 512 wide with 16 heads for every released size.
_REFERENCE_DECODER_HEADS = {512: 16}
_HEADS_BY_WIDTH = {size.embed_dim: size.num_heads for size in VIT_SIZES.values()}


def _rename(key: str, src: int) -> str:
    for pair in _RENAMES:
        old, new = pair[src], pair[1 - src]
        if key == old or (old.endswith(".") or not old) and key.startswith(old):
            return new + key[len(old):]
    raise KeyError(f"no mapping for {key!r}")


def reference_to_ssl_vit_key(key: str) -> str:
    """``decoder_blocks.0.attn.qkv.weight`` -> ``decoder.blocks.0.attn.qkv.weight`` etc."""
    return _rename(key, 0)


def ssl_vit_to_reference_key(key: str) -> str:
    """Inverse of :func:`reference_to_ssl_vit_key` (``encoder.vit.blocks.0...`` -> ``blocks.0...``)."""
    if not key.startswith(("encoder.vit.", "decoder.")):
        raise KeyError(f"{key!r} is neither an encoder.vit. nor a decoder. key")
    return _rename(key, 1)


def _count_blocks(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.")
    indices = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    return max(indices) + 1 if indices else 0


def infer_reference_config(
    state: Mapping[str, torch.Tensor], what: str = "checkpoint", **overrides: Any
) -> Dict[str, Any]:
    """MAE constructor arguments implied by the tensor shapes of a reference state dict.

    Widths come from ``cls_token`` and ``decoder_embed.weight``, depths from the block counts, patch
    size and channels from ``patch_embed.proj.weight``, image size from ``pos_embed`` (CLS + square
    grid), MLP ratio from ``blocks.0.mlp.fc1.weight``. Heads are not stored in the weights: they come
    from the ViT table by width (encoder) and the reference decoder (512 wide: 16 heads); widths
    outside those raise, asking for ``num_heads`` / ``decoder_num_heads``. A standard ViT size is
    named by its ``arch`` (``vit_large_patch16``); ``overrides`` (any MAE argument) win over the
    inferred values.
    """
    needed = ["cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight", "decoder_embed.weight"]
    missing = [k for k in needed if k not in state]
    if missing:
        raise KeyError(f"{what}: cannot read the architecture, missing keys: {', '.join(missing)}\n{FORMATS_HINT}")
    embed_dim = state["cls_token"].shape[-1]
    _, in_chans, patch, patch_w = state["patch_embed.proj.weight"].shape
    if patch != patch_w:
        raise ValueError(f"{what}: non-square patches {patch}x{patch_w} are not supported")
    num_patches = state["pos_embed"].shape[1] - 1
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"{what}: pos_embed holds {num_patches} + 1 positions, not CLS + a square grid")
    config: Dict[str, Any] = dict(
        img_size=side * patch,
        patch_size=patch,
        in_chans=in_chans,
        embed_dim=embed_dim,
        depth=_count_blocks(state, "blocks."),
        mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
        decoder_embed_dim=state["decoder_embed.weight"].shape[0],
        decoder_depth=_count_blocks(state, "decoder_blocks."),
    )
    if embed_dim in _HEADS_BY_WIDTH:
        config["num_heads"] = _HEADS_BY_WIDTH[embed_dim]
    if config["decoder_embed_dim"] in _REFERENCE_DECODER_HEADS:
        config["decoder_num_heads"] = _REFERENCE_DECODER_HEADS[config["decoder_embed_dim"]]
    return _constructor_args({**config, **overrides}, what)


def _check_args(config: Mapping[str, Any], what: str) -> None:
    accepted = set(inspect.signature(MAE.__init__).parameters) - {"self"}
    unknown = sorted(set(config) - accepted)
    if unknown:
        raise ValueError(f"{what}: unknown MAE arguments {unknown}; accepted: {sorted(accepted)}")


def _constructor_args(config: Dict[str, Any], what: str) -> Dict[str, Any]:
    """Checked MAE constructor arguments; a standard ViT size is named by its arch."""
    _check_args(config, what)
    for key, name in (("num_heads", "encoder width"), ("decoder_num_heads", "decoder width")):
        if key not in config:
            width = config["embed_dim" if key == "num_heads" else "decoder_embed_dim"]
            raise ValueError(f"{what}: the number of heads of a {width}-wide {name} is not standard: pass {key}=...")
    if "arch" in config:  # the caller named it; the inferred sizes stay as explicit overrides
        return config
    config["arch"] = None
    mlp_ratio = 4.0  # create_backbone's default for names that are not a table size
    for size, dims in VIT_SIZES.items():
        if (config["embed_dim"], config["depth"], config["num_heads"]) == dims[:3]:
            config["arch"] = f"vit_{size}_patch{config.pop('patch_size')}"
            for key in ("embed_dim", "depth", "num_heads"):
                config.pop(key)
            mlp_ratio = dims.mlp_ratio
            break
    if config.get("mlp_ratio") == mlp_ratio:
        config.pop("mlp_ratio")
    return config


def _load_reference(state: Dict[str, torch.Tensor], what: str, kwargs: Dict[str, Any]) -> MAE:
    module = MAE(**infer_reference_config(state, what, **kwargs))
    module_state = {ssl_vit_to_reference_key(k): (k, v) for k, v in module.state_dict().items()}
    check_keys(module_state, state, f"{what} (facebookresearch/mae layout)", FORMATS_HINT)
    check_shapes({k: v for k, (_, v) in module_state.items()}, state, f"{what} (facebookresearch/mae layout)")
    module.load_state_dict({module_state[k][0]: v for k, v in state.items()}, strict=True)
    return module


def _load_lightning(checkpoint: Dict[str, Any], what: str, kwargs: Dict[str, Any]) -> MAE:
    method = checkpoint.get(CHECKPOINT_KEY, {}).get("method", "mae")
    if method != "mae":
        raise ValueError(f"{what} is a {method!r} checkpoint, not an MAE one; use ssl_vit.load_backbone")
    hparams = {k: v for k, v in checkpoint["hyper_parameters"].items() if not k.startswith("_")}
    config = {**hparams, **kwargs}
    _check_args(config, what)
    module = MAE(**config)
    state = checkpoint["state_dict"]
    check_keys(module.state_dict(), state, what, FORMATS_HINT)
    check_shapes(module.state_dict(), state, what)
    module.load_state_dict(state, strict=True)
    return module


def load_mae(path: PathLike, **kwargs: Any) -> MAE:
    """Load an MAE (encoder and decoder) from an ssl_vit Lightning checkpoint or a
    facebookresearch/mae checkpoint, in eval mode on the CPU.

    Args:
        path: the checkpoint file (read with ``weights_only=True``).
        **kwargs: ``MAE`` constructor arguments overriding the stored / inferred ones, e.g.
            ``norm_pix_loss=True`` for a reference model trained with normalised pixels (the weights
            do not tell; the reference default is ``False``), ``mask_ratio``, or ``num_heads`` for a
            non-standard width.

    Raises:
        KeyError: the keys differ from the model's (the message names them).
        ValueError: wrong shapes, an unknown format, or an architecture that cannot be inferred.
    """
    what = str(path)
    checkpoint = safe_torch_load(path)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{what}: expected a dict checkpoint, got {type(checkpoint).__name__}\n{FORMATS_HINT}")
    if "state_dict" in checkpoint and "hyper_parameters" in checkpoint:
        module = _load_lightning(checkpoint, what, kwargs)
    elif isinstance(checkpoint.get("model"), dict):
        module = _load_reference(checkpoint["model"], what, kwargs)
    elif "cls_token" in checkpoint:  # a bare reference state dict
        module = _load_reference(checkpoint, what, kwargs)
    else:
        raise ValueError(f"{what}: unrecognised checkpoint with top-level keys {sorted(checkpoint)[:10]}\n{FORMATS_HINT}")
    return module.eval()
