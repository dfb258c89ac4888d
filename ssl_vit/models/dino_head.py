"""DINO's projection head and the multi-crop wrapper that runs a backbone + head on a list of crops.

The head follows Caron et al. 2021 ("Emerging Properties in Self-Supervised Vision Transformers"):
an MLP (``nlayers`` linear layers, GELU, hidden width 2048) to a 256-d bottleneck, L2 normalisation,
then a weight-normalised linear layer without bias to ``out_dim`` prototypes (65,536).

Weight normalisation uses ``torch.nn.utils.parametrizations.weight_norm``. The reference code used the
old ``torch.nn.utils.weight_norm``, so its state-dict keys differ::

    reference (facebookresearch/dino)     ssl_vit
    last_layer.weight_g   [K, 1]          last_layer.parametrizations.weight.original0   [K, 1]
    last_layer.weight_v   [K, bottleneck] last_layer.parametrizations.weight.original1   [K, bottleneck]
"""
from itertools import groupby
from typing import Any, Dict, List, Sequence

import torch
from timm.layers import trunc_normal_
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from ssl_vit.models.rel_pos import check_input_size


class DINOHead(nn.Module):
    """MLP -> L2 normalisation -> weight-normalised prototypes.

    Args:
        in_dim: backbone feature width ``D``.
        out_dim: number of prototypes ``K``.
        hidden_dim: width of the hidden MLP layers.
        bottleneck_dim: width of the MLP output, before normalisation.
        nlayers: number of linear layers in the MLP (>= 1; 1 means a single linear to the bottleneck).
        use_bn: BatchNorm1d after every hidden linear layer (the reference's ``use_bn_in_head``).
        norm_last_layer: freeze the norm (``original0``, the reference ``weight_g``) of the last
            layer at 1, so the prototypes are unit vectors and the output logits are cosines.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        use_bn: bool = False,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        sizes = dict(in_dim=in_dim, out_dim=out_dim, hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim, nlayers=nlayers)
        for name, value in sizes.items():
            if value < 1:
                raise ValueError(f"DINOHead: {name} must be >= 1, got {value}")
        if nlayers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: List[nn.Module] = []
            dims = [in_dim] + [hidden_dim] * (nlayers - 1)
            for d_in, d_out in zip(dims[:-1], dims[1:]):
                layers.append(nn.Linear(d_in, d_out))
                if use_bn:
                    layers.append(nn.BatchNorm1d(d_out))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False), name="weight", dim=0)
        with torch.no_grad():
            self.last_layer.parametrizations.weight.original0.fill_(1.0)
        self.norm_last_layer = norm_last_layer
        if norm_last_layer:
            self.last_layer.parametrizations.weight.original0.requires_grad_(False)

    # PyTorch refuses to pickle parametrized modules (only their state_dict), which would rule out
    # ddp_spawn and torch.save(model); the last layer is therefore pickled as its tensors and rebuilt.
    def __getstate__(self) -> Dict[str, Any]:
        state = self.__dict__.copy()
        modules = dict(state["_modules"])
        last = modules.pop("last_layer")
        state["_modules"] = modules
        state["_last_layer"] = (last.in_features, last.out_features, last.state_dict(keep_vars=True))
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        in_features, out_features, tensors = state.pop("_last_layer")
        self.__dict__.update(state)
        trainable = {name: t.requires_grad for name, t in tensors.items()}
        last = weight_norm(nn.Linear(in_features, out_features, bias=False), name="weight", dim=0)
        last.load_state_dict(tensors, assign=True)  # keeps the module's requires_grad: restore ours
        for name, param in last.named_parameters():
            param.requires_grad_(trainable[name])
        self._modules["last_layer"] = last

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor, return_bottleneck: bool = False) -> Any:
        """Args: x: ``[N, D]`` features. Returns: ``[N, K]`` prototype logits (before temperature); with
        ``return_bottleneck``, ``(logits, bottleneck)``, the latter ``[N, bottleneck_dim]`` before its
        L2 normalisation.

        The normalisation and the prototypes run in float32 even under autocast: at the teacher's
        temperature 0.04 bf16 logits move the teacher distribution by a total variation of ~2e-3
        (fp32: 0), and the loss's softmax and centring read these logits."""
        z = self.mlp(x)  # [N, bottleneck]
        with torch.autocast(device_type=z.device.type, enabled=False):
            logits = self.last_layer(nn.functional.normalize(z.float(), dim=-1, p=2))  # [N, K] float32
        return (logits, z) if return_bottleneck else logits


class MultiCropNet(nn.Module):
    """Backbone + head over a list of crops (the reference ``MultiCropWrapper``).

    Consecutive crops of the same size are concatenated and go through the backbone as one batch
    (one forward per resolution run, e.g. 2 for "2 global then N local"), then the head runs once
    on all features.

    Args:
        backbone: maps ``[B, C, H, W]`` to pooled features ``[B, D]`` (any resolution).
        head: maps ``[N, D]`` to ``[N, K]``.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: Sequence[Tensor], return_bottleneck: bool = False) -> Any:
        """Args: crops: ``V`` tensors ``[B, C, h_v, w_v]`` (same ``B``); return_bottleneck: also return the
        head's bottleneck (``DINOHead.forward``).

        Returns:
            ``[V * B, K]``, crop-major: rows ``v * B : (v + 1) * B`` belong to crop ``v``; with
            ``return_bottleneck``, ``(logits, bottleneck)`` in the same row order.
        """
        if isinstance(crops, Tensor):
            crops = [crops]
        if len(crops) == 0:
            raise ValueError("MultiCropNet needs at least one crop")
        batch = crops[0].shape[0]
        if any(c.shape[0] != batch for c in crops):
            raise ValueError(f"all crops need the same batch size, got {[c.shape[0] for c in crops]}")
        for index, crop in enumerate(crops):  # one-size backbones (relative bias): say which crop does not fit
            check_input_size(self.backbone, crop.shape[-2:], f"crop {index}")
        features = [
            self.backbone(torch.cat(list(group)))  # [n_same_size * B, D]
            for _, group in groupby(crops, key=lambda c: tuple(c.shape[-2:]))
        ]
        features = torch.cat(features)  # [V * B, D]
        return self.head(features, return_bottleneck=True) if return_bottleneck else self.head(features)
