"""Each DDP rank gets its own random stream (MAE masks and drop path differ across ranks)."""
from types import SimpleNamespace

import torch

from ssl_vit.methods.base import rank_seed
from ssl_vit.methods.mae import MAE


def _masks_after_fit_start(world_size: int, rank: int) -> torch.Tensor:
    torch.manual_seed(7)  # what seed_everything does, identically on every rank
    mae = MAE(arch="vit_tiny_patch4_32", embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32,
              decoder_depth=1, decoder_num_heads=2, lr=1e-3)
    mae._trainer = SimpleNamespace(world_size=world_size, global_rank=rank)
    mae.on_fit_start()
    return mae(torch.randn(2, 3, 32, 32))[2]  # the mask [B, L]


def test_ranks_draw_different_masks_and_single_process_runs_are_unchanged():
    rank0, rank1 = _masks_after_fit_start(2, 0), _masks_after_fit_start(2, 1)
    assert not torch.equal(rank0, rank1)
    assert torch.equal(rank0, _masks_after_fit_start(2, 0))  # reproducible per rank
    assert len({rank_seed(7, r) for r in range(64)}) == 64


def test_a_single_process_keeps_its_random_stream():
    mae = MAE(arch="vit_tiny_patch4_32", embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32,
              decoder_depth=1, decoder_num_heads=2, lr=1e-3)
    mae._trainer = SimpleNamespace(world_size=1, global_rank=0)
    torch.manual_seed(7)
    before = torch.get_rng_state()
    mae.on_fit_start()
    assert torch.equal(torch.get_rng_state(), before)
