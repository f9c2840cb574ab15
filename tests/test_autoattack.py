"""APGD, FAB-T, Square and the AutoAttack-standard ensemble: budgets, strength, and the details that
the papers fix (step-size checkpoints, exact projections, minimal perturbations, resumable state)."""
from __future__ import annotations

import copy
import importlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linprog, minimize
from torch import nn

from robustlab.attacks import pgd, within_ball
from robustlab.attacks.apgd import apgd, apgd_run, apgd_targeted, dlr_loss, dlr_targeted_loss, step_size_checkpoints
from robustlab.attacks.autoattack import STAGES, autoattack, autoattack_accuracy, load_finished_state
from robustlab.attacks.fab import fab_run, fab_targeted, project_on_hyperplane_box
from robustlab.attacks.pgd import attack_mode, perturb
from robustlab.attacks.square import margin, p_schedule, square
from robustlab.attacks.threat import make_threat
from robustlab.errors import RobustlabError
from test_attacks import Recorder  # a model that keeps every input it is queried on

EPS = {"linf": 0.1, "l2": 1.5}


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


# ---- budgets: outputs and every query inside the ε-ball and [0, 1] ----

def _small_attacks(norm):
    eps = EPS[norm]
    return {
        "apgd-ce": lambda m, x, y, g: apgd(m, x, y, eps=eps, norm=norm, steps=8, generator=g),
        "apgd-dlr": lambda m, x, y, g: apgd(m, x, y, eps=eps, norm=norm, steps=8, loss="dlr", restarts=2, generator=g),
        "apgd-t": lambda m, x, y, g: apgd_targeted(m, x, y, eps=eps, norm=norm, steps=6, n_target_classes=2, generator=g),
        "fab-t": lambda m, x, y, g: fab_targeted(m, x, y, eps=eps, norm=norm, steps=6, n_target_classes=2, restarts=2,
                                                 generator=g),
        "square": lambda m, x, y, g: square(m, x, y, eps=eps, norm=norm, queries=40, generator=g),
    }


def _tiny_net(classes=6, seed=0):
    """A small smooth classifier of 1×3×4 images: fast enough to run whole attacks in a test."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, classes)).eval()


def _interior_images(n, seed=0, shape=(1, 3, 4)):
    """Pixels in [0.2, 0.8]: small perturbations never meet the box, so distances come out exact."""
    return 0.2 + 0.6 * torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed))


class QueryGuard(nn.Module):
    """Fails if the model is ever queried outside [0, 1] or outside the ε-ball around `center`.

    eps=None checks the box only: FAB is a minimal-norm attack whose iterates search beyond ε for the
    boundary and are pulled back (as in the paper and AutoAttack); only its outputs must lie within ε.
    """

    def __init__(self, model, center, norm, eps):
        super().__init__()
        self.model, self.center, self.norm, self.eps = model, center, norm, eps
        self.queries = 0

    def forward(self, x):
        self.queries += 1
        assert within_ball(x.detach(), self.center.expand_as(x), self.norm, self.eps if self.eps else 1e9), \
            "query left the ε-ball or [0, 1]"
        return self.model(x)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_attacks_stay_inside_ball_and_box(robust_model, test_batch, norm):
    x, y = test_batch[0][:8], test_batch[1][:8]
    for name, attack in _small_attacks(norm).items():
        x_adv = attack(robust_model, x, y, torch.Generator().manual_seed(0))
        assert x_adv.shape == x.shape and within_ball(x_adv, x, norm, EPS[norm]), name
        # Every query: copies of one image, so each row the model sees must lie near that image.
        guard = QueryGuard(robust_model, x[3:4], norm, None if name == "fab-t" else EPS[norm])
        attack(guard, x[3:4].repeat(3, 1, 1, 1), y[3:4].repeat(3), torch.Generator().manual_seed(1))
        assert guard.queries > 1, name


def test_attacks_leave_model_mode_and_parameter_gradients_alone(robust_model, test_batch):
    x, y = test_batch[0][:4], test_batch[1][:4]
    params = list(robust_model.parameters())
    before = [(p.requires_grad, None if p.grad is None else p.grad.clone()) for p in params]
    robust_model.train()
    try:
        for name, attack in _small_attacks("linf").items():
            attack(robust_model, x, y, None)
            assert robust_model.training, name
            for p, (requires_grad, grad) in zip(params, before):
                assert p.requires_grad == requires_grad, name
                assert (p.grad is None) if grad is None else torch.equal(p.grad, grad), name
    finally:
        robust_model.eval()


def test_bad_arguments_raise_one_line_errors(robust_model, test_batch):
    x, y = test_batch[0][:2], test_batch[1][:2]
    for call in (lambda: apgd(robust_model, x, y, eps=0.1, norm="l1"),
                 lambda: apgd(robust_model, x, y, eps=-1.0),
                 lambda: apgd(robust_model, x, y, eps=0.1, loss="hinge"),
                 lambda: apgd(robust_model, x, y, eps=0.1, target_class_rank=3),
                 lambda: apgd(robust_model, x, y, eps=0.1, loss="dlr-targeted", target_class_rank=1),
                 lambda: fab_targeted(robust_model, x, y, eps=0.1, n_target_classes=0),
                 lambda: square(robust_model, x, y, eps=0.1, p_init=1.5),
                 lambda: autoattack(robust_model, x * 255, y, eps=0.1)):
        with pytest.raises(RobustlabError) as err:
            call()
        assert "\n" not in str(err.value)


def test_autoattack_refuses_a_model_with_fewer_than_four_classes_before_any_stage(tmp_path):
    """APGD-T's targeted DLR loss needs 4 classes: the refusal came at that stage, after the clean and APGD-CE work."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x, y = torch.rand(2, 1, 2, 2), torch.tensor([0, 2], dtype=torch.int32)
    with pytest.raises(RobustlabError, match="needs at least 4 classes; the model has 3"):
        autoattack(model, x, y, eps=0.1, progress=False, state_path=tmp_path / "state.safetensors")
    assert not (tmp_path / "state.safetensors").exists()


# ---- APGD ----

def _checkpoints_by_hand(steps):
    """The published recursion in whole hundredths: p_0 = 0, p_1 = 22, p_{j+1} = p_j + max(p_j − p_{j−1} − 3, 6)."""
    p_prev, p, out = 0, 22, []
    while -(-p * steps // 100) <= steps:
        w = -(-p * steps // 100)  # ⌈p·N/100⌉
        if not out or w > out[-1]:
            out.append(w)
        p_prev, p = p, p + max(p - p_prev - 3, 6)
    return out


def test_apgd_checkpoints_follow_published_formula():
    assert step_size_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    for steps in (1, 5, 10, 37, 50, 100, 250, 1000):
        assert step_size_checkpoints(steps) == _checkpoints_by_hand(steps)


def _reference_apgd(model, loss_fn, x0, x, y, t, eps, norm, steps, rho=0.75):
    """Algorithm 1 written out for a single example, straight from the paper, in float64.

    Returns ("fooled", first misclassified iterate) or ("robust", x_max, f_max).
    """
    def proj(v):
        if norm == "linf":
            v = torch.min(torch.max(v, x - eps), x + eps)
        else:
            delta = v - x
            n = delta.norm()
            v = x + (delta if n <= eps else delta * eps / n)
        return v.clamp(0, 1)

    def evaluate(v):
        v = v.detach().requires_grad_(True)
        logits = model(v[None])
        f = loss_fn(logits, y[None], t[None])[0]
        (g,) = torch.autograd.grad(f, v)
        return f.item(), g, logits.argmax(1).item() != y.item()

    def direction(g):
        return g.sign() if norm == "linf" else g / (g.norm() + 1e-12)

    checkpoints = _checkpoints_by_hand(steps)
    f0, g, wrong = evaluate(x0)
    if wrong:
        return ("fooled", x0)
    eta = 2 * eps
    prev = cur = x0
    f_cur = f0
    x_max, f_max, g_max = x0, f0, g
    w_last, f_max_at_w_last, eta_at_w_last, increases = 0, f0, eta, 0
    for k in range(1, steps + 1):
        a = 1.0 if k == 1 else 0.75
        z = proj(cur + eta * direction(g))
        new = proj(cur + a * (z - cur) + (1 - a) * (cur - prev))
        f_new, g, wrong = evaluate(new)
        if wrong:
            return ("fooled", new)
        increases += f_new > f_cur
        prev, cur, f_cur = cur, new, f_new
        if f_new > f_max:
            x_max, f_max, g_max = new, f_new, g
        if k in checkpoints:
            condition1 = increases < rho * (k - w_last)
            condition2 = eta_at_w_last == eta and f_max_at_w_last == f_max
            eta_at_w_last = eta
            if condition1 or condition2:
                eta = eta / 2
                cur, f_cur, g = x_max, f_max, g_max
            w_last, f_max_at_w_last, increases = k, f_max, 0
    return ("robust", x_max, f_max)


@pytest.mark.parametrize("norm,loss", [("linf", "ce"), ("l2", "ce"), ("linf", "dlr-targeted")])
def test_apgd_matches_independent_rederivation(norm, loss):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 6)).double().eval()
    x = torch.rand(16, 1, 3, 4, dtype=torch.float64)
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(1)  # all correctly classified at the start
    t = logits.argsort(1, descending=True)[:, 1]
    eps = {"linf": 0.08, "l2": 0.25}[norm]
    x0 = (x + eps * (2 * torch.rand_like(x) - 1) * (1 if norm == "linf" else 0.4)).clamp(0, 1)
    if loss == "ce":
        def loss_fn(lg, yy, tt):
            return F.cross_entropy(lg, yy, reduction="none")
    else:
        loss_fn = dlr_targeted_loss
    run = apgd_run(model, x, y, t, loss=loss, eps=eps, norm=norm, steps=30, x_init=x0)
    outcomes = set()
    for i in range(len(x)):
        ref = _reference_apgd(model, loss_fn, x0[i], x[i], y[i], t[i], eps, norm, steps=30)
        outcomes.add(ref[0])
        assert bool(run.fooled[i]) == (ref[0] == "fooled"), i
        torch.testing.assert_close(run.x_adv[i], ref[1], atol=1e-6, rtol=0)  # ulps, amplified over 30 steps
        if ref[0] == "robust":
            assert run.loss[i].item() == pytest.approx(ref[2], rel=1e-5, abs=1e-6)
    assert outcomes == {"fooled", "robust"}  # both paths exercised


class ScriptedLoss(nn.Module):
    """Two classes, class 0 always winning, with the cross-entropy of its k-th call set by a script: forward values
    are the script's, the input gradient at call k a fixed random direction. Records every query."""

    def __init__(self, losses, d):
        super().__init__()
        self.logit = [-np.log(np.expm1(loss)) for loss in losses]  # log(1 + e^{-a}) = loss
        self.directions = torch.randn(len(losses), d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        self.seen = []

    def forward(self, x):
        k = len(self.seen)
        self.seen.append(x.detach().clone())
        a = self.logit[k] + ((x - x.detach()).flatten(1) * self.directions[k]).sum(1)
        return torch.stack([a, torch.zeros_like(a)], 1)


def _checkpoint_script():
    """Losses (1 + v)·10⁻³ of x^(0) .. x^(100), windows ending at the checkpoints 22, 41, 57, 70 of a 100-step run."""
    script = [10.0] + [0.0] * 22  # w1: no rise → halve (Condition 1), restart from x^(0)
    script += [1 + 0.1 * j for j in range(19)]  # w2: 18 rises of 19, all below f_max; halved at w1, so keep η
    script += [20.0] + [20.1 + 0.1 * j for j in range(11)] + [19.0, 18.0, 17.0, 16.0]  # w3: 12 of 16 = ρ·k: keep η
    script += [30.0] + [30.0] * 12  # w4: one rise, then ties that are no rise → halve
    return [(1 + v) * 1e-3 for v in script + [0.0] * (101 - len(script))]


def test_apgd_step_size_rule_follows_the_paper_on_a_scripted_loss():
    """Croce & Hein's Conditions at each checkpoint: halve if the loss rose in fewer than ρ·k of the k steps (strictly:
    ties are no rise, and exactly ρ·k rises keep η), or if η was not halved at the last checkpoint and f_max has not
    improved since. A scripted loss makes each branch decide; smooth models almost never reach them."""
    x = _interior_images(1).double()
    x0 = (x + 0.05).clamp(0, 1)
    runs = []
    for apgd_side in (True, False):
        model = ScriptedLoss(_checkpoint_script(), x[0].numel())
        y = torch.zeros(1, dtype=torch.long)
        if apgd_side:
            run = apgd_run(model, x, y, y, loss="ce", eps=0.3, norm="l2", steps=100, x_init=x0)
            assert not run.fooled.any()
        else:
            def ce(lg, yy, tt):
                return F.cross_entropy(lg, yy, reduction="none")
            _reference_apgd(model, ce, x0[0], x[0], y[0], y[0], 0.3, "l2", steps=100)
        runs.append(torch.cat(model.seen))
    assert len(runs[0]) == len(runs[1]) == 101
    torch.testing.assert_close(runs[0], runs[1], atol=1e-9, rtol=0)


def test_apgd_ce_climbs_higher_than_pgd20_and_with_dlr_breaks_all_it_breaks(robust_model, test_batch):
    """APGD's claim (Croce & Hein 2020, Fig. 2) is a higher loss than PGD's on the same loss. A higher cross-entropy
    need not flip the argmax, which is why AutoAttack adds the DLR loss: on the fixture model as an AMD Zen 5 CPU
    trains it (fp32; Intel's kernels give another model), PGD-20 breaks one image at a near-tie (logits 4.05 against
    4.05) that APGD-CE climbs past without crossing, so APGD-CE alone can break one image fewer than PGD-20; with
    APGD-DLR it breaks all of them."""
    x, y = test_batch[0][:200], test_batch[1][:200]
    g, step = torch.Generator().manual_seed(0), 2.5 * 0.1 / 20  # pgd()'s default step for 20 steps
    x_pgd = pgd(robust_model, x, y, eps=0.1, steps=20, step_size=step, generator=g)  # first breaking iterate, else last
    with attack_mode(robust_model):
        x_last = perturb(robust_model, x, y, make_threat("linf", 0.1, step), 20, generator=g)
        ce = apgd_run(robust_model, x, y, y, loss="ce", eps=0.1, norm="linf", steps=50, generator=g)
        dlr = apgd_run(robust_model, x, y, y, loss="dlr", eps=0.1, norm="linf", steps=50, generator=g)
        with torch.no_grad():
            last_logits = robust_model(x_last)
            pgd_broken = robust_model(x_pgd).argmax(1) != y
            clean_errors = (robust_model(x).argmax(1) != y).sum()
    both_correct = ~ce.fooled & (last_logits.argmax(1) == y)
    assert both_correct.sum() >= 50
    assert ce.loss[both_correct].mean() > F.cross_entropy(last_logits, y, reduction="none")[both_correct].mean()
    assert not (pgd_broken & ~ce.fooled & ~dlr.fooled).any()
    assert clean_errors < pgd_broken.sum() < len(x)


def test_dlr_losses_use_the_published_denominators():
    """Sec. 4: DLR divides by z_π1 − z_π3 and targeted DLR by z_π1 − (z_π3 + z_π4)/2; other order statistics give
    another loss, and the rederivation above takes the targeted one from robustlab itself."""
    logits = torch.tensor([[5.0, 3.0, 2.0, 0.0, -1.0]])
    assert dlr_loss(logits, torch.tensor([0])).item() == pytest.approx(-(5 - 3) / (5 - 2))
    assert dlr_loss(logits, torch.tensor([2])).item() == pytest.approx(-(2 - 5) / (5 - 2))
    assert dlr_targeted_loss(logits, torch.tensor([0]), torch.tensor([3])).item() == pytest.approx(-(5 - 0) / (5 - 1))
    assert dlr_targeted_loss(logits, torch.tensor([1]), torch.tensor([0])).item() == pytest.approx(-(3 - 5) / (5 - 1))


def _spy_on(monkeypatch, module_name, function_name):
    """Replace module.function with a pass-through that keeps each call's arguments and result."""
    module = importlib.import_module(module_name)
    real, calls = getattr(module, function_name), []

    def spy(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append((args, kwargs, result))
        return result
    monkeypatch.setattr(module, function_name, spy)
    return calls


def test_apgd_t_attacks_the_second_most_likely_class_first_then_the_next_ones(monkeypatch):
    """APGD-T's targets are the classes of the 2nd, 3rd, ... largest clean logits, n_target_classes of them capped at
    num_classes − 1; a wrong rank attacks classes that are harder to reach and reports a higher robust accuracy."""
    calls = _spy_on(monkeypatch, "robustlab.attacks.apgd", "apgd_run")
    model, x = _tiny_net(), _interior_images(5)
    with torch.no_grad():
        logits = model(x)
    y, ranked = logits.argmax(1), logits.argsort(1, descending=True)
    apgd_targeted(model, x, y, eps=1e-4, steps=2, n_target_classes=9)  # too small a ball to break anything
    assert [args[3].tolist() for args, _, _ in calls] == [ranked[:, k].tolist() for k in range(1, 6)]
    calls.clear()
    apgd(model, x, y, eps=1e-4, steps=2, loss="dlr-targeted", target_class_rank=4)
    assert [args[3].tolist() for args, _, _ in calls] == [ranked[:, 3].tolist()]


def test_apgd_restarts_keep_the_highest_loss_point_of_all_runs(monkeypatch):
    """Among examples no run breaks, the point returned is the best of every restart, not that of the last one."""
    calls = _spy_on(monkeypatch, "robustlab.attacks.apgd", "apgd_run")
    model, x = _tiny_net(), _interior_images(8)
    with torch.no_grad():
        y = model(x).argmax(1)
    x_adv = apgd(model, x, y, eps=0.01, steps=3, restarts=3, generator=torch.Generator().manual_seed(0))
    runs = [result for _, _, result in calls]
    assert len(runs) == 3 and not any(run.fooled.any() for run in runs)
    losses = torch.stack([run.loss for run in runs])
    best = losses.argmax(0)
    assert (best != 2).any()  # some example's best run is not the last one
    for i in range(len(x)):
        assert torch.equal(x_adv[i], runs[best[i]].x_adv[i]), i


@pytest.mark.parametrize("norm,eps", [("linf", 0.05), ("l2", 0.1)])
def test_apgd_starts_from_a_random_point_on_the_sphere(norm, eps):
    """Algorithm 1 starts at a random x^(0) with ||x^(0) − x|| = ε (the authors' code rescales uniform noise to norm ε),
    a point of its own per example; starting at x itself takes the first gradient at the clean image."""
    model, x = Recorder(_tiny_net()), _interior_images(4)
    with torch.no_grad():
        y = model.model(x).argmax(1)
    apgd(model, x, y, eps=eps, norm=norm, steps=1, generator=torch.Generator().manual_seed(0))
    start = model.seen[1]  # after the clean pass
    dist = (start - x).flatten(1).abs().amax(1) if norm == "linf" else (start - x).flatten(1).norm(dim=1)
    torch.testing.assert_close(dist, torch.full((4,), eps))
    delta = (start - x).flatten(1)
    assert not torch.allclose(delta[0], delta[1])


# ---- FAB-T ----

def test_box_hyperplane_projection_is_the_exact_minimizer():
    rng = np.random.default_rng(0)
    for trial in range(30):
        d = 6
        t = rng.uniform(0, 1, d)
        w = rng.normal(size=d) * (rng.uniform(size=d) > 0.15)
        b = w @ rng.uniform(0, 1, d)  # a hyperplane that meets the box
        for norm in ("linf", "l2"):
            args = torch.tensor(t[None]), torch.tensor(w[None]), torch.tensor([b])
            got = project_on_hyperplane_box(*args, norm)[0].numpy()
            got32 = project_on_hyperplane_box(*(a.float() for a in args), norm)[0].numpy()
            assert np.abs(got32 - got).max() < 1e-4  # images run it in float32
            assert abs(w @ (t + got) - b) < 1e-9 and np.all(t + got >= -1e-12) and np.all(t + got <= 1 + 1e-12)
            bounds = list(zip(-t, 1 - t))
            if norm == "linf":  # min s  s.t. |d_i| <= s, <w, d> = b − <w, t>, box
                res = linprog(np.r_[np.zeros(d), 1.0],
                              A_ub=np.block([[np.eye(d), -np.ones((d, 1))], [-np.eye(d), -np.ones((d, 1))]]),
                              b_ub=np.zeros(2 * d), A_eq=np.r_[w, 0.0][None], b_eq=[b - w @ t],
                              bounds=bounds + [(0, None)])
                assert np.abs(got).max() == pytest.approx(res.fun, abs=1e-7), trial
            else:
                res = minimize(lambda v: v @ v, np.zeros(d), jac=lambda v: 2 * v, bounds=bounds, method="SLSQP",
                               constraints=[{"type": "eq", "fun": lambda v: w @ v - (b - w @ t), "jac": lambda v: w}],
                               options={"ftol": 1e-14, "maxiter": 500})
                assert np.linalg.norm(got) == pytest.approx(np.sqrt(res.fun), rel=1e-5, abs=1e-7), trial
    # A hyperplane out of reach of the box: go to the nearest corner.
    t, w = torch.full((1, 3), 0.5, dtype=torch.float64), torch.tensor([[1.0, -2.0, 0.0]], dtype=torch.float64)
    for norm in ("linf", "l2"):
        got = project_on_hyperplane_box(t, w, torch.tensor([10.0], dtype=torch.float64), norm)
        torch.testing.assert_close(t + got, torch.tensor([[1.0, 0.0, 0.5]], dtype=torch.float64))


def test_fab_l2_finds_the_analytic_minimal_perturbation_of_a_linear_model():
    torch.manual_seed(0)
    linear = nn.Linear(64, 5).double()
    model = nn.Sequential(nn.Flatten(), linear).eval()
    x = (0.5 + 0.05 * torch.randn(16, 1, 8, 8, dtype=torch.float64)).clamp(0, 1)
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(1)
    t = logits.argsort(1, descending=True)[:, 1]
    W = linear.weight.detach()
    # Distance from x to the hyperplane z_t = z_y (the box stays inactive: x is near 0.5, the steps are small).
    gap = (logits.gather(1, y[:, None]) - logits.gather(1, t[:, None])).squeeze(1)
    analytic = gap / (W[t] - W[y]).norm(dim=1)
    x_adv = fab_targeted(model, x, y, eps=100.0, norm="l2", steps=100, n_target_classes=1)
    found = (x_adv - x).flatten(1).norm(dim=1)
    assert accuracy(model, x_adv, y) == 0
    assert torch.all(found >= analytic * (1 - 1e-6))  # nothing closer than the hyperplane exists...
    assert torch.all(found <= analytic * 1.02)       # ...and FAB gets within 2% of it
    # Inside the ball only: a budget below the distance leaves the input unchanged.
    x_small = fab_targeted(model, x, y, eps=float(analytic.min()) * 0.5, norm="l2", steps=20, n_target_classes=1)
    assert torch.equal(x_small, x)


def _reference_fab(model, x0, y, t, norm, steps, x_start=None, alpha_max=0.1, eta=1.05, beta=0.9):
    """The FAB paper's iteration for one example and the single y-vs-t hyperplane, in float64.

    Returns the closest misclassified iterate (before its backward step) and its distance, or (x0, inf).
    """
    def size(v):
        return v.abs().max() if norm == "linf" else v.norm()

    x1, best, best_dist = (x0 if x_start is None else x_start).clone(), x0.clone(), float("inf")
    for _ in range(steps):
        v = x1.detach().requires_grad_(True)
        logits = model(v[None])[0]
        g = logits[t] - logits[y]
        (grad,) = torch.autograd.grad(g, v)
        w = grad.flatten()
        b = w @ x1.flatten() - g.detach()
        d1 = project_on_hyperplane_box(x1.flatten()[None], w[None], b[None], norm)[0].view_as(x1)
        d2 = project_on_hyperplane_box(x0.flatten()[None], w[None], b[None], norm)[0].view_as(x0)
        n1, n2 = max(size(d1), 1e-8), max(size(d2), 1e-8)
        a = min(n1 / (n1 + n2), alpha_max)
        x1 = ((1 - a) * (x1 + eta * d1) + a * (x0 + eta * d2)).clamp(0, 1)
        with torch.no_grad():
            wrong = model(x1[None]).argmax(1).item() != y
        if wrong:
            if size(x1 - x0) < best_dist:
                best, best_dist = x1.clone(), size(x1 - x0).item()
            x1 = x0 + beta * (x1 - x0)
    return best, best_dist


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("start", ["x", "random"])
def test_fab_matches_an_independent_rederivation(norm, start):
    """α = min(||δ|| / (||δ|| + ||δ_orig||), α_max), the η extrapolation and the β backward step together set how close
    FAB-T gets; the linear-model test above reaches its hyperplane whatever they are. α_max binds mostly where the
    iterate is far from x, as after a restart's random start."""
    model = _tiny_net().double()
    x = torch.rand(12, 1, 3, 4, dtype=torch.float64)
    x_start = None if start == "x" else (x + 0.15 * (2 * torch.rand_like(x) - 1)).clamp(0, 1)
    with torch.no_grad():
        logits = model(x)
    y, t = logits.argmax(1), logits.argsort(1, descending=True)[:, 1]
    with attack_mode(model):
        best, dist = fab_run(model, x, y, t, norm=norm, steps=15, x_start=x_start)
    found = 0
    for i in range(len(x)):
        ref_best, ref_dist = _reference_fab(model, x[i], y[i].item(), t[i].item(), norm, steps=15,
                                            x_start=None if x_start is None else x_start[i])
        assert dist[i].item() == pytest.approx(ref_dist, rel=1e-6), i
        torch.testing.assert_close(best[i], ref_best, atol=1e-7, rtol=0)
        found += ref_dist < float("inf")
    assert found >= len(x) // 2


def test_fab_t_targets_the_next_most_likely_classes_and_restarts_at_half_the_radius(monkeypatch):
    """FAB-T, as APGD-T, takes the 2nd, 3rd, ... most likely classes; its first run per target starts at x and later
    ones at a random point at distance ε/2 (AutoAttack's FAB)."""
    calls = _spy_on(monkeypatch, "robustlab.attacks.fab", "fab_run")
    model, x, eps = _tiny_net(), _interior_images(5), 1e-3
    with torch.no_grad():
        logits = model(x)
    y, ranked = logits.argmax(1), logits.argsort(1, descending=True)
    g = torch.Generator().manual_seed(0)
    fab_targeted(model, x, y, eps=eps, steps=2, n_target_classes=2, restarts=2, generator=g)
    assert [args[3].tolist() for args, _, _ in calls] == [ranked[:, k].tolist() for k in (1, 1, 2, 2)]
    starts = [kwargs["x_start"] for _, kwargs, _ in calls]
    assert starts[0] is None and starts[2] is None
    for start in (starts[1], starts[3]):
        torch.testing.assert_close((start - x).flatten(1).abs().amax(1), torch.full((5,), eps / 2))


# ---- Square ----

class _NoBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("this model has no gradients")


class GradientFree(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(_NoBackward.apply(x))


def test_square_needs_no_gradients(standard_model, test_batch):
    x, y = test_batch[0][:48], test_batch[1][:48]
    model = GradientFree(standard_model)
    with pytest.raises(RuntimeError, match="no gradients"):
        pgd(model, x[:2], y[:2], eps=0.1, steps=1)
    clean = accuracy(model, x, y)
    for norm, queries, drop in (("linf", 300, 0.1), ("l2", 60, 0.02)):
        x_adv = square(model, x, y, eps=EPS[norm], norm=norm, queries=queries, generator=torch.Generator().manual_seed(0))
        assert within_ball(x_adv, x, norm, EPS[norm])
        assert accuracy(model, x_adv, y) <= clean - drop, norm


def test_square_windows_reach_the_last_row_and_column():
    """Every position where the window fits, 0 to h − s (the paper); the authors' code never draws h − s."""
    from robustlab.attacks.square import _linf_candidate
    x = torch.full((1, 1, 8, 8), 0.5)
    generator = torch.Generator().manual_seed(0)
    touched = torch.zeros(8, 8, dtype=torch.bool)
    for _ in range(200):  # p = 9/64: 3×3 windows, 6 positions per axis
        touched |= (_linf_candidate(x, x, 0.1, 9 / 64, generator) != x)[0, 0]
    assert touched.all()


def test_square_p_schedule_halves_after_the_published_iterations():
    """The reference's p_selection: p_init up to iteration 10, p_init/2 for 10 < i <= 50, ... p_init/512 after 8000."""
    boundaries = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
    for halvings, t in enumerate(boundaries):
        assert p_schedule(t, 0.8) == pytest.approx(0.8 / 2 ** halvings), t
        assert p_schedule(t + 1, 0.8) == pytest.approx(0.8 / 2 ** (halvings + 1)), t
    assert p_schedule(0, 0.8) == 0.8 and p_schedule(10 ** 6, 0.8) == pytest.approx(0.8 / 512)


def test_square_linf_window_holds_the_fraction_p_of_the_pixels():
    """Side s = round(sqrt(p·h·w)): p = 0.4 of 28×28 pixels is 18×18 (truncating would give 17×17)."""
    from robustlab.attacks.square import _linf_candidate
    x = torch.full((1, 1, 28, 28), 0.5)
    changed = _linf_candidate(x, x, 0.1, 0.4, torch.Generator().manual_seed(0)) != x
    assert changed.sum() == 18 * 18


def test_square_linf_starts_from_vertical_stripes_and_signs_each_window_per_channel():
    """The paper's L∞ initialization: ±ε, one sign per column and channel, the same down each column; each window
    then gets a sign of its own per channel."""
    from robustlab.attacks.square import _linf_candidate
    model, x = Recorder(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))), _interior_images(2, shape=(3, 8, 8))
    with torch.no_grad():
        y = model.model(x).argmax(1)
    square(model, x, y, eps=0.01, queries=0, generator=torch.Generator().manual_seed(0))
    delta = model.seen[1] - x  # after the clean pass
    torch.testing.assert_close(delta.abs(), torch.full_like(delta, 0.01))
    assert torch.equal(delta.sign(), delta[:, :, :1].sign().expand_as(delta))  # constant down each column
    assert len({tuple(column) for column in delta[:, :, 0].sign().flatten(0, 1).tolist()}) > 1
    generator, mixed = torch.Generator().manual_seed(0), 0
    for _ in range(10):
        window = (_linf_candidate(x, x, 0.01, 0.1, generator) - x)[0].flatten(1)
        corner = window[:, window.abs().sum(0).argmax()]  # a pixel of the window, across the 3 channels
        mixed += len(set(corner.sign().tolist())) > 1
    assert mixed > 0


def test_square_keeps_only_improving_queries_and_makes_one_query_per_step():
    """Random search: a candidate replaces the current point only when the margin z_y − max_{j≠y} z_j goes down, so
    the point returned is the lowest-margin one queried; `queries` steps are queries + 2 forward passes with the
    clean check and the initialization."""
    torch.manual_seed(0)
    model, x = Recorder(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))), _interior_images(1, shape=(3, 8, 8))
    with torch.no_grad():
        y = model.model(x).argmax(1)
    x_adv = square(model, x, y, eps=0.005, queries=60, generator=torch.Generator().manual_seed(0))
    assert len(model.seen) == 62
    with torch.no_grad():
        margins = torch.cat([margin(model.model(q), y) for q in model.seen[1:]])
        returned = margin(model.model(x_adv), y)
    assert returned.item() > 0  # unbroken: the whole run counts
    assert returned.item() == margins.min().item()
    assert margins[-1] > margins.min()  # the last candidate was not an improvement


# ---- the ensemble ----

def test_ensemble_is_never_weaker_than_a_member(robust_model, fmnist, monkeypatch):
    aa = importlib.import_module("robustlab.attacks.autoattack")  # the package re-exports a function by that name
    data = fmnist.test.subset(48)
    x, y = data.as_float(), data.labels
    budget = dict(eps=0.1, norm="linf", n_target_classes=3)
    calls = []  # per member call: (stage, images attacked, images its returned points break)

    def spy(member, stage_of):
        def run(model, xs, ys, **kwargs):
            adv, fooled = member(model, xs, ys, **kwargs)
            with torch.no_grad():
                calls.append((stage_of(kwargs), len(xs), int((model(adv).argmax(1) != ys).sum())))
            return adv, fooled
        return run
    monkeypatch.setattr(aa, "apgd_attack", spy(aa.apgd_attack, lambda k: "apgd-t" if k["loss"] == "dlr-targeted"
                                                else "apgd-ce"))
    monkeypatch.setattr(aa, "fab_targeted_attack", spy(aa.fab_targeted_attack, lambda k: "fab-t"))
    monkeypatch.setattr(aa, "square_attack", spy(aa.square_attack, lambda k: "square"))
    result = autoattack_accuracy(robust_model, data, steps=8, queries=100, batch_size=24, progress=False, **budget)
    acc = list(result.stage_accuracy.values())
    # every member ran, on exactly the images the earlier stages left, and each image it broke is counted
    left = [round(a * len(y)) for a in acc]
    for i, stage in enumerate(STAGES[1:], 1):
        ran = [(n, broken) for s, n, broken in calls if s == stage]
        assert sum(n for n, _ in ran) == left[i - 1], (stage, ran, left)
        assert sum(broken for _, broken in ran) == left[i - 1] - left[i], (stage, ran, left)
    assert left[3] > 0  # FAB-T and Square had images to attack: the check above saw them run
    assert list(result.stage_accuracy) == list(STAGES)
    assert all(a >= b for a, b in zip(acc, acc[1:])) and acc[0] == pytest.approx(accuracy(robust_model, x, y))
    # The report is what the model does on the returned points.
    assert within_ball(result.x_adv, x, "linf", 0.1)
    with torch.no_grad():
        correct = robust_model(result.x_adv).argmax(1) == y
    assert torch.equal(correct, result.robust) and result.robust_accuracy == pytest.approx(correct.float().mean().item())
    for stage, count in zip(STAGES, np.diff([0] + [round((1 - a) * len(y)) for a in acc])):
        assert sum(1 for s in result.broken_by_names() if s == stage) == count, stage
    g = torch.Generator().manual_seed(5)
    members = {
        "apgd-ce": apgd(robust_model, x, y, eps=0.1, steps=8, generator=g),
        "apgd-t": apgd_targeted(robust_model, x, y, steps=8, generator=g, **budget),
        "fab-t": fab_targeted(robust_model, x, y, steps=8, generator=g, **budget),
        "square": square(robust_model, x, y, eps=0.1, queries=100, generator=g),
    }
    for name, x_adv in members.items():
        assert result.robust_accuracy <= accuracy(robust_model, x_adv, y), name


def test_autoattack_runs_the_standard_members_in_the_published_order(monkeypatch):
    """APGD-CE, APGD-T (targeted DLR, 9 targets capped at num_classes − 1), FAB-T, then Square with p_init = 0.8:
    AutoAttack-standard's figures are comparable only when it runs exactly these."""
    aa = importlib.import_module("robustlab.attacks.autoattack")
    calls = []

    def spy(name, member):
        def run(model, xs, ys, **kwargs):
            calls.append((name, len(xs), kwargs))
            return member(model, xs, ys, **kwargs)
        return run
    for name in ("apgd_attack", "fab_targeted_attack", "square_attack"):
        monkeypatch.setattr(aa, name, spy(name, getattr(aa, name)))
    model, x = _tiny_net(), _interior_images(4)
    with torch.no_grad():
        y = model(x).argmax(1)
    result = autoattack(model, x, y, eps=1e-4, steps=2, queries=3, progress=False)  # nothing breaks: all stages run
    assert result.robust.all() and list(result.stage_accuracy) == ["clean", "apgd-ce", "apgd-t", "fab-t", "square"]
    assert [(name, n, kwargs.get("loss")) for name, n, kwargs in calls] == [
        ("apgd_attack", 4, "ce"), ("apgd_attack", 4, "dlr-targeted"), ("fab_targeted_attack", 4, None),
        ("square_attack", 4, None)]
    assert calls[1][2]["n_target_classes"] == 5 and calls[2][2]["n_target_classes"] == 5
    assert calls[3][2]["p_init"] == 0.8 and calls[3][2]["queries"] == 3
    assert all(kwargs.get("steps", 2) == 2 and kwargs["eps"] == 1e-4 for _, _, kwargs in calls)


def test_autoattack_accuracy_takes_a_pair_of_tensors_as_accuracy_does(robust_model, fmnist):
    data = fmnist.test.subset(12)
    budget = dict(eps=0.1, steps=2, queries=5, n_target_classes=2, progress=False)
    from_set = autoattack_accuracy(robust_model, data, **budget)
    for pair in [(data.images, data.labels), (data.as_float(), data.labels)]:
        assert torch.equal(autoattack_accuracy(robust_model, pair, **budget).robust, from_set.robust)
    assert len(autoattack_accuracy(robust_model, (data.as_float(), data.labels), n=5, **budget).robust) == 5
    with pytest.raises(RobustlabError, match="takes an ImageSet .* or an \\(images, labels\\) pair, not a Tensor"):
        autoattack_accuracy(robust_model, data.as_float(), **budget)


class Interrupt(Exception):
    pass


class CountingModel(nn.Module):
    """Counts forward passes and raises Interrupt on pass number `stop_at` (simulates a killed run)."""

    def __init__(self, model, stop_at=None):
        super().__init__()
        self.model, self.stop_at, self.calls = model, stop_at, 0

    def forward(self, x):
        self.calls += 1
        if self.stop_at is not None and self.calls >= self.stop_at:
            raise Interrupt
        return self.model(x)


def test_interrupted_evaluation_resumes_to_the_same_result(robust_model, test_batch, tmp_path):
    x, y = test_batch[0][:40], test_batch[1][:40]
    kwargs = dict(eps=0.1, norm="linf", steps=6, queries=40, n_target_classes=3, batch_size=16, seed=3,
                  progress=False)
    counter = CountingModel(robust_model)
    full = autoattack(counter, x, y, **kwargs)
    state = tmp_path / "aa-state.safetensors"
    with pytest.raises(Interrupt):  # killed in the middle of the APGD-T stage or later
        autoattack(CountingModel(robust_model, stop_at=int(counter.calls * 0.55)), x, y, state_path=state, **kwargs)
    assert state.exists() and state.with_suffix(".json").exists()
    resumed_model = CountingModel(robust_model)
    resumed = autoattack(resumed_model, x, y, state_path=state, **kwargs)
    assert resumed_model.calls < counter.calls * 0.6  # finished work was skipped
    assert torch.equal(resumed.x_adv, full.x_adv) and torch.equal(resumed.broken_by, full.broken_by)
    assert list(resumed.stage_accuracy.items()) == list(full.stage_accuracy.items())
    # A finished state answers at once; a state from another evaluation is refused.
    again = CountingModel(robust_model)
    assert autoattack(again, x, y, state_path=state, **kwargs).stage_accuracy == full.stage_accuracy
    assert again.calls <= 1
    # a finished state read against a model and images (experiments/masking_probe.py) must be theirs
    load_finished_state(state, again, x, y)
    with pytest.raises(RobustlabError, match="other images than the first 40"):
        load_finished_state(state, again, x.flip(0), y.flip(0))
    with pytest.raises(RobustlabError, match="different evaluation"):
        autoattack(robust_model, x, y, state_path=state, **{**kwargs, "eps": 0.2})
    # ...and so is the state of other weights: a suite run again after training went on reported the old model's
    # AutoAttack as the new one's; the suite replaces it
    other = CountingModel(copy.deepcopy(robust_model))
    with torch.no_grad():
        next(other.parameters()).add_(0.01)
    with pytest.raises(RobustlabError, match="differs in model"):
        autoattack(other, x, y, state_path=state, **kwargs)
    with pytest.raises(RobustlabError, match="another model's weights"):
        load_finished_state(state, other, x, y)
    replaced = autoattack(other, x, y, state_path=state, replace_other_state=True, **kwargs)
    assert torch.equal(replaced.broken_by, autoattack(other, x, y, **kwargs).broken_by)


def test_fab_l2_projection_leaves_near_zero_weights_alone_when_the_plane_is_out_of_reach():
    """The reference's projection_l2 freezes coordinates with |w| ≤ 1e-8; robustlab once pushed them to the box."""
    t, w, b = torch.tensor([[0.5, 0.5]]), torch.tensor([[1.0, 1e-10]]), torch.tensor([-10.0])
    d = project_on_hyperplane_box(t, w, b, "l2")
    assert d[0, 0] == pytest.approx(-0.5) and d[0, 1] == 0


def test_a_resumed_evaluation_removes_the_temporaries_of_a_killed_save(tmp_path):
    """A SIGKILL during a state save left .autoattack_state.safetensors.tmpPID (as large as the state) behind for
    good: the training command removes its own on --resume, the evaluation never did."""
    from robustlab.models import build_model
    torch.manual_seed(0)
    model = build_model("cnn-small", (1, 28, 28), 10, (0.5,), (0.25,)).eval()
    x, y = torch.rand(6, 1, 28, 28), torch.arange(6)
    state = tmp_path / "aa.safetensors"
    stale = [tmp_path / ".aa.safetensors.tmp99999999", tmp_path / ".aa.json.tmp99999999"]
    for path in stale:
        path.write_bytes(b"cut short")
    autoattack(model, x, y, eps=0.1, steps=2, queries=5, n_target_classes=3, batch_size=3, progress=False,
               state_path=state)
    assert state.exists() and not any(path.exists() for path in stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aa.json", "aa.safetensors"]
