"""MAE replays 8 reference training steps (facebookresearch/mae ``engine_pretrain.train_one_epoch``).

``../shared/golden/mae_step.pth`` holds the images, the masking noise the reference's ``torch.rand``
returned, the lr of every step, the losses, the step-0 prediction and the final weights (its README
explains them). The recorded noise goes in through the batch; everything else is ``MAE``'s defaults.
Tolerances are the golden README's: loss 1e-5, weights 1e-7 (key-bias rows of ``attn.qkv.bias`` 1e-6).
"""
import pytest
import torch
from golden import decode, key_bias_rows, load_golden, mae_module, max_differences, run_mae

from ssl_vit.checkpoints.mae import reference_to_ssl_vit_key, ssl_vit_to_reference_key


@pytest.fixture(scope="module")
def golden():
    return load_golden("mae_step.pth")


@pytest.fixture(scope="module")
def replay(golden):
    return run_mae(golden)


def test_lr_schedule_matches_the_reference(golden, replay):
    """``adjust_learning_rate`` per step: lr proportional to the fractional epoch during the warm-up,
    then a half cosine."""
    _, rec = replay
    assert rec.lr == pytest.approx(golden["lr"].tolist(), rel=1e-12, abs=1e-15)


def test_weight_decay_groups_match_the_reference(golden):
    """``add_weight_decay``: no decay for biases and 1-D tensors only, so ``cls_token`` and
    ``mask_token`` are decayed; the fixed position embeddings are not trained at all."""
    module = mae_module(golden["config"])
    names = {id(p): ssl_vit_to_reference_key(n) for n, p in module.named_parameters()}
    decayed, undecayed = ([names[id(p)] for p in g["params"]] for g in module.optimizer_param_groups())
    as_list = lambda v: v if isinstance(v, list) else eval(v)  # noqa: E731  (stored as a list or its repr)
    assert sorted(decayed) == sorted(as_list(golden["config"]["decayed_params"]))
    assert sorted(undecayed) == sorted(as_list(golden["config"]["not_decayed_params"]))
    exempt = mae_module(golden["config"], wd_exempt_tokens=True).optimizer_param_groups()[0]["params"]
    assert len(exempt) == len(decayed) - 2  # the option: cls_token and mask_token exempt


def test_step0_prediction(golden):
    module = mae_module(golden["config"])
    module.load_state_dict({reference_to_ssl_vit_key(k): v for k, v in golden["init"].items()})
    with torch.no_grad():
        loss, pred, mask = module(decode(golden["images"][0]), noise=golden["noise"][0])
    assert torch.equal(mask, golden["mask"][0])
    # visible tokens enter attention in grid order here, in noise order there: rounding only
    torch.testing.assert_close(pred, golden["pred_step0"], atol=5e-6, rtol=0)
    assert float(loss) == pytest.approx(float(golden["loss"][0]), abs=1e-6)


def test_losses_and_gradient_norms_every_step(golden, replay):
    _, rec = replay
    torch.testing.assert_close(torch.tensor(rec.losses), golden["loss"], atol=1e-5, rtol=0)
    total = torch.tensor([sum(v ** 2 for v in norms.values()) ** 0.5 for norms in rec.grad_norms])
    torch.testing.assert_close(total, golden["grad_norm"], rtol=1e-4, atol=0)


def test_final_weights(golden, replay):
    module, _ = replay
    ours = {ssl_vit_to_reference_key(k): v for k, v in module.state_dict().items()}
    assert set(ours) == set(golden["final"])
    worst = max_differences(ours, golden["final"])
    assert max(worst.values()) <= 1e-7, sorted(worst.items(), key=lambda kv: -kv[1])[:5]
    for key, ref in golden["final"].items():
        rows = key_bias_rows(key, ref)
        if rows.stop:
            torch.testing.assert_close(ours[key][rows], ref[rows], atol=1e-6, rtol=0)
    for key in ("pos_embed", "decoder_pos_embed"):  # fixed sin-cos: never trained
        assert torch.equal(ours[key], golden["init"][key])
