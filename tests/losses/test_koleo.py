"""The KoLeo loss: its value on known point sets, its gradient's direction, and bad input."""
import math

import pytest
import torch

from ssl_vit.losses.koleo import koleo_loss


def test_value_is_minus_the_mean_log_nearest_neighbour_distance():
    # orthonormal rows: every nearest neighbour at sqrt(2); scaling a row changes nothing (normalised)
    x = torch.eye(4) * torch.tensor([[1.0], [3.0], [0.5], [2.0]])
    assert koleo_loss(x).item() == pytest.approx(-math.log(math.sqrt(2)), abs=1e-6)
    # two close rows and one far: distances 2 sin(a/2) to the nearest, per row
    a = 0.1
    pts = torch.tensor([[1.0, 0.0], [math.cos(a), math.sin(a)], [-1.0, 0.0]])
    near, far = 2 * math.sin(a / 2), 2 * math.sin((math.pi - a) / 2)
    want = -(math.log(near) * 2 + math.log(min(far, 2.0))) / 3
    assert koleo_loss(pts).item() == pytest.approx(want, abs=1e-5)


def test_gradient_pushes_the_closest_rows_apart_and_identical_rows_stay_finite():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.05], [0.0, 1.0], [-1.0, 0.0]], requires_grad=True)
    koleo_loss(x).backward()
    step = x - 0.1 * x.grad
    before = torch.nn.functional.normalize(x.detach(), dim=-1)
    after = torch.nn.functional.normalize(step.detach(), dim=-1)
    assert (after[0] - after[1]).norm() > (before[0] - before[1]).norm()
    same = torch.ones(3, 4, requires_grad=True)
    loss = koleo_loss(same)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(same.grad).all()


def test_bad_input_names_the_shape():
    with pytest.raises(ValueError, match=r"N >= 2 rows, got shape \(1, 8\)"):
        koleo_loss(torch.randn(1, 8))
    with pytest.raises(ValueError, match="got shape"):
        koleo_loss(torch.randn(8))
