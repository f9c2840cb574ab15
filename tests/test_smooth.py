"""PGD with smooth ReLU gradients: it sees a loss that exact gradients cannot, and stays an honest attack.

The test model hides a trap behind a ReLU that is off at every clean image: the wrong class wins once the mean
pixel rises by 0.03, but the unit passes back no gradient until then, and the visible part of the loss steers
PGD along directions that leave the mean where it is.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from robustlab.attacks import negative_margin, pgd, pgd_smooth, smooth_relu_gradients, within_ball
from robustlab.errors import RobustlabError
from robustlab.evaluate.sanity import sanity_checks
from robustlab.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

EPS = 0.1


class Trap(nn.Module):
    """Two classes. z₀ = 10; z₁ = u·(x − ½) + k·relu(mean(x) − 0.53) with u = ±1 in equal numbers."""

    def __init__(self, k: float):
        super().__init__()
        self.u = nn.Parameter(torch.tensor([1.0, -1.0]).repeat(32))
        self.relu = nn.ReLU()
        self.k = k

    def forward(self, x):
        flat = x.flatten(1)
        z1 = (flat - 0.5) @ self.u + self.k * self.relu(flat.mean(1) - 0.53)
        return torch.stack([torch.full_like(z1, 10.0), z1], 1)


def _images(n=64):
    """Pixels in [0.3, 0.7] with every image's mean exactly ½, so the trap is 0.03 away for all."""
    x = 0.3 + 0.4 * torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    return x - x.mean((1, 2, 3), keepdim=True) + 0.5, torch.zeros(n, dtype=torch.long)


def _accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def test_smooth_gradients_find_what_exact_ones_cannot():
    model, (x, y) = Trap(k=400).train(), _images()
    assert _accuracy(model, x, y) == 1.0
    gen = torch.Generator().manual_seed(0)
    exact = pgd(model, x, y, eps=EPS, steps=100, step_size=EPS / 10, restarts=3, loss_fn=negative_margin, generator=gen)
    assert _accuracy(model, exact, y) == 1.0, "the trap should be invisible to exact gradients"
    smooth = pgd_smooth(model, x, y, eps=EPS, generator=gen)
    assert _accuracy(model, smooth, y) == 0.0
    assert within_ball(smooth, x, "linf", EPS)
    assert model.training and isinstance(model.relu, nn.ReLU)  # mode and modules back as they were
    assert model.u.grad is None and model.u.requires_grad


def test_without_a_trap_smooth_gradients_break_nothing_more():
    model, (x, y) = Trap(k=0).eval(), _images()
    assert _accuracy(model, pgd_smooth(model, x, y, eps=EPS), y) == 1.0


@pytest.mark.parametrize("name,relus", [("cnn-small", 3), ("preact-resnet18-small", 17)])
def test_swap_keeps_the_forward_pass_and_changes_only_the_backward(name, relus):
    """The attack must attack the model itself: same forward pass, other gradients, the model as it was after.
    The residual network has 2 ReLUs per block in 8 blocks and one after its final BatchNorm."""
    torch.manual_seed(0)
    model = build_model(name, (1, 28, 28), 10, mean=(0.5,), std=(0.25,)).eval()
    before = list(model.modules())
    x = torch.rand(4, 1, 28, 28)

    def logits_and_grad():
        xi = x.clone().requires_grad_(True)
        out = model(xi)
        (grad,) = torch.autograd.grad(out[:, 0].sum(), xi)
        return out.detach(), grad

    exact_out, exact_grad = logits_and_grad()
    assert sum(isinstance(m, nn.ReLU) for m in before) == relus
    with smooth_relu_gradients(model, 0.5):
        assert not any(isinstance(m, nn.ReLU) for m in model.modules())
        smooth_out, smooth_grad = logits_and_grad()
    assert torch.equal(exact_out, smooth_out)
    assert not torch.allclose(exact_grad, smooth_grad)
    assert list(model.modules()) == before
    assert torch.equal(logits_and_grad()[1], exact_grad)


def test_modules_come_back_after_an_error():
    model = Trap(k=1)
    with pytest.raises(ValueError), smooth_relu_gradients(model, 0.1):
        raise ValueError("inside")
    assert isinstance(model.relu, nn.ReLU)


def test_clear_errors():
    with pytest.raises(RobustlabError, match="no nn.ReLU modules"):
        pgd_smooth(nn.Sequential(nn.Flatten(), nn.Linear(64, 2)), *_images(4), eps=EPS)
    with pytest.raises(RobustlabError, match="tau must be > 0"):
        pgd_smooth(Trap(k=1), *_images(4), eps=EPS, tau=0)


def test_sanity_check_flags_the_trap_and_passes_without_it():
    x, y = _images()
    budget = dict(norm="linf", eps=EPS, steps=10, long_steps=20, restarts=2, black_box_queries=50)
    trapped = sanity_checks(Trap(k=400).eval(), x, y, **budget)["smooth_gradients"]
    assert not trapped.passed and trapped.values["only_black_box"] == 1.0, trapped.detail
    assert "smooth ReLU gradients" in trapped.detail
    honest = sanity_checks(Trap(k=0).eval(), x, y, **budget)["smooth_gradients"]
    assert honest.passed and honest.values["only_black_box"] == 0.0
    linear = sanity_checks(nn.Sequential(nn.Flatten(), nn.Linear(64, 2)).eval(), x, y, **budget)
    assert linear["smooth_gradients"].passed and "no nn.ReLU" in linear["smooth_gradients"].detail
    assert sanity_checks(Trap(k=400).eval(), x, y, smooth_tau=None, **budget)["smooth_gradients"].detail == \
        "not run: disabled"


def test_the_swapped_relu_passes_back_sigmoid_of_z_over_tau():
    """Small τ is close to the exact step and large τ smooths more; z·τ would turn that around."""
    from robustlab.attacks.smooth import SmoothGradReLU
    z = torch.tensor([-1.0, -0.05, 0.0, 0.05, 1.0], requires_grad=True)
    out = SmoothGradReLU(0.1)(z)
    (grad,) = torch.autograd.grad(out.sum(), z)
    assert torch.equal(out, z.detach().clamp_min(0))
    assert torch.allclose(grad, torch.sigmoid(z.detach() / 0.1))


def test_pgd_smooth_defaults_are_the_probes_budget(monkeypatch):
    """100 steps of ε/10 on the margin loss: the budget docs/results.md reports the masking probe with."""
    import robustlab.attacks.smooth as smooth
    seen = {}

    def spy(model, x, y, **kwargs):
        seen.update(kwargs)
        return x
    monkeypatch.setattr(smooth, "pgd", spy)
    pgd_smooth(Trap(k=1), *_images(2), eps=EPS)
    assert (seen["steps"], seen["step_size"], seen["restarts"]) == (100, EPS / 10, 1)
    assert seen["loss_fn"] is negative_margin
