"""DINO loss, centre update and collapse indicators against plainly written formulas."""
import math

import pytest
import torch
import torch.nn.functional as F

from ssl_vit.losses.dino import DINOLoss, teacher_stats


def reference_loss(student, teacher, center, num_views, teacher_temp, student_temp):
    """The paper's double loop over (teacher global view, student view) pairs, written plainly."""
    batch = student.shape[0] // num_views
    s_views = [student[v * batch:(v + 1) * batch] for v in range(num_views)]
    t_views = [teacher[g * batch:(g + 1) * batch] for g in range(teacher.shape[0] // batch)]
    total, terms = 0.0, 0
    for g, t in enumerate(t_views):
        q = torch.softmax((t - center) / teacher_temp, dim=-1)
        for v, s in enumerate(s_views):
            if v == g:
                continue
            per_sample = torch.zeros(batch, dtype=torch.float64)
            for b in range(batch):
                log_p = torch.log_softmax(s[b] / student_temp, dim=-1)
                per_sample[b] = -(q[b] * log_p).sum()
            total = total + per_sample.mean()
            terms += 1
    return total / terms


@pytest.mark.parametrize("num_views,batch,k", [(2, 3, 7), (4, 2, 16), (10, 3, 32)])
def test_loss_equals_double_loop_over_view_pairs(num_views, batch, k):
    torch.manual_seed(num_views)
    student = torch.randn(num_views * batch, k, dtype=torch.float64) * 3
    teacher = torch.randn(2 * batch, k, dtype=torch.float64) * 3
    loss_fn = DINOLoss(k).double()
    loss_fn.center.copy_(torch.randn(1, k))
    center = loss_fn.center.clone()
    got = loss_fn(student, teacher, num_views, teacher_temp=0.05, student_temp=0.1, update_center=False)
    want = reference_loss(student, teacher, center, num_views, 0.05, 0.1)
    torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-6, atol=1e-6)
    assert torch.equal(loss_fn.center, center)  # update_center=False leaves it alone


def test_loss_uses_the_old_centre_then_updates_it_by_the_formula():
    torch.manual_seed(0)
    k, batch, m = 12, 4, 0.9
    loss_fn = DINOLoss(k, center_momentum=m)
    old = torch.randn(1, k)
    loss_fn.center.copy_(old)
    student, teacher = torch.randn(4 * batch, k), torch.randn(2 * batch, k)
    got = loss_fn(student, teacher, 4, teacher_temp=0.04)
    want = reference_loss(student.double(), teacher.double(), old.double(), 4, 0.04, 0.1)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_fn.center, m * old + (1 - m) * teacher.mean(0, keepdim=True))


def test_centre_reduce_function_is_applied_to_the_batch_mean():
    k = 5
    loss_fn = DINOLoss(k, center_momentum=0.5)
    teacher = torch.randn(6, k)
    seen = []

    def fake_all_reduce(t):  # pretend another process saw a batch mean of 1s
        seen.append(t.clone())
        return (t + torch.ones_like(t)) / 2

    loss_fn.update_center(teacher, fake_all_reduce)
    torch.testing.assert_close(seen[0], teacher.mean(0, keepdim=True))
    torch.testing.assert_close(loss_fn.center, 0.5 * (teacher.mean(0, keepdim=True) + 1) / 2)


def test_student_gets_gradient_teacher_does_not():
    student = torch.randn(6, 8, requires_grad=True)
    teacher = torch.randn(4, 8, requires_grad=True)
    DINOLoss(8)(student, teacher, 3, teacher_temp=0.04).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_loss_is_computed_in_float32_under_autocast():
    torch.manual_seed(0)
    student, teacher = torch.randn(8, 32, dtype=torch.bfloat16), torch.randn(4, 32, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = DINOLoss(32)(student, teacher, 4, teacher_temp=0.04, update_center=False)
    want = reference_loss(student.double(), teacher.double(), torch.zeros(1, 32, dtype=torch.float64), 4, 0.04, 0.1)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_bad_shapes_and_temperatures_fail_clearly():
    loss_fn = DINOLoss(8)
    with pytest.raises(ValueError, match="student_output"):
        loss_fn(torch.randn(7, 8), torch.randn(4, 8), 3, teacher_temp=0.04)
    with pytest.raises(ValueError, match="teacher_output"):
        loss_fn(torch.randn(6, 8), torch.randn(4, 9), 3, teacher_temp=0.04)
    with pytest.raises(ValueError, match="temperatures"):
        loss_fn(torch.randn(6, 8), torch.randn(4, 8), 3, teacher_temp=0.0)
    with pytest.raises(ValueError, match="center_momentum"):
        DINOLoss(8, center_momentum=1.5)


def test_teacher_stats_match_the_definitions():
    torch.manual_seed(0)
    n, k, temp = 6, 10, 0.07
    logits, center = torch.randn(n, k, dtype=torch.float64), torch.randn(1, k, dtype=torch.float64)
    stats = teacher_stats(logits, center, temp)
    q = torch.softmax((logits - center) / temp, dim=-1)
    entropy = sum(-(q[i] * q[i].log()).sum() for i in range(n)) / n
    q_bar = q.mean(0)
    kl = sum((q[i] * (q[i].log() - q_bar.log())).sum() for i in range(n)) / n
    torch.testing.assert_close(stats["entropy"].double(), entropy, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["kl_to_centre"].double(), kl, rtol=1e-5, atol=1e-6)


def test_teacher_stats_detect_both_collapses():
    k = 16
    same = torch.randn(1, k).expand(8, k)  # every sample gives the same output
    uniform = teacher_stats(same, same[:1], 0.04)  # centring removes it entirely: uniform
    assert uniform["entropy"].item() == pytest.approx(math.log(k), abs=1e-5)
    assert uniform["kl_to_centre"].item() == pytest.approx(0.0, abs=1e-6)
    one_hot = teacher_stats(F.one_hot(torch.zeros(8, dtype=torch.long), k).float() * 100, torch.zeros(1, k), 0.04)
    assert one_hot["entropy"].item() == pytest.approx(0.0, abs=1e-5)
    assert one_hot["kl_to_centre"].item() == pytest.approx(0.0, abs=1e-6)
    spread = teacher_stats(F.one_hot(torch.arange(8), k).float() * 100, torch.zeros(1, k), 0.04)
    assert spread["kl_to_centre"].item() == pytest.approx(math.log(8), abs=1e-4)
