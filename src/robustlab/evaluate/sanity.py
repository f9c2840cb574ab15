"""Gradient-masking sanity checks: signs that a robustness figure must not be trusted.

An attack can fail because the model is robust, or because the attack itself was defeated: zero or useless
gradients (non-differentiable pre-processing, saturated softmax), randomness, too small a budget. Athalye et
al. (2018, "Obfuscated gradients give a false sense of security") showed how often the second happens;
Carlini et al. (2019, "On evaluating adversarial robustness") list symptoms to look for. These checks run
those symptoms on a model and an evaluation set. Passing them does not prove robustness; failing one means
the figure overestimates it until a stronger or adaptive attack says otherwise.

An attack here is any callable `attack(model, x, y, *, eps, generator=None)` returning adversarial inputs,
e.g. `functools.partial(robustlab.attacks.pgd, norm="linf", steps=20)`, APGD or Square.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F

from robustlab.attacks import attack_mode, fgm, fgsm, pgd
from robustlab.attacks.autoattack import ROBUST, STAGES
from robustlab.attacks.smooth import negative_margin, pgd_smooth, relu_count
from robustlab.attacks.square import margin
from robustlab.attacks.threat import NORMS, check_batch, lp_norm, per_example
from robustlab.errors import RobustlabError, check_choice
from robustlab.evaluate.accuracy import correct_mask, fraction
from robustlab.models import model_device
from robustlab.progress import progress as progress_bar

Attack = Callable[..., torch.Tensor]

TITLES = {  # check name -> what passing means, for reports
    "deterministic": "the model's output is deterministic",
    "gradients": "input gradients are finite, non-zero and consistent",
    "eps_monotonic": "robust accuracy does not rise with ε",
    "large_eps": "accuracy is ≈ 0 at a very large ε",
    "single_step": "single-step attack is not stronger than the iterative one",
    "convergence": "more iterations or restarts do not lower accuracy much",
    "black_box": "a gradient-free attack is not stronger than the white-box ones",
    "autoattack_square": "AutoAttack's Square finds few images that its APGD and FAB stages missed",
    "smooth_gradients": "PGD with smooth ReLU gradients finds few images that exact-gradient PGD missed",
}

# Square's share of AutoAttack's breaks above which the white-box stages count as masked. On the models measured
# in docs/results.md Square broke 0.0-0.2% of images beyond APGD and FAB where nothing was masked, and 1.7% and
# 4.8% on two residual networks whose PGD-50×3 figures AutoAttack put 3.6 and 6.7 points lower.
AUTOATTACK_SQUARE_TOLERANCE = 0.01

# The smooth-gradient check: PGD-100 (step ε/10) on the margin loss with the model's gradients, then with ReLU's
# gradient smoothed at temperature τ on the images still robust. Both count real adversarial examples, hence
# the small tolerance, as for Square above.
SMOOTH_GRADIENT_STEPS = 100
SMOOTH_GRADIENT_TAU = 0.1
SMOOTH_GRADIENT_TOLERANCE = 0.01

# The black-box check counts images that the gradient-free attack broke and the white-box ones did not: real
# adversarial examples, not a difference of two noisy accuracies, so the same small tolerance. With 3% it passed
# two residual networks whose PGD-50×3 AutoAttack put 6.7 and 3.6 points lower (Square broke a further 2.0% and 1.5%
# of 200 images; docs/results.md, "AutoAttack on the 20-epoch residual networks").
BLACK_BOX_TOLERANCE = 0.01


@dataclass
class Check:
    name: str
    passed: bool
    detail: str  # one line a person can read
    values: dict = field(default_factory=dict)
    ran: bool = True  # False: not applicable to this model, or disabled (it then neither passes nor fails)


def skipped(name: str, why: str) -> Check:
    return Check(name, True, f"not run: {why}", ran=False)


def verdict(checks: list[Check]) -> str:
    """'trustworthy' when every check that ran passed, else 'suspicious: <failed checks>'; the checks that did
    not run are named after it, since a verdict without them says less."""
    failed = [c.name for c in checks if not c.passed]
    not_run = [c.name for c in checks if not c.ran]
    return ("trustworthy" if not failed else "suspicious: " + ", ".join(failed)) + \
        (f" ({', '.join(not_run)} not run)" if not_run else "")


def to_markdown(checks: list[Check]) -> str:
    """A table of the checks with the verdict under it, for report.md."""
    lines = ["| check | result | detail |", "|---|---|---|"]
    for c in checks:
        result = "skipped" if not c.ran else "pass" if c.passed else "**FAIL**"
        lines.append(f"| {TITLES.get(c.name, c.name)} (`{c.name}`) | {result} | {c.detail.replace('|', '/')} |")
    lines += ["", f"Verdict: **{verdict(checks)}**"]
    return "\n".join(lines)


@dataclass
class SanityReport:
    checks: list[Check]

    @property
    def verdict(self) -> str:
        return verdict(self.checks)

    @property
    def trustworthy(self) -> bool:
        return all(c.passed for c in self.checks)

    def __getitem__(self, name: str) -> Check:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)

    def to_markdown(self) -> str:
        return to_markdown(self.checks)

    def to_dict(self) -> dict:
        return {"verdict": self.verdict, "checks": [asdict(c) for c in self.checks]}


# ---------------------------------------------------------------------------------------------- a gradient-free attack

def _l2_norm(t: torch.Tensor) -> torch.Tensor:
    return per_example(lp_norm(t, "l2"), t)


@torch.no_grad()
def random_search(model, x, y, *, eps: float, norm: str = "linf", queries: int = 500, p_init: float = 0.8,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """A small score-based attack in the spirit of Square (Andriushchenko et al. 2020), using outputs only.

    It changes a random square window of the perturbation (to ±ε per channel for L∞, by a Gaussian patch for
    L2) and keeps the change when the margin loss drops; windows shrink as queries are spent. It never needs
    a gradient, so it sees through obfuscated gradients; it is a fallback for the sanity checks, not a
    replacement for the full Square attack.
    """
    check_choice("norm", norm, NORMS)
    if eps <= 0 or queries < 1:
        return x.clone()
    with attack_mode(model):
        n, c, h, w = x.shape
        if norm == "linf":  # vertical stripes of ±ε, Square's initialisation
            signs = torch.randint(0, 2, (n, c, 1, w), generator=generator, device=x.device).to(x.dtype) * 2 - 1
            delta = eps * signs.expand(n, c, h, w).clone()
        else:
            delta = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            delta = eps * delta / _l2_norm(delta).clamp_min(1e-12)
        delta = (x + delta).clamp(0, 1) - x
        current = margin(model(x + delta), y)
        rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
        for i in range(1, queries):
            active = (current > 0).nonzero().squeeze(1)
            if len(active) == 0:
                break
            p = p_init * 0.5 ** sum(i > f * queries for f in (0.001, 0.005, 0.02, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8))
            side = max(1, min(h - 1, w - 1, round((p * h * w) ** 0.5)))  # inside both sides of any image
            m = len(active)
            top = torch.randint(0, h - side + 1, (m, 1), generator=generator, device=x.device)
            left = torch.randint(0, w - side + 1, (m, 1), generator=generator, device=x.device)
            window = (((rows >= top) & (rows < top + side))[:, :, None]
                      & ((cols >= left) & (cols < left + side))[:, None, :])[:, None]  # m×1×H×W
            old = delta[active]
            if norm == "linf":
                values = eps * (torch.randint(0, 2, (m, c, 1, 1), generator=generator, device=x.device) * 2 - 1)
                new = torch.where(window, values.to(x.dtype), old)
            else:
                patch = torch.randn(old.shape, generator=generator, device=x.device, dtype=x.dtype) * window
                new = old + patch * (eps * (side * side / (h * w)) ** 0.5 / _l2_norm(patch).clamp_min(1e-12))
                new = new * (eps / _l2_norm(new).clamp_min(1e-12)).clamp(max=1)
            new = (x[active] + new).clamp(0, 1) - x[active]
            candidate = margin(model(x[active] + new), y[active])
            better = candidate < current[active]
            delta[active[better]] = new[better]
            current[active[better]] = candidate[better]
        return (x + delta).clamp(0, 1)


# ---------------------------------------------------------------------------------------------- single checks

def _input_grad(model, x, y, batch_size: int) -> torch.Tensor:
    grads = []
    for s in range(0, len(x), batch_size):
        xb = x[s:s + batch_size].clone().requires_grad_(True)
        loss = F.cross_entropy(model(xb), y[s:s + batch_size], reduction="sum")
        grads.append(torch.autograd.grad(loss, xb)[0].detach())
    return torch.cat(grads)


def _nearby(x, norm: str, radius: float, generator) -> torch.Tensor:
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    step = radius * (noise.sign() if norm == "linf" else noise / _l2_norm(noise).clamp_min(1e-12))
    return (x + step).clamp(0, 1)


def _cosine(a, b) -> torch.Tensor:
    """Per-row cosine of two gradients, each row scaled by its largest entry first: the gradients of a confident
    model, 1e-20 and smaller in float32, gave cosines of 1e14 or 0 (their squares underflow), and a mean of them
    passed a randomized model's repeat test."""
    a, b = (v.flatten(1).double() for v in (a, b))
    a, b = (v / v.abs().amax(1, keepdim=True).clamp_min(1e-300) for v in (a, b))
    return F.cosine_similarity(a, b, dim=1)


def check_deterministic(model, x, *, batch_size: int = 500) -> Check:
    """Two forward passes in eval mode must agree; otherwise the defence is randomized and needs EOT."""
    with attack_mode(model), torch.no_grad():
        diff, scale, flips = 0.0, 0.0, 0
        for s in range(0, len(x), batch_size):
            a, b = model(x[s:s + batch_size]), model(x[s:s + batch_size])
            diff = max(diff, (a - b).abs().max().item())
            scale = max(scale, a.abs().max().item())
            flips += (a.argmax(1) != b.argmax(1)).sum().item()
    passed = diff <= 1e-5 * (1 + scale)  # room for non-deterministic GPU kernels, none for randomness
    detail = ("two forward passes gave identical logits" if passed else
              f"two forward passes differ (max |Δlogit| {diff:.3g}, {flips} of {len(x)} predictions flip): "
              "a randomized defence; attack it with EOT (averaged gradients)")
    return Check("deterministic", passed, detail, {"max_abs_diff": diff, "prediction_flips": flips})


def check_gradients(model, x, y, *, norm: str, eps: float, batch_size: int = 500, seed: int = 0,
                    max_zero_fraction: float = 0.1, min_repeat_cosine: float = 0.99,
                    min_nearby_cosine: float = 0.2) -> Check:
    """Cross-entropy input gradients: not NaN, not zero, the same on a repeated call, and similar at a point
    ε/10 away (a random or shattered gradient points somewhere else every time)."""
    g = torch.Generator(x.device).manual_seed(seed)
    with attack_mode(model):
        g0 = _input_grad(model, x, y, batch_size)
        again = _input_grad(model, x, y, batch_size)
        near = _input_grad(model, _nearby(x, norm, eps / 10, g), y, batch_size)
    finite = torch.isfinite(g0).flatten(1).all(1) & torch.isfinite(near).flatten(1).all(1)
    nonzero = finite & (g0.flatten(1).abs().amax(1) > 0)
    usable = nonzero & (near.flatten(1).abs().amax(1) > 0)
    nan_fraction = 1 - fraction(finite)
    zero_fraction = fraction(finite & ~nonzero)
    repeat = _cosine(g0[nonzero], again[nonzero]).mean().item() if nonzero.any() else float("nan")
    nearby = _cosine(g0[usable], near[usable]).median().item() if usable.any() else float("nan")
    problems = []
    if nan_fraction > 0:
        problems.append(f"{100 * nan_fraction:.1f}% of gradients are NaN or infinite")
    if zero_fraction > max_zero_fraction:
        problems.append(f"{100 * zero_fraction:.1f}% of gradients are exactly zero "
                        "(non-differentiable step or saturated softmax)")
    if repeat < min_repeat_cosine:  # NaN (no usable gradient) compares False: zeros are reported above
        problems.append(f"repeated calls give different gradients (cosine {repeat:.2f})")
    if nearby < min_nearby_cosine:
        problems.append(f"gradients at points ε/10 apart are unrelated (median cosine {nearby:.2f})")
    detail = "; ".join(problems) if problems else (
        f"no NaN, {100 * zero_fraction:.1f}% zero, repeat cosine {repeat:.2f}, nearby cosine {nearby:.2f}")
    values = {"nan_fraction": nan_fraction, "zero_fraction": zero_fraction, "repeat_cosine": repeat,
              "nearby_cosine": nearby}
    return Check("gradients", not problems, detail, values)


def _pct(a: float) -> str:
    return f"{100 * a:.1f}%"


def check_eps_monotonic(eps_values, accuracies, *, tolerance: float) -> Check:
    """Robust accuracy must not rise with ε (a larger ball contains the smaller one)."""
    rises = [(e0, a0, e1, a1) for (e0, a0), (e1, a1) in zip(zip(eps_values, accuracies),
                                                            zip(eps_values[1:], accuracies[1:])) if a1 > a0 + tolerance]
    if rises:
        e0, a0, e1, a1 = max(rises, key=lambda r: r[3] - r[1])
        detail = f"accuracy rises from {_pct(a0)} at ε={e0:.4g} to {_pct(a1)} at ε={e1:.4g}: the attack is failing"
    elif accuracies[-1] < accuracies[0] - tolerance:
        detail = (f"accuracy falls from {_pct(accuracies[0])} at ε={eps_values[0]:.4g} to "
                  f"{_pct(accuracies[-1])} at ε={eps_values[-1]:.4g}")
    else:  # not a failure of this check (a tiny ε may change nothing), but no reader should take it for a fall
        detail = (f"accuracy stays at {_pct(accuracies[0])}–{_pct(accuracies[-1])} from ε={eps_values[0]:.4g} to "
                  f"ε={eps_values[-1]:.4g}: the attack lowers nothing; unless ε is tiny, see `large_eps`")
    return Check("eps_monotonic", not rises, detail, {"eps": list(eps_values), "accuracy": list(accuracies)})


def check_large_eps(large_eps: float, acc: float, *, max_accuracy: float) -> Check:
    """With an ε that lets pixels go almost anywhere, every image can be changed into another class."""
    passed = acc <= max_accuracy
    detail = (f"{_pct(acc)} accuracy at ε={large_eps:.4g}" +
              ("" if passed else f", above {_pct(max_accuracy)}: the attack cannot even win unbounded, "
                                 "its gradients are not usable"))
    return Check("large_eps", passed, detail, {"eps": large_eps, "accuracy": acc})


def check_single_step(single: float, iterative: float, *, tolerance: float) -> Check:
    passed = single >= iterative - tolerance
    detail = (f"single step {_pct(single)} vs iterative {_pct(iterative)}" +
              ("" if passed else ": the iterative attack gets lost (masked or very curved loss)"))
    return Check("single_step", passed, detail, {"single_step": single, "iterative": iterative})


def check_convergence(base: float, longer: float, restarted: float, *, steps: int, long_steps: int, restarts: int,
                      tolerance: float) -> Check:
    drop = base - min(longer, restarted)
    passed = drop <= tolerance
    detail = (f"PGD-{steps} {_pct(base)}, PGD-{long_steps} {_pct(longer)}, PGD-{steps}×{restarts} restarts "
              f"{_pct(restarted)}" + ("" if passed else
                                      f": {100 * drop:.1f} points lower, the standard budget has not converged"))
    return Check("convergence", passed, detail, {"base": base, "long": longer, "restarts": restarted,
                                                 "steps": steps, "long_steps": long_steps, "n_restarts": restarts})


def check_black_box(white_mask: torch.Tensor, combined_mask: torch.Tensor, *, tolerance: float,
                    name: str = "black_box", attack: str = "the black-box attack", white: str = "white-box") -> Check:
    """A gradient-free attack should not break images that the white-box attacks could not.

    white_mask: robust to the white-box attacks; combined_mask: robust to those and the black-box ones.
    """
    only_black = fraction(white_mask & ~combined_mask)
    white_acc, combined = fraction(white_mask), fraction(combined_mask)
    passed = only_black <= tolerance
    detail = (f"{white} {_pct(white_acc)}; {attack} broke a further {_pct(only_black)} of images"
              + ("" if passed else ": the white-box gradients are masked"))
    return Check(name, passed, detail, {"white_box": white_acc, "with_black_box": combined,
                                        "only_black_box": only_black})


def check_autoattack_square(broken_by: torch.Tensor, *, tolerance: float = AUTOATTACK_SQUARE_TOLERANCE) -> Check:
    """The black-box check on a finished AutoAttack run, at no extra cost: Square, its last and only gradient-free
    stage, should break (almost) nothing that its white-box stages left robust.

    broken_by: `AutoAttackResult.broken_by`. Unlike the two-attack comparison of `check_black_box` this counts
    real adversarial examples, so no noise margin is needed.
    """
    robust = broken_by.eq(ROBUST)
    return check_black_box(robust | broken_by.eq(STAGES.index("square")), robust,
                           tolerance=tolerance, name="autoattack_square",
                           attack=f"Square (AutoAttack's stage, {len(broken_by)} images)")


def check_smooth_gradients(exact_mask: torch.Tensor, smooth_mask: torch.Tensor, *, steps: int, tau: float,
                           tolerance: float = SMOOTH_GRADIENT_TOLERANCE) -> Check:
    """Images that PGD breaks with ReLU's gradient smoothed but not with the model's own gradients: ReLU units
    switching near the data hide the loss from the exact-gradient attacks (`robustlab.attacks.smooth`).

    exact_mask: robust to the white-box attacks and to margin PGD; smooth_mask: robust to those and to the
    same PGD with smooth ReLU gradients.
    """
    return check_black_box(exact_mask, smooth_mask, tolerance=tolerance, name="smooth_gradients",
                           attack=f"PGD-{steps} with smooth ReLU gradients (τ = {tau:g})",
                           white="white-box with margin PGD")


# ---------------------------------------------------------------------------------------------- all together

def _as_dict(attacks, default_name: str) -> dict[str, Attack]:
    if attacks is None:
        return {}
    return dict(attacks) if isinstance(attacks, dict) else {default_name: attacks}


def default_large_eps(norm: str, eps: float) -> float:
    """An ε at which no classifier should keep accuracy: 8ε (at least half the pixel range for L∞)."""
    return min(1.0, max(0.5, 8 * eps)) if norm == "linf" else 8 * eps


def sanity_checks(model, x: torch.Tensor, y: torch.Tensor, *, norm: str, eps: float,
                  attacks: dict[str, Attack] | Attack | None = None,
                  black_box: dict[str, Attack] | Attack | None = None,
                  steps: int = 20, long_steps: int | None = None, restarts: int = 5,
                  eps_factors=(0.25, 0.5, 1.0, 1.5, 2.0), large_eps: float | None = None,
                  black_box_queries: int = 500, tolerance: float = 0.03, black_box_tolerance: float = BLACK_BOX_TOLERANCE,
                  large_eps_max_accuracy: float = 0.05,
                  smooth_tau: float | None = SMOOTH_GRADIENT_TAU, batch_size: int = 500, seed: int = 0,
                  progress: bool = False, device=None) -> SanityReport:
    """Run every check on (x, y) — floats in [0, 1] — for the threat (norm, ε).

    attacks: the white-box attacks of the evaluation (default PGD-`steps`); accuracy counts an image as robust
    only if it survives all of them. black_box: gradient-free attacks (default `random_search` with
    `black_box_queries`; pass Square). The convergence check compares PGD-`steps` with PGD-`long_steps`
    (default 10×) and with `restarts` random restarts. `tolerance` is the accuracy difference (a fraction)
    tolerated before a comparison fails; keep it above the noise of the set (use ≥ 200 images).
    `black_box_tolerance`: the share of images that only the black-box attacks break (real adversarial examples,
    no noise to allow for) before the black-box check fails. smooth_tau:
    the temperature of the smooth-gradient check (None skips it; so does a model without nn.ReLU modules).
    """
    check_choice("norm", norm, NORMS)
    if not eps > 0:
        raise RobustlabError(f"eps must be > 0 for the sanity checks, got {eps}")
    if len(x) != len(y) or len(x) == 0:
        raise RobustlabError(f"sanity checks need matching non-empty images and labels, got {len(x)} and {len(y)}")
    if batch_size < 1:
        raise RobustlabError(f"batch_size must be >= 1, got {batch_size}")
    y = check_batch(x, y, model=model)  # float images in [0, 1], integer labels (as int64)
    device = device or model_device(model)  # the images go where the model is
    x, y = x.to(device), y.to(device)
    long_steps = long_steps or 10 * steps
    large_eps = large_eps if large_eps is not None else default_large_eps(norm, eps)
    base = partial(pgd, norm=norm, steps=steps)
    white = _as_dict(attacks, "white-box") or {f"PGD-{steps}": base}
    black = _as_dict(black_box, "black-box") or {
        f"random search ({black_box_queries} queries)": partial(random_search, norm=norm, queries=black_box_queries)}

    everyone = torch.ones(len(y), dtype=torch.bool, device=device)

    def robust(attack, e, among=everyone):
        """Per-image robustness under `attack` at ε = e, attacking only the images in mask `among`
        (the others count as broken: no need to attack what is already misclassified)."""
        idx = among.nonzero().squeeze(1)
        fn = None if attack is None else partial(_at_eps, attack, e)
        mask = torch.zeros_like(among)
        mask[idx] = correct_mask(model, x[idx], y[idx], attack=fn, batch_size=batch_size, device=device,
                                 seed=seed).to(device)
        return mask

    clean = robust(None, 0)

    def ensemble(attacks_, e, among=clean):
        """Robust to every attack; each attack only runs on the images that the earlier ones left."""
        mask = among.clone()
        for attack in attacks_.values():
            if mask.any():
                mask = robust(attack, e, mask)
        return mask

    checks: list[Check] = []
    # Every check in TITLES but autoattack_square, which the suite adds from AutoAttack's own stages.
    bar = progress_bar(total=len(TITLES) - 1, desc="sanity checks", unit="check", show=bool(progress), leave=False)

    def add(check: Check):
        checks.append(check)
        bar.update()

    add(check_deterministic(model, x, batch_size=batch_size))
    add(check_gradients(model, x, y, norm=norm, eps=eps, batch_size=batch_size, seed=seed))

    eps_values = sorted({0.0, eps, *(f * eps for f in eps_factors if norm != "linf" or f * eps <= 1)})
    masks = {e: ensemble(white, e) if e > 0 else clean for e in eps_values}
    add(check_eps_monotonic(eps_values, [fraction(m) for m in masks.values()], tolerance=tolerance))
    add(check_large_eps(large_eps, fraction(ensemble(white, large_eps)),
                        max_accuracy=large_eps_max_accuracy))

    base_acc = fraction(masks[eps] if attacks is None else robust(base, eps, clean))
    one_step = partial(_one_step, norm=norm)
    add(check_single_step(fraction(robust(one_step, eps, clean)), base_acc, tolerance=tolerance))
    longer = fraction(robust(partial(pgd, norm=norm, steps=long_steps), eps, clean))
    restarted = fraction(robust(partial(pgd, norm=norm, steps=steps, restarts=restarts), eps, clean))
    add(check_convergence(base_acc, longer, restarted, steps=steps, long_steps=long_steps, restarts=restarts,
                          tolerance=tolerance))
    add(check_black_box(masks[eps], ensemble(black, eps, among=masks[eps]), tolerance=black_box_tolerance,
                        attack=" then ".join(black)))
    if smooth_tau is not None and relu_count(model):
        margin_pgd = partial(pgd, norm=norm, steps=SMOOTH_GRADIENT_STEPS, step_size=eps / 10, loss_fn=negative_margin)
        exact = ensemble({"margin PGD": margin_pgd}, eps, among=masks[eps])
        smooth = partial(pgd_smooth, norm=norm, steps=SMOOTH_GRADIENT_STEPS, step_size=eps / 10, tau=smooth_tau)
        add(check_smooth_gradients(exact, ensemble({"smooth": smooth}, eps, among=exact),
                                   steps=SMOOTH_GRADIENT_STEPS, tau=smooth_tau))
    else:
        add(skipped("smooth_gradients", "disabled" if smooth_tau is None else
                    "the model has no nn.ReLU modules (a ReLU called as a function cannot be smoothed)"))
    bar.close()
    return SanityReport(checks)


def _at_eps(attack, eps, model, x, y, generator=None):
    """`attack` at a fixed ε, in the (model, x, y, generator=) form that correct_mask calls."""
    return attack(model, x, y, eps=eps, generator=generator)


def _one_step(model, x, y, *, eps, norm, generator=None):
    """FGSM (L∞) or FGM (L2) in the attack calling convention."""
    return (fgsm if norm == "linf" else fgm)(model, x, y, eps=eps)
