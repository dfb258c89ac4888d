"""DINO head (structure, weight norm, frozen norm) and the multi-crop wrapper."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssl_vit.models.backbone import create_backbone
from ssl_vit.models.dino_head import DINOHead, MultiCropNet


def test_head_structure_and_state_dict_keys():
    head = DINOHead(32, out_dim=50, hidden_dim=24, bottleneck_dim=8, nlayers=3)
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(32, 24), (24, 24), (24, 8)]
    assert sum(isinstance(m, nn.GELU) for m in head.mlp) == 2
    assert not any(isinstance(m, nn.BatchNorm1d) for m in head.mlp)
    keys = set(head.state_dict())
    assert {"last_layer.parametrizations.weight.original0", "last_layer.parametrizations.weight.original1"} <= keys
    assert "last_layer.bias" not in keys
    g = head.last_layer.parametrizations.weight.original0
    assert g.shape == (50, 1) and torch.all(g == 1) and not g.requires_grad
    bn = DINOHead(32, 50, 24, 8, nlayers=4, use_bn=True)
    assert sum(isinstance(m, nn.BatchNorm1d) for m in bn.mlp) == 3
    one = DINOHead(32, 50, 24, 8, nlayers=1)
    assert isinstance(one.mlp, nn.Linear) and one.mlp.out_features == 8
    assert DINOHead(32, 50, norm_last_layer=False).last_layer.parametrizations.weight.original0.requires_grad
    with pytest.raises(ValueError, match="nlayers"):
        DINOHead(32, 50, nlayers=0)


def test_linear_init_is_truncated_normal_std_002():
    torch.manual_seed(0)
    head = DINOHead(256, out_dim=64, hidden_dim=512, bottleneck_dim=64)
    w = head.mlp[0].weight
    assert abs(w.std().item() - 0.02) < 0.002  # PyTorch's default would be ~0.036 at fan-in 256
    assert torch.all(head.mlp[0].bias == 0)


def test_output_is_cosine_between_normalised_bottleneck_and_prototypes():
    torch.manual_seed(0)
    head = DINOHead(16, out_dim=20, hidden_dim=32, bottleneck_dim=8)
    x = torch.randn(5, 16)
    z = F.normalize(head.mlp(x), dim=-1)
    v = head.last_layer.parametrizations.weight.original1
    want = z @ F.normalize(v, dim=-1).T  # norm frozen at 1: logits are cosines
    torch.testing.assert_close(head(x), want)
    assert head(x).abs().max() <= 1 + 1e-5


def test_multicrop_net_runs_one_backbone_forward_per_resolution():
    torch.manual_seed(0)
    backbone = create_backbone("vit_tiny_patch4_32", embed_dim=32, depth=1, num_heads=2).eval()
    net = MultiCropNet(backbone, DINOHead(32, 40, 32, 8)).eval()
    calls = []
    backbone.register_forward_hook(lambda m, inp, out: calls.append(tuple(inp[0].shape)))
    b = 3
    crops = [torch.randn(b, 3, 32, 32) for _ in range(2)] + [torch.randn(b, 3, 16, 16) for _ in range(3)]
    out = net(crops)
    assert calls == [(2 * b, 3, 32, 32), (3 * b, 3, 16, 16)]
    assert out.shape == (5 * b, 40)
    calls.clear()
    separately = torch.cat([net.head(backbone(c)) for c in crops])  # crop-major order
    torch.testing.assert_close(out, separately, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="same batch size"):
        net([torch.randn(2, 3, 32, 32), torch.randn(3, 3, 32, 32)])


def test_head_pickles_despite_the_parametrization():
    """ddp_spawn and torch.save(model) pickle modules; PyTorch refuses parametrized ones by default."""
    import pickle

    head = DINOHead(8, 16, 8, 4)
    with torch.no_grad():
        head.last_layer.parametrizations.weight.original1.mul_(3)
    copy = pickle.loads(pickle.dumps(head))
    x = torch.randn(3, 8)
    assert torch.equal(copy(x), head(x))
    assert list(copy.state_dict()) == list(head.state_dict())
    flags = lambda m: [(n, p.requires_grad) for n, p in m.named_parameters()]
    assert flags(copy) == flags(head) and not copy.last_layer.parametrizations.weight.original0.requires_grad


def test_prototypes_run_in_float32_under_autocast():
    """Under bf16 autocast the MLP may run in bf16, but the normalisation and the prototypes run in
    fp32: the output equals the fp32 last layer applied to the same bottleneck."""
    torch.manual_seed(0)
    head = DINOHead(32, 512, hidden_dim=64, bottleneck_dim=16).eval()
    x = torch.randn(8, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(x)
        bottleneck = head.mlp(x)
    assert out.dtype == torch.float32
    with torch.no_grad():
        expected = head.last_layer(torch.nn.functional.normalize(bottleneck.float(), dim=-1))
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
