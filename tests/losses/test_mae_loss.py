"""The MAE loss: masked patches only, optional per-patch normalised targets."""
import torch

from ssl_vit.losses.mae import denormalize_patches, mae_loss, normalize_patches


def plain_mae_loss(pred, target, mask, norm_pix):
    total, count = 0.0, 0
    for b in range(pred.shape[0]):
        for i in range(pred.shape[1]):
            if mask[b, i] == 1:
                t = target[b, i]
                if norm_pix:
                    t = (t - t.mean()) / torch.sqrt(t.var(unbiased=True) + 1e-6)
                total += ((pred[b, i] - t) ** 2).mean()
                count += 1
    return total / count


def test_loss_equals_a_plain_loop_implementation():
    torch.manual_seed(0)
    pred, target = torch.randn(3, 10, 12), torch.rand(3, 10, 12)
    mask = (torch.rand(3, 10) < 0.7).float()
    mask[0, 0] = 1
    for norm_pix in (False, True):
        torch.testing.assert_close(mae_loss(pred, target, mask, norm_pix), plain_mae_loss(pred, target, mask, norm_pix))


def test_visible_patches_do_not_count():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 8, 12), torch.randn(2, 8, 12)
    mask = torch.zeros(2, 8)
    mask[:, :6] = 1
    base = mae_loss(pred, target, mask, True)
    changed = target.clone()
    changed[:, 6:] += 100.0  # visible targets
    assert torch.equal(mae_loss(pred, changed, mask, True), base)
    changed = target.clone()
    changed[:, 0] += 1.0  # a masked target
    assert mae_loss(pred, changed, mask, False) != mae_loss(pred, target, mask, False)


def test_normalised_targets_round_trip_and_bf16_predictions():
    torch.manual_seed(0)
    target = torch.rand(2, 4, 48)
    normed = normalize_patches(target)
    torch.testing.assert_close(normed.mean(-1), torch.zeros(2, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(denormalize_patches(normed, target), target, atol=1e-5, rtol=1e-5)
    mask = torch.ones(2, 4)
    loss = mae_loss(normed.bfloat16(), target, mask, True)
    assert loss.dtype == torch.float32 and loss < 1e-4
