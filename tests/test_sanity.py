"""Gradient-masking sanity checks: an honest model passes; deliberately masked models are flagged.

The full battery runs on a small MLP trained here in a few seconds (the checks run hundreds of attack steps,
which the CNN fixtures would make too slow for the test budget); the gradient checks also run on the CNN.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustlab.attacks import pgd, within_ball
from robustlab.errors import RobustlabError
from robustlab.evaluate.sanity import (Check, check_autoattack_square, check_black_box, check_convergence,
                                       check_deterministic, check_eps_monotonic, check_gradients, check_large_eps,
                                       random_search, sanity_checks, skipped, to_markdown, verdict)

pytestmark = pytest.mark.usefixtures("one_thread")


EPS = 0.1
BUDGET = dict(steps=10, long_steps=40, restarts=3, black_box_queries=300)  # small, to keep the tests quick


class Quantized(nn.Module):
    """Input quantization x → round(k·x)/k: torch.round has zero gradient, so PGD gets no signal."""

    def __init__(self, model, levels=16):
        super().__init__()
        self.model, self.levels = model, levels

    def forward(self, x):
        return self.model(torch.round(x * self.levels) / self.levels)


class Saturated(nn.Module):
    """Logits × 10⁴: the softmax saturates, so cross-entropy gradients underflow to exactly zero."""

    def __init__(self, model, temperature=1e4):
        super().__init__()
        self.model, self.temperature = model, temperature

    def forward(self, x):
        return self.model(x) * self.temperature


class Noisy(nn.Module):
    """A randomized defence: Gaussian noise on the input at every call."""

    def __init__(self, model, sigma=0.1):
        super().__init__()
        self.model, self.sigma = model, sigma

    def forward(self, x):
        return self.model(x + self.sigma * torch.randn_like(x))


@pytest.fixture(scope="module")
def mlp(fmnist):
    """784-128-10 MLP, 6 epochs of Adam on 5,000 training images (~85% test accuracy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
    x, y = fmnist.train.subset(5000).as_float(), fmnist.train.labels[:5000]
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    for _ in range(6):
        for idx in torch.randperm(len(x)).split(100):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    torch.set_num_threads(threads)
    return model.eval()


@pytest.fixture(scope="module")
def eval_set(fmnist):
    return fmnist.test.subset(200).as_float(), fmnist.test.labels[:200]


def _acc(model, x, y, attack=None, **kwargs):
    if attack is not None:
        x = attack(model, x, y, generator=torch.Generator().manual_seed(0), **kwargs)
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def test_honest_model_is_trustworthy(mlp, eval_set):
    report = sanity_checks(mlp, *eval_set, norm="linf", eps=EPS, **BUDGET)
    assert report.trustworthy, report.to_markdown()
    assert report.verdict == "trustworthy"
    assert [c.name for c in report.checks] == ["deterministic", "gradients", "eps_monotonic", "large_eps",
                                               "single_step", "convergence", "black_box", "smooth_gradients"]
    assert all(isinstance(c.detail, str) and "\n" not in c.detail for c in report.checks)
    assert report["large_eps"].values["accuracy"] <= 0.05


@pytest.mark.parametrize("wrapper", [Quantized, Saturated])
def test_masked_model_is_flagged_and_black_box_still_breaks_it(mlp, eval_set, wrapper):
    x, y = eval_set
    masked = wrapper(mlp).eval()
    pgd_plain = _acc(mlp, x, y, pgd, eps=EPS, steps=10)
    pgd_masked = _acc(masked, x, y, pgd, eps=EPS, steps=10)
    black_masked = _acc(masked, x, y, random_search, eps=EPS, queries=300)
    assert pgd_masked > pgd_plain + 0.4, "PGD should overestimate the masked model's robustness"
    assert black_masked < pgd_masked - 0.15, "a gradient-free attack should see through the masking"

    report = sanity_checks(masked, x, y, norm="linf", eps=EPS, **BUDGET)
    assert not report.trustworthy and report.verdict.startswith("suspicious: ")
    assert not report["gradients"].passed and "zero" in report["gradients"].detail
    assert not report["black_box"].passed
    assert "gradients" in report.verdict and "black_box" in report.verdict
    assert report["deterministic"].passed
    assert "**FAIL**" in report.to_markdown()


def test_black_box_check_fails_when_it_alone_breaks_two_percent(mlp, eval_set):
    """Images that only the black-box attack breaks are real adversarial examples: 2% of them is masking, which the
    old 3% tolerance let pass (as it did two masked residual networks at 2.0% and 1.5%)."""
    x, y = eval_set
    with torch.no_grad():
        predicted = mlp(x).argmax(1)
    count = math.ceil(0.02 * len(y))

    def breaks_a_few(model, xb, yb, eps, generator=None):  # a stand-in: another image the model calls another class
        out = xb.clone()
        for i in range(min(count, len(xb))):
            out[i] = x[(predicted != yb[i]).nonzero()[0, 0]]
        return out
    budget = {k: v for k, v in BUDGET.items() if k != "black_box_queries"}
    report = sanity_checks(mlp, x, y, norm="linf", eps=EPS, black_box={"two-percent": breaks_a_few}, **budget)
    check = report["black_box"]
    assert not check.passed and check.values["only_black_box"] == pytest.approx(count / len(y))
    assert "two-percent broke" in check.detail and report["eps_monotonic"].passed


def test_eps_monotonic_never_says_falls_when_nothing_falls():
    flat = check_eps_monotonic([0, 0.05, 0.1], [0.8, 0.8, 0.8], tolerance=0.02)
    assert flat.passed and "falls" not in flat.detail and "lowers nothing" in flat.detail


def test_randomized_model_is_flagged(mlp, eval_set):
    x, y = eval_set
    noisy = Noisy(mlp).eval()
    check = check_deterministic(noisy, x)
    assert not check.passed and "EOT" in check.detail
    assert check_deterministic(mlp, x).passed
    gradients = check_gradients(noisy, x, y, norm="linf", eps=EPS)
    assert gradients.values["repeat_cosine"] < 0.99 and not gradients.passed


def test_gradient_checks_pass_on_the_cnn(standard_model, test_batch):
    x, y = test_batch
    check = check_gradients(standard_model, x, y, norm="linf", eps=EPS)
    assert check.passed, check.detail
    assert check.values["nearby_cosine"] > 0.5 and check.values["zero_fraction"] == 0
    assert check_deterministic(standard_model, x).passed
    nan_model = Saturated(standard_model, temperature=float("nan"))
    assert "NaN" in check_gradients(nan_model, x[:20], y[:20], norm="linf", eps=EPS).detail


def test_comparison_checks_on_known_numbers():
    assert check_eps_monotonic([0, 0.05, 0.1], [0.9, 0.5, 0.3], tolerance=0.02).passed
    rising = check_eps_monotonic([0, 0.05, 0.1], [0.9, 0.5, 0.6], tolerance=0.02)
    assert not rising.passed and "rises" in rising.detail
    assert check_eps_monotonic([0, 0.05, 0.1], [0.9, 0.5, 0.51], tolerance=0.02).passed  # within the noise
    assert not check_large_eps(0.8, 0.3, max_accuracy=0.05).passed
    assert not check_convergence(0.5, 0.4, 0.49, steps=20, long_steps=200, restarts=5, tolerance=0.03).passed
    assert check_convergence(0.5, 0.49, 0.48, steps=20, long_steps=200, restarts=5, tolerance=0.03).passed
    white = torch.tensor([True] * 50 + [False] * 50)
    black = white.clone()
    black[:10] = False  # the black-box attack broke 10% that the white-box attacks did not
    assert not check_black_box(white, black, tolerance=0.03).passed
    assert check_black_box(white, white, tolerance=0.03).passed


def test_autoattack_square_check_counts_what_only_square_broke():
    from robustlab.attacks.autoattack import ROBUST, STAGES
    square = STAGES.index("square")
    # 100 images: 10 misclassified, 10 broken by APGD-CE, 78 robust, 2 broken by Square only (2%)
    broken_by = torch.tensor([0] * 10 + [1] * 10 + [ROBUST] * 78 + [square] * 2, dtype=torch.int8)
    check = check_autoattack_square(broken_by)
    assert check.name == "autoattack_square" and not check.passed
    assert check.values["white_box"] == pytest.approx(0.80) and check.values["only_black_box"] == pytest.approx(0.02)
    assert "100 images" in check.detail and "masked" in check.detail
    broken_by[-1] = ROBUST  # one image in 100: at the tolerance, passes
    assert check_autoattack_square(broken_by).passed


class NoisyConfident(nn.Module):
    """Logits × 10, inputs noised by `sigma`: many input gradients of 1e-20 and less, random when sigma > 0."""

    def __init__(self, model, sigma):
        super().__init__()
        self.model, self.sigma = model, sigma

    def forward(self, x):
        return 10 * self.model(x + self.sigma * torch.randn_like(x))


def test_tiny_gradients_give_true_cosines(mlp, eval_set):
    """float32 cosines of gradients of 1e-20 came out at 1e14: their mean passed a randomized model."""
    torch.manual_seed(0)
    same = check_gradients(NoisyConfident(mlp, 0.0), *eval_set, norm="linf", eps=EPS)
    assert same.passed and same.values["repeat_cosine"] == pytest.approx(1.0, abs=1e-6)
    noisy = check_gradients(NoisyConfident(mlp, 0.05), *eval_set, norm="linf", eps=EPS)
    assert not noisy.passed and "repeated calls give different gradients" in noisy.detail
    assert 0 < noisy.values["repeat_cosine"] < 0.99


class FunctionalReLU(nn.Module):
    """The MLP with its ReLU called as a function: nothing for the smooth-gradient check to replace."""

    def __init__(self, mlp):
        super().__init__()
        self.hidden, self.out = mlp[1], mlp[3]

    def forward(self, x):
        return self.out(torch.relu(self.hidden(x.flatten(1))))


def test_a_check_that_cannot_run_is_said_skipped_not_passed(mlp, eval_set):
    report = sanity_checks(FunctionalReLU(mlp), *eval_set, norm="linf", eps=EPS, **BUDGET)
    assert not report["smooth_gradients"].ran and "no nn.ReLU modules" in report["smooth_gradients"].detail
    assert report.verdict == "trustworthy (smooth_gradients not run)"
    assert "| skipped | not run: the model has no nn.ReLU modules" in report.to_markdown()
    assert all(c.ran for c in report.checks if c.name != "smooth_gradients")


def test_verdict_and_markdown():
    checks = [Check("gradients", False, "all zero", {}), Check("deterministic", True, "same logits", {})]
    assert verdict(checks) == "suspicious: gradients"
    assert verdict(checks[1:]) == "trustworthy"
    with_skipped = [*checks, skipped("smooth_gradients", "disabled")]
    assert verdict(with_skipped) == "suspicious: gradients (smooth_gradients not run)"
    table = to_markdown(checks)
    assert table.startswith("| check | result | detail |") and "**FAIL**" in table and "suspicious" in table


class NoBackward(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("no gradients here")
        return self.model(x)


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 1.5)])
def test_random_search_needs_no_gradients_and_stays_in_the_ball(mlp, eval_set, norm, eps):
    x, y = eval_set[0][:64], eval_set[1][:64]
    model = NoBackward(mlp)
    adv = random_search(model, x, y, eps=eps, norm=norm, queries=100,
                        generator=torch.Generator().manual_seed(0))
    assert within_ball(adv, x, norm, eps, tol=1e-5)
    assert _acc(mlp, adv, y) < _acc(mlp, x, y) - 0.1


def test_random_search_fits_its_window_into_images_taller_than_wide():
    """The window's side was capped by the height alone: on 40×12 images it outgrew the width (a traceback)."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(40 * 12, 10))
    x = torch.rand(8, 1, 40, 12, generator=torch.Generator().manual_seed(0))
    y = model(x).argmax(1)
    adv = random_search(model, x, y, eps=0.1, norm="linf", queries=200, generator=torch.Generator().manual_seed(0))
    assert within_ball(adv, x, "linf", 0.1, tol=1e-6)


def test_sanity_checks_refuse_what_attacks_refuse_in_one_line(mlp, eval_set):
    x, y = eval_set[0][:8], eval_set[1][:8]
    for images, labels, batch_size, words in (((x * 255).to(torch.uint8), y, 8, "divide by 255"),
                                              (x, y.to(torch.float32), 8, "integer label"),
                                              (x, y, 0, "batch_size")):
        with pytest.raises(RobustlabError, match=words):
            sanity_checks(mlp, images, labels, norm="linf", eps=0.1, batch_size=batch_size, progress=False)
    int32 = sanity_checks(mlp, x, y.to(torch.int32), norm="linf", eps=0.1, steps=2, long_steps=3, restarts=1,
                          black_box_queries=5, smooth_tau=None, progress=False)  # int32 labels: once a traceback
    assert len(int32.checks) == 8


def test_the_standard_suite_runs_the_sanity_checks_with_its_attack_scaled_to_each_eps(robust_model, fmnist, tmp_path):
    """The suite's attack has its step fixed for ε; the checks at 8ε and at other ε must get the same attack with the
    step scaled (the evaluation's `attack_at`), not the step of ε, with which PGD at 8ε cannot reach beyond 2.5ε."""
    from functools import partial

    from robustlab.evaluate.sanity import default_large_eps
    from robustlab.evaluate.suite import run_suite
    asked = []

    def attack_at(e):
        asked.append(round(e, 6))
        return partial(pgd, eps=e, norm="linf", steps=3, step_size=2.5 * e / 3)
    run_suite(robust_model, fmnist.test.subset(20), fmnist.info, norm="linf", eps=0.1, attack_at=attack_at,
              pgd_label="PGD-3", out_dir=tmp_path, aa_steps=2, aa_queries=10, sanity_n=20, ood=False, show=False)
    assert {round(default_large_eps("linf", 0.1), 6), 0.05, 0.2} <= set(asked)


def test_single_step_check_fails_when_one_step_beats_the_iterative_attack():
    from robustlab.evaluate.sanity import check_single_step
    lost = check_single_step(0.30, 0.45, tolerance=0.03)  # FGSM leaves 30%, PGD 45%: PGD got lost
    assert not lost.passed and "gets lost" in lost.detail
    assert check_single_step(0.60, 0.45, tolerance=0.03).passed
    assert check_single_step(0.43, 0.45, tolerance=0.03).passed  # within the noise
    assert check_large_eps(1.0, 0.04, max_accuracy=0.05).passed


def test_large_eps_fails_when_a_fifth_survives_the_unbounded_attack():
    """At 8ε, and never below half the pixel range in L∞, every image can be made another class: an attack that still
    leaves a fifth of them correct there cannot use the model's gradients. At ε = 0.02, 8ε = 0.16 would be a radius
    at which an honest model may keep accuracy, so the check must attack at 0.5."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2)).eval()
    with torch.no_grad():  # class 1 where pixel (0, 0) is above 0.5
        model[1].weight.zero_()
        model[1].weight[:, 0] = torch.tensor([-1.0, 1.0])
        model[1].bias.copy_(torch.tensor([0.5, -0.5]))
    x = torch.rand(40, 1, 4, 4)
    x[:, 0, 3, 3] = (torch.arange(40) < 8).float()  # the 8 images the stand-in attack leaves alone
    with torch.no_grad():
        y = model(x).argmax(1)
    other = {c: x[(y != c).nonzero()[0, 0]] for c in (0, 1)}  # an image the model calls another class
    radii = []

    def spares_the_marked(model_, xb, yb, eps, generator=None):
        radii.append(eps)
        out = xb.clone()
        for i in (xb[:, 0, 3, 3] < 0.5).nonzero().squeeze(1).tolist():
            out[i] = other[int(yb[i])]
        return out
    report = sanity_checks(model, x, y, norm="linf", eps=0.02, attacks={"stand-in": spares_the_marked},
                           black_box={"stand-in": spares_the_marked}, steps=2, long_steps=3, restarts=1,
                           smooth_tau=None, progress=False)
    check = report["large_eps"]
    assert max(radii) == check.values["eps"] == 0.5
    assert check.values["accuracy"] == pytest.approx(0.2) and not check.passed
    assert "large_eps" in report.verdict


class PartlyConstant(nn.Module):
    """A linear model whose output ignores the input wherever pixel (0, 0) is bright: there its gradients are exactly
    zero, as behind a non-differentiable step or a saturated softmax."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(16, 3)

    def forward(self, x):
        logits = self.linear(x.flatten(1))
        return torch.where((x[:, 0, 0, 0] > 0.5)[:, None], logits.detach(), logits)


def test_gradient_check_fails_when_a_quarter_of_the_gradients_are_zero():
    """An attack gets no signal on a quarter of the images: their robustness is the masking's, not the model's."""
    torch.manual_seed(0)
    x = torch.rand(40, 1, 4, 4)
    x[:, 0, 0, 0] = (torch.arange(40) < 10).float()
    y = torch.randint(0, 3, (40,))
    check = check_gradients(PartlyConstant().eval(), x, y, norm="linf", eps=0.1)
    assert check.values["zero_fraction"] == pytest.approx(0.25) and check.values["nan_fraction"] == 0
    assert not check.passed and "25.0% of gradients are exactly zero" in check.detail


def test_single_step_beating_iterative_by_more_than_the_tolerance_fails():
    """Five points below the iterative attack is beyond a 3-point tolerance: the iterative attack lost its way."""
    from robustlab.evaluate.sanity import check_single_step
    assert not check_single_step(0.40, 0.45, tolerance=0.03).passed


class Shattered(nn.Module):
    """sin(50π·x) before a linear layer: the same gradient at every call, but one a quarter period away, unrelated,
    at a point ε/10 = 0.01 off (Athalye et al.'s shattered gradients)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(64, 3)

    def forward(self, x):
        return self.linear(torch.sin(50 * math.pi * x).flatten(1))


def test_gradient_check_fails_on_shattered_gradients():
    torch.manual_seed(0)
    x, y = torch.rand(40, 1, 8, 8), torch.randint(0, 3, (40,))
    check = check_gradients(Shattered().eval(), x, y, norm="linf", eps=0.1)
    assert check.values["repeat_cosine"] == pytest.approx(1.0) and check.values["nearby_cosine"] < 0.2
    assert not check.passed and "gradients at points ε/10 apart are unrelated" in check.detail
