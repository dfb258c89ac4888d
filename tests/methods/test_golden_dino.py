"""DINO replays 8 reference training steps (facebookresearch/dino ``train_one_epoch``) with its defaults.

``../shared/golden/dino_step.pth`` holds every input, schedule value, loss, the step-0 head outputs
and the final student, teacher and centre of the reference run (its README explains them). A failure
names the component: schedules, the step-0 forward, gradients, then the whole run.
Tolerances are the golden README's: loss 1e-5, student 1e-7, teacher 5e-8, centre 1e-6, the
key-bias rows of ``attn.qkv.bias`` (pure rounding noise) 1e-6.
"""
import pytest
import torch
from golden import STEPS, decode, dino_batches, dino_module, key_bias_rows, load_golden, max_differences, run_dino

from ssl_vit.checkpoints.dino import dino_reference_to_ssl_vit, ssl_vit_to_dino_reference
from ssl_vit.methods.base import param_groups


@pytest.fixture(scope="module")
def golden():
    return load_golden("dino_step.pth")


@pytest.fixture(scope="module")
def replay(golden):
    return run_dino(golden)


def test_schedules_match_the_reference(golden, replay):
    """lr warm-up reaching the peak at its last step, wd and momentum cosines per step, and the teacher
    temperature per epoch."""
    _, rec = replay
    assert rec.lr == pytest.approx(golden["lr"].tolist(), rel=1e-12, abs=1e-15)
    assert rec.wd == pytest.approx(golden["wd"].tolist(), rel=1e-12)
    assert rec.momentum == pytest.approx(golden["momentum"].tolist(), rel=1e-12)
    assert rec.teacher_temp == pytest.approx(golden["teacher_temp"].tolist(), rel=1e-12)


def test_weight_decay_groups_match_the_reference(golden):
    """``utils.get_params_groups``: every trainable tensor that is not a bias and not 1-D is decayed,
    ``pos_embed`` and ``cls_token`` included; the option exempts them."""
    module = dino_module(golden["config"])
    names = {id(p): n for n, p in module.student.named_parameters()}
    decayed, undecayed = (
        sorted(names[id(p)] for p in g["params"]) for g in param_groups(module.student.named_parameters(), 0.04)
    )
    assert "backbone.pos_embed" in decayed and "backbone.cls_token" in decayed
    assert all(n.endswith(".bias") or n.endswith("weight") and "norm" in n for n in undecayed)
    reference = {k for k, v in golden["student_init"].items() if not k.endswith(".bias") and v.ndim > 1 and not k.endswith("weight_g")}
    assert {ssl_vit_to_dino_key(n) for n in decayed} == reference
    exempt = dino_module(golden["config"], wd_exempt_tokens=True).optimizer_param_groups()[0]["params"]
    assert len(exempt) == len(decayed) - 2


def ssl_vit_to_dino_key(name: str) -> str:
    return next(iter(ssl_vit_to_dino_reference({"student." + name: torch.zeros(1)}, "student")))


def test_step0_head_outputs(golden):
    """The forward alone: backbone with the reference position-embedding resampling for the local
    crops, head, multi-crop batching, at the initial weights."""
    module = dino_module(golden["config"])
    module.load_state_dict(dino_reference_to_ssl_vit(golden["student_init"], golden["teacher_init"]))
    crops, _ = dino_batches(golden)[0]
    with torch.no_grad():
        student, teacher = module.student(crops), module.teacher(crops[:2])
    torch.testing.assert_close(student, golden["student_output_step0"], atol=1e-6, rtol=0)
    torch.testing.assert_close(teacher, golden["teacher_output_step0"], atol=1e-6, rtol=0)


def test_gradient_norms_before_clipping(golden, replay):
    """Per-tensor gradient norms the reference ``clip_gradients`` saw, every step."""
    _, rec = replay
    names = golden["config"]["grad_norm_names"]
    names = names if isinstance(names, list) else eval(names)  # stored as a list or its repr
    for step in range(STEPS):
        ours = {ssl_vit_to_dino_key(k[len("student."):]): v for k, v in rec.grad_norms[step].items() if k.startswith("student.")}
        for index, name in enumerate(names):
            key = name[len("module."):]
            if key.endswith("attn.qkv.bias"):
                continue  # the key-bias rows are rounding noise
            assert ours[key] == pytest.approx(float(golden["grad_norms"][step, index]), rel=1e-4, abs=1e-8), (step, key)


def test_losses_and_centre_every_step(golden, replay):
    _, rec = replay
    torch.testing.assert_close(torch.tensor(rec.losses), golden["loss"], atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat(rec.centers), golden["center"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("role,atol", [("student", 1e-7), ("teacher", 5e-8)])
def test_final_weights(golden, replay, role, atol):
    module, _ = replay
    ours = ssl_vit_to_dino_reference(module.state_dict(), role)
    reference = golden[f"{role}_final"]
    assert set(ours) == set(reference)
    worst = max_differences(ours, reference)
    assert max(worst.values()) <= atol, sorted(worst.items(), key=lambda kv: -kv[1])[:5]
    for key, ref in reference.items():
        rows = key_bias_rows(key, ref)
        if rows.stop:
            torch.testing.assert_close(ours[key][rows], ref[rows], atol=1e-6, rtol=0)
    torch.testing.assert_close(module.loss.center, golden["center_final"], atol=1e-6, rtol=0)


def test_the_options_are_the_measured_departures(golden):
    """Each named option changes the replay (so the default is what makes it faithful): the per-step
    temperature moves step 1's loss by ~0.3, timm's antialiased resampling the student by ~1e-5."""
    _, per_step = run_dino(golden, teacher_temp_per_step=True)
    assert abs(per_step.losses[1] - float(golden["loss"][1])) > 0.1
    module, _ = run_dino(golden, pos_embed_resample="timm")
    worst = max_differences(ssl_vit_to_dino_reference(module.state_dict(), "student"), golden["student_final"])
    assert max(worst.values()) > 1e-6


def test_reference_inputs_decode_exactly(golden):
    codes = golden["inputs_local"][0, 0]
    images = decode(codes)
    assert torch.equal((images * 64 + 128).round().to(torch.uint8), codes)
