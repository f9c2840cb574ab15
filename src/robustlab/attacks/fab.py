"""FAB-T: the targeted Fast Adaptive Boundary attack (Croce & Hein, "Minimally distorted adversarial
examples with a fast adaptive boundary attack", ICML 2020) as AutoAttack-standard runs it.

FAB looks for the smallest perturbation that changes the decision. At each step it linearizes the
boundary between the true class y and the target t at the current iterate, projects both the iterate
and the original input onto that hyperplane intersected with the box [0, 1]^d, and moves to a convex
combination of the two projections, extrapolated by η, with a weight α ≤ α_max on the original
input's side that biases it toward small perturbations. Whenever the iterate is adversarial it is
recorded if it is the closest yet, and pulled back toward the original by β (the backward step).

The projections are exact: both problems have a one-parameter family of candidate solutions (the
Lagrange multiplier for L2, the radius for L∞) along which the constraint value is piecewise linear
and monotone, so sorting the breakpoints and solving on the right segment gives the minimizer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from robustlab.attacks.apgd import check_attack_args, check_targets, clean_logits, random_direction
from robustlab.attacks.pgd import attack_mode
from robustlab.attacks.threat import check_batch, lp_norm, per_example
from robustlab.errors import RobustlabError


# ---- projection onto {z : <w, z> = b} ∩ [0, 1]^d ----

def project_on_hyperplane_box(t: torch.Tensor, w: torch.Tensor, b: torch.Tensor, norm: str) -> torch.Tensor:
    """The smallest perturbation d (in L∞ or L2) with <w, t + d> = b and t + d in [0, 1]^d, per row.

    t, w: (n, d); b: (n,). Where the box does not reach the hyperplane, d goes as far toward it as the
    box allows (the box corner that minimizes |<w, t + d> − b|).
    """
    c = (w * t).sum(1) - b
    # Orient the hyperplane so that t lies on its positive side: then <w, d> must equal −c ≤ 0.
    flip = c < 0
    w = torch.where(flip[:, None], -w, w)
    c = c.abs()
    room = torch.where(w > 0, t, 1 - t) * (w != 0)  # how far each coordinate can move against sign(w)
    if norm == "l2":  # as the reference's projection_l2, which freezes |w| ≤ 1e-8: where the hyperplane is out of
        room = room * (w.abs() > 1e-8)  # reach, such coordinates would otherwise be pushed to the box's edge
        return _project_l2(w, c, room)
    return _project_linf(w, c, room)


def _exclusive_tail(v: torch.Tensor) -> torch.Tensor:
    """Σ_{j>k} v_j for each k (a reversed cumulative sum, exact zero over an all-zero tail)."""
    tail = v.flip(1).cumsum(1).flip(1)
    return F.pad(tail[:, 1:], (0, 1))


def _project_l2(w, c, room):
    """min ||d||_2 s.t. <w, d> = −c, −t ≤ d ≤ 1 − t.

    KKT: d(λ) = clip(−λw, box) for some λ ≥ 0, and g(λ) = <w, d(λ)> decreases piecewise linearly;
    coordinate i saturates at λ_i = room_i / |w_i| and then contributes −|w_i| room_i.
    """
    aw = w.abs()
    lam = torch.where(aw > 0, room / aw.clamp_min(torch.finfo(w.dtype).tiny), torch.full_like(w, float("inf")))
    lam_s, order = lam.sort(1)
    aw_s, room_s = aw.gather(1, order), room.gather(1, order)
    sat = aw_s * room_s                   # |contribution| of a saturated coordinate
    head = sat.cumsum(1)                  # Σ_{j≤k} saturated
    after = _exclusive_tail(aw_s ** 2)    # Σ_{j>k} w_j², the coordinates still moving
    # |g| at each breakpoint λ_(k): inf·0 for w = 0 coordinates (λ = inf, nothing left moving) is 0.
    reach = head + torch.where(after > 0, lam_s * after, torch.zeros_like(after))
    k = (reach < c[:, None]).sum(1, keepdim=True).clamp(max=w.shape[1] - 1)
    a = (head - sat).gather(1, k).squeeze(1)              # Σ_{j<k} saturated
    bsum = (after + aw_s ** 2).gather(1, k).squeeze(1)    # Σ_{j≥k} w_j²
    lam_opt = (c - a) / bsum.clamp_min(torch.finfo(w.dtype).tiny)  # solves a + λ·bsum = c on that segment
    d = -torch.sign(w) * torch.minimum(lam_opt[:, None] * aw, room)
    feasible = head[:, -1] >= c
    return torch.where(feasible[:, None], d, -torch.sign(w) * room)


def _project_linf(w, c, room):
    """min ||d||_∞ s.t. <w, d> = −c, −t ≤ d ≤ 1 − t.

    With radius δ the farthest one can go is d_i = −sign(w_i)·min(δ, room_i), reaching
    H(δ) = Σ |w_i| min(δ, room_i), piecewise linear and increasing; the answer is the δ with H(δ) = c.
    """
    aw = w.abs()
    room_s, order = room.sort(1)
    aw_s = aw.gather(1, order)
    sat = aw_s * room_s
    head = sat.cumsum(1)
    after = _exclusive_tail(aw_s)
    reach = head + room_s * after  # H at δ = room_(k)
    k = (reach < c[:, None]).sum(1, keepdim=True).clamp(max=w.shape[1] - 1)
    a = (head - sat).gather(1, k).squeeze(1)
    bsum = (after + aw_s).gather(1, k).squeeze(1)
    delta = (c - a) / bsum.clamp_min(torch.finfo(w.dtype).tiny)
    d = -torch.sign(w) * torch.minimum(delta[:, None].expand_as(room), room)
    feasible = head[:, -1] >= c
    return torch.where(feasible[:, None], d, -torch.sign(w) * room)


# ---- the attack ----

def _margin_and_grad(model, x1, y, target, need_grad: bool = True):
    """Logits and g = z_t − z_y with its input gradient: g = 0 is the boundary between y and t."""
    if not need_grad:
        with torch.no_grad():
            logits = model(x1)
        return logits, None, None
    x1 = x1.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x1)
        g = logits.gather(1, target[:, None]).squeeze(1) - logits.gather(1, y[:, None]).squeeze(1)
        (grad,) = torch.autograd.grad(g.sum(), x1)
    return logits.detach(), g.detach().to(x1.dtype), grad.detach()  # float64 logits made the next iterate float64


def fab_run(model, x0, y, target, *, norm: str, steps: int, alpha_max: float = 0.1, eta: float = 1.05,
            beta: float = 0.9, x_start: torch.Tensor | None = None):
    """One targeted FAB run (the FAB paper's algorithm with the single y-vs-t hyperplane). Model in attack mode.

    Returns (best, dist): the closest adversarial point found and its distance, inf where none.
    """
    x1 = (x0 if x_start is None else x_start).clone()
    best, dist_best = x0.clone(), torch.full((len(x0),), float("inf"), device=x0.device, dtype=x0.dtype)
    flat0 = x0.flatten(1)
    _, g, grad = _margin_and_grad(model, x1, y, target)
    check_first = False
    for it in range(steps):
        # Linearized boundary at x1: g + <∇g, z − x1> = 0, i.e. <w, z> = b.
        w = grad.flatten(1)
        b = (w * x1.flatten(1)).sum(1) - g
        # Project the iterate and the original input in one call.
        d = project_on_hyperplane_box(torch.cat([x1.flatten(1), flat0]), w.repeat(2, 1), b.repeat(2), norm)
        d1, d2 = d[:len(w)], d[len(w):]
        n1 = lp_norm(d1, norm).clamp_min(1e-8)
        n2 = lp_norm(d2, norm).clamp_min(1e-8)
        # Biased step: α = min(||d1|| / (||d1|| + ||d2||), α_max) weights the step from the original point.
        alpha = per_example((n1 / (n1 + n2)).clamp(0.0, alpha_max), x1)
        # Extrapolate both projections by η (overshoot the linearized boundary) and combine.
        x1 = ((1 - alpha) * (x1 + eta * d1.view_as(x1)) + alpha * (x0 + eta * d2.view_as(x0))).clamp(0.0, 1.0)

        # Success check, then the gradient at the point the next step starts from. Adversarial rows are
        # pulled back first, so their check-pass gradient is wasted: while most rows are adversarial,
        # check with a gradient-free pass; otherwise take the gradient in the same pass as the check.
        last = it == steps - 1
        logits, g, grad = _margin_and_grad(model, x1, y, target, need_grad=not (last or check_first))
        adv = logits.argmax(1) != y
        if adv.any():
            dist = lp_norm(x1 - x0, norm)
            closer = adv & (dist < dist_best)
            best[closer], dist_best[closer] = x1[closer], dist[closer]
            # Backward step: x1 ← x0 + β(x1 − x0), to search for closer adversarial points.
            x1[adv] = x0[adv] + beta * (x1[adv] - x0[adv])
        if not last:
            if check_first:
                _, g, grad = _margin_and_grad(model, x1, y, target)
            elif adv.any():
                _, g[adv], grad[adv] = _margin_and_grad(model, x1[adv], y[adv], target[adv])
            check_first = adv.float().mean().item() > 0.6
    return best, dist_best


def fab_targeted_attack(model, x, y, *, eps: float, norm: str = "linf", steps: int = 100, n_target_classes: int = 9,
                        restarts: int = 1, alpha_max: float = 0.1, eta: float = 1.05, beta: float = 0.9,
                        generator=None):
    """FAB-T over target ranks and restarts on still-robust examples; returns (x_adv, fooled).

    An example counts as broken only when the perturbation found is within ε. Model in attack mode.
    """
    check_attack_args(eps, norm, steps, restarts)
    if not (0 <= alpha_max <= 1 and eta >= 1 and 0 < beta < 1):
        raise RobustlabError(f"FAB needs 0 <= alpha_max <= 1, eta >= 1, 0 < beta < 1; got {alpha_max}, {eta}, {beta}")
    x, y, x_adv, logits = clean_logits(model, x, y)
    if logits is None:
        return x_adv, torch.zeros(0, dtype=torch.bool, device=x.device)
    ranked = logits.argsort(1, descending=True)
    fooled = logits.argmax(1) != y
    for rank in range(2, check_targets(n_target_classes, logits.shape[1], "FAB-T") + 2):
        for r in range(restarts):
            idx = (~fooled).nonzero().squeeze(1)
            if len(idx) == 0:
                return x_adv, fooled
            x0 = x[idx]
            start = None
            if r > 0:  # later restarts start at a random point at distance ε/2 (as AutoAttack's FAB)
                start = (x0 + 0.5 * eps * random_direction(x0, norm, generator)).clamp(0.0, 1.0)
            best, dist = fab_run(model, x0, y[idx], ranked[idx, rank - 1], norm=norm, steps=steps,
                                 alpha_max=alpha_max, eta=eta, beta=beta, x_start=start)
            ok = dist <= eps
            x_adv[idx[ok]] = best[ok]
            fooled[idx[ok]] = True
    return x_adv, fooled


def fab_targeted(model, x, y, *, eps: float, norm: str = "linf", steps: int = 100, n_target_classes: int = 9,
                 restarts: int = 1, alpha_max: float = 0.1, eta: float = 1.05, beta: float = 0.9,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """FAB-T: minimal-norm targeted FAB against the 2nd, 3rd, ... most likely classes in turn.

    Returns the closest adversarial example found where it lies within ε of x, else x itself.
    The first run per target starts at x (deterministic, as in AutoAttack-standard); restarts
    beyond the first start at random points at distance ε/2 drawn with `generator`.
    n_target_classes is capped at num_classes − 1.
    """
    y = check_batch(x, y, model=model)
    with attack_mode(model):
        x_adv, _ = fab_targeted_attack(model, x, y, eps=eps, norm=norm, steps=steps, n_target_classes=n_target_classes,
                                       restarts=restarts, alpha_max=alpha_max, eta=eta, beta=beta, generator=generator)
    return x_adv
