"""Square Attack (Andriushchenko, Croce, Flammarion & Hein, ECCV 2020): score-based random search.

It needs only the model's scores, never a gradient, so it also breaks models whose gradients are
masked. Each query changes one random square window of the current best perturbation and keeps the
change if the margin loss z_y − max_{j≠y} z_j went down. The window side follows the schedule of p,
the fraction of pixels changed, of the paper and its reference code: p_init is halved at
iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000, as in AutoAttack-standard (whose 5000
queries use these iteration counts unrescaled). Window positions are drawn once per query for the
whole batch; each example still sees uniformly random positions, and signs are drawn per example.

A window may sit at every position where it fits, rows and columns 0 to h − s, as the paper has it. The
authors' code (fra31/auto-attack, `random_int`) never draws the last position, so after the initial stripes
its windows never reach the last row and column. On a gradient-masked MNIST model that left their AutoAttack
1.6 points above robustlab's; with the last position allowed, both gave the same 49.3% (docs/results.md,
"AutoAttack against its authors' code").
"""
from __future__ import annotations

import math

import torch

from robustlab.attacks.apgd import check_attack_args
from robustlab.attacks.pgd import attack_mode
from robustlab.attacks.threat import check_batch, check_labels, lp_norm, per_example
from robustlab.errors import RobustlabError, check_integer

P_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_schedule(i: int, p_init: float) -> float:
    """Fraction of pixels that query i (0-based) changes: p_init halved after each of P_HALVINGS."""
    return p_init / 2 ** sum(i > t for t in P_HALVINGS)


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """z_y − max_{j≠y} z_j: negative exactly when another class wins."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    return z_y - logits.scatter(1, y[:, None], float("-inf")).amax(1)


def _device(generator):
    return generator.device if generator is not None else None


def _randint(high: int, generator) -> int:
    return int(torch.randint(high, (1,), generator=generator, device=_device(generator)))


def _random_sign(shape, like: torch.Tensor, generator) -> torch.Tensor:
    return torch.randint(2, shape, generator=generator, device=like.device).to(like.dtype) * 2 - 1


def _side(p: float, h: int, w: int, minimum: int) -> int:
    """Window side s = round(sqrt(p·h·w)) so that a window holds a fraction p of the pixels."""
    return min(max(int(round(math.sqrt(p * h * w))), minimum), h, w)


# ---- L∞: windows of ±ε ----

def _linf_init(x, eps, generator):
    """Vertical stripes of ±ε, one sign per column and channel (the paper's L∞ initialization)."""
    n, c, h, w = x.shape
    return (x + eps * _random_sign((n, c, 1, w), x, generator)).clamp(0.0, 1.0)


def _linf_candidate(x, x_best, eps, p, generator):
    """Set one s×s window of the perturbation to ±ε per channel (the vertices of the ball)."""
    n, c, h, w = x.shape
    s = _side(p, h, w, 1)
    r, q = _randint(h - s + 1, generator), _randint(w - s + 1, generator)
    x_new = x_best.clone()
    window = (slice(None), slice(None), slice(r, r + s), slice(q, q + s))
    x_new[window] = (x[window] + eps * _random_sign((n, c, 1, 1), x, generator)).clamp(0.0, 1.0)
    return x_new


# ---- L2: moving mass between windows ----

def _rectangle(a: int, b: int) -> torch.Tensor:
    """Nested-rectangle bump of size a×b: Σ_{k=d}^{K−1} 1/(k+1)², d the Chebyshev distance to the centre."""
    rows = (torch.arange(a) - a // 2).abs()[:, None]
    cols = (torch.arange(b) - b // 2).abs()[None, :]
    dist = torch.maximum(rows, cols)
    k = max(a // 2, b // 2) + 1
    weights = 1.0 / torch.arange(1, k + 1, dtype=torch.float64) ** 2
    tails = weights.flip(0).cumsum(0).flip(0)  # tails[d] = Σ_{k≥d} 1/(k+1)²
    bump = tails[dist]
    return bump / bump.norm().clamp_min(1e-12)


def _pattern(s: int, generator) -> torch.Tensor:
    """η of the paper: a positive bump on one half of the window and a negative one on the other,
    unit L2 norm, transposed with probability 1/2."""
    eta = torch.cat([_rectangle(s // 2, s), -_rectangle(s - s // 2, s)], 0)
    eta = eta / eta.norm()
    if torch.rand(1, generator=generator, device=_device(generator)).item() > 0.5:
        eta = eta.t()
    return eta


def _l2_init(x, eps, generator):
    """A 5×5 grid of η patterns with random signs per channel, scaled to L2 norm ε."""
    n, c, h, w = x.shape
    s = max(min(h, w) // 5, 1)
    r0, q0 = (h - 5 * s) // 2, (w - 5 * s) // 2
    delta = torch.zeros_like(x)
    for i in range(5):
        for j in range(5):
            eta = _pattern(s, generator).to(x)
            delta[:, :, r0 + i * s:r0 + (i + 1) * s, q0 + j * s:q0 + (j + 1) * s] += \
                eta * _random_sign((n, c, 1, 1), x, generator)
    return (x + delta * per_example(eps / lp_norm(delta, "l2").clamp_min(1e-12), delta)).clamp(0.0, 1.0)


def _l2_candidate(x, x_best, eps, p, generator):
    """Move the perturbation's mass from windows W1 ∪ W2 into W1, per channel (the paper's L2 sampler).

    W2 is zeroed; W1 gets the direction ρ·η + δ_W1/||δ_W1|| with the mass of both windows plus an
    equal share of the unused budget ε² − ||δ||², so the new perturbation has norm ε again.
    """
    n, c, h, w = x.shape
    s = _side(p, h, w, 3)
    if s % 2 == 0:
        s = s + 1 if s < min(h, w) else s - 1
    r1, q1, r2, q2 = (_randint(h - s + 1, generator), _randint(w - s + 1, generator),
                      _randint(h - s + 1, generator), _randint(w - s + 1, generator))
    w1 = (slice(None), slice(None), slice(r1, r1 + s), slice(q1, q1 + s))
    w2 = (slice(None), slice(None), slice(r2, r2 + s), slice(q2, q2 + s))
    delta = x_best - x
    union = torch.zeros((1, 1, h, w), dtype=torch.bool, device=x.device)
    union[w1] = True
    union[w2] = True

    def channel_norm(t):
        return t.pow(2).sum((2, 3), keepdim=True).sqrt()

    unused = (eps ** 2 - lp_norm(delta, "l2") ** 2).clamp_min(0.0)
    available = (channel_norm(delta * union) ** 2 + per_example(unused, delta) / c).sqrt()
    old = delta[w1] / (channel_norm(delta[w1]) + 1e-12)
    direction = _pattern(s, generator).to(x) * _random_sign((n, c, 1, 1), x, generator) + old
    new = direction / (channel_norm(direction) + 1e-12) * available
    delta = delta.clone()
    delta[w2] = 0.0
    delta[w1] = new
    # Numerically the norm is ε already; rescaling to exactly ε guards against round-off.
    delta = delta * per_example(eps / lp_norm(delta, "l2").clamp_min(1e-12), delta)
    return (x + delta).clamp(0.0, 1.0)


# ---- the attack ----

def square_attack(model, x, y, *, eps: float, norm: str = "linf", queries: int = 5000, p_init: float = 0.8,
                  generator=None):
    """Square Attack under torch.no_grad(); returns (x_adv, fooled). Model in attack mode.

    Only examples classified correctly are attacked; an example stops querying once it is broken.
    """
    check_attack_args(eps, norm, steps=1)
    check_integer("queries", queries, minimum=0)
    if not 0 < p_init <= 1:
        raise RobustlabError(f"p_init must be in (0, 1], got {p_init}")
    if x.dim() != 4:
        raise RobustlabError(f"Square attack needs image batches N×C×H×W, got shape {tuple(x.shape)}")
    x, y = x.detach(), y.detach()
    x_adv = x.clone()
    with torch.no_grad():
        if len(x):
            logits = model(x)
            check_labels(logits, y)
            fooled = logits.argmax(1) != y
        else:
            fooled = torch.zeros(0, dtype=torch.bool, device=x.device)
        idx = (~fooled).nonzero().squeeze(1)
        if len(idx) == 0:
            return x_adv, fooled
        init, candidate = (_linf_init, _linf_candidate) if norm == "linf" else (_l2_init, _l2_candidate)
        xs, ys = x[idx], y[idx]
        best = init(xs, eps, generator)
        logits = model(best)
        m_best = margin(logits, ys)
        hit = logits.argmax(1) != ys
        for i in range(queries + 1):
            if hit.any():  # broken examples leave the batch with their adversarial point
                x_adv[idx[hit]], fooled[idx[hit]] = best[hit], True
                keep = ~hit
                idx, xs, ys, best, m_best = idx[keep], xs[keep], ys[keep], best[keep], m_best[keep]
            if i == queries or len(idx) == 0:
                break
            x_new = candidate(xs, best, eps, p_schedule(i, p_init), generator)
            logits = model(x_new)
            m_new = margin(logits, ys)
            improved = m_new < m_best
            best = torch.where(per_example(improved, best), x_new, best)
            m_best = torch.where(improved, m_new, m_best)
            hit = improved & (logits.argmax(1) != ys)
        x_adv[idx] = best
    return x_adv, fooled


def square(model, x, y, *, eps: float, norm: str = "linf", queries: int = 5000, p_init: float = 0.8,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Square Attack with the margin loss: `queries` random-search steps per example, no gradients.

    Returns a misclassified point where one was found, else the lowest-margin point (inside the
    ε-ball and [0, 1]); examples misclassified from the start are returned unchanged.
    p_init = 0.8 is AutoAttack-standard's value for both L∞ and L2.
    """
    y = check_batch(x, y, gradients=False, model=model)
    with attack_mode(model):
        x_adv, _ = square_attack(model, x, y, eps=eps, norm=norm, queries=queries, p_init=p_init, generator=generator)
    return x_adv
