"""The per-block speed switches: activation checkpointing changes memory, not results; compile
marks every block (the compiled run itself is a GPU benchmark, see docs/benchmarks.md)."""
import torch

from ssl_vit.methods.dino import DINO
from ssl_vit.methods.mae import MAE

MAE_TINY = dict(arch="vit_tiny_patch4_32", embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32,
                decoder_depth=1, decoder_num_heads=2, lr=1e-3)
DINO_TINY = dict(arch="vit_tiny_patch4_32", img_size=32, embed_dim=32, depth=2, num_heads=2, out_dim=32,
                 head_hidden_dim=32, head_bottleneck_dim=8, drop_path_rate=0.0, lr=1e-3)


def _grads(module: torch.nn.Module, loss: torch.Tensor) -> dict:
    loss.backward()
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def test_mae_grad_checkpointing_gives_the_same_loss_and_gradients():
    images, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    runs = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        mae = MAE(**MAE_TINY, grad_checkpointing=checkpointing)
        loss = mae(images, noise=noise)[0]
        runs.append((loss.detach(), _grads(mae, loss)))
    assert runs[1][1].keys() == runs[0][1].keys() and len(runs[0][1]) > 10
    torch.testing.assert_close(runs[1][0], runs[0][0])
    for name, grad in runs[0][1].items():
        torch.testing.assert_close(runs[1][1][name], grad, msg=name)


def test_dino_grad_checkpointing_recomputes_the_student_only():
    crops = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16)]
    runs = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        dino = DINO(**DINO_TINY, grad_checkpointing=checkpointing)
        assert dino.student.backbone.grad_checkpointing == checkpointing
        assert not dino.teacher.backbone.grad_checkpointing  # no backward through the teacher
        out = dino.student(crops)
        runs.append(_grads(dino.student, out.logsumexp(-1).mean()))
    for name, grad in runs[0].items():
        torch.testing.assert_close(runs[1][name], grad, msg=name)


def test_compile_switch_compiles_every_block_in_place():
    mae, dino = MAE(**MAE_TINY, compile_blocks=True), DINO(**DINO_TINY, compile_blocks=True)
    blocks = list(mae.encoder.vit.blocks) + list(mae.decoder.blocks)
    blocks += list(dino.student.backbone.blocks) + list(dino.teacher.backbone.blocks)
    assert len(blocks) == 2 + 1 + 2 + 2 and all(b._compiled_call_impl is not None for b in blocks)
    plain = MAE(**MAE_TINY)
    assert all(b._compiled_call_impl is None for b in plain.encoder.vit.blocks)
    assert mae.state_dict().keys() == plain.state_dict().keys()  # checkpoints keep their keys
