"""Threat models as small steps (after MadryLab's robustness): random start, ascent step, projection.

Every method keeps the iterate inside both the ε-ball around `x` and the valid box [0, 1].
Clipping only in the forward pass would give saturated pixels zero gradient forever.
"""
from __future__ import annotations

import math

import torch

from robustlab.errors import RobustlabError, check_choice, check_integer
from robustlab.models import eval_mode

NORMS = ("linf", "l2")


def per_example(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-example vector so that it broadcasts against a batch shaped like `like`."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def lp_norm(t: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-example L∞ or L2 norm of a batch."""
    flat = t.flatten(1)
    return flat.abs().amax(1) if norm == "linf" else flat.norm(dim=1)


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Back into the ε-ball around x, then into [0, 1] (clipping to the box only shrinks |δ|)."""
    if norm == "linf":
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
    else:
        delta = x_adv - x
        x_adv = x + delta * per_example((eps / lp_norm(delta, "l2").clamp_min(1e-12)).clamp(max=1.0), delta)
    return x_adv.clamp(0, 1)


def l2_unit(t: torch.Tensor) -> torch.Tensor:
    """Each example scaled to L2 norm 1 (a zero one stays zero)."""
    return t / per_example(lp_norm(t, "l2").clamp_min(1e-12), t)


class LinfBall:
    def __init__(self, eps: float, step_size: float):
        self.eps, self.step_size = eps, step_size

    def random_start(self, x, generator=None, box=True):
        """A uniform point of the ball around x, clipped to [0, 1] unless `box` is False (Fast-AT steps from it)."""
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        start = x + (2 * noise - 1) * self.eps
        return start.clamp(0, 1) if box else start

    def step(self, x_adv, grad):
        return x_adv + self.step_size * grad.sign()

    def project(self, x_adv, x):
        return project(x_adv, x, self.eps, "linf")


class L2Ball:
    def __init__(self, eps: float, step_size: float):
        self.eps, self.step_size = eps, step_size

    def random_start(self, x, generator=None, box=True):
        # Uniform in the ball: a Gaussian direction with radius eps·U^(1/d).
        direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        direction = l2_unit(direction)
        d = math.prod(x.shape[1:])  # x[0] fails on an empty batch
        radius = torch.rand(x.shape[0], generator=generator, device=x.device, dtype=x.dtype) ** (1.0 / d)
        start = x + direction * self.eps * per_example(radius, x)
        return self.project(start, x) if box else start

    def step(self, x_adv, grad):
        return x_adv + self.step_size * l2_unit(grad)

    def project(self, x_adv, x):
        return project(x_adv, x, self.eps, "l2")


def check_size(name: str, value: float):
    """ε and step sizes: finite and >= 0 (nan compares False with everything, so `value < 0` lets it through)."""
    if not (value >= 0 and math.isfinite(value)):
        raise RobustlabError(f"{name} must be a finite number >= 0, got {value}")


def check_budget(eps: float, steps: int, restarts: int = 1, *, eps_positive: bool = False):
    """An attack's ε (>= 0, or > 0 where a zero ball means nothing to search) and its integer step and restart
    counts (>= 1: `range(2.5)` and `"3" < 1` would fail as TypeErrors deep inside)."""
    check_size("eps", eps)
    if eps_positive and eps == 0:
        raise RobustlabError("eps must be > 0, got 0")
    for name, value in (("steps", steps), ("restarts", restarts)):
        check_integer(name, value)


def check_batch(x: torch.Tensor, y: torch.Tensor, tol: float = 1e-6, gradients: bool = True,
                model: torch.nn.Module | None = None) -> torch.Tensor:
    """What every attack takes: float images in [0, 1] and one integer label >= 0 per image; returns the labels as
    int64, the type the losses and `gather` need (idx files hold uint8). The most common misuse, normalized
    inputs, fails here with its cause instead of giving wrong numbers (`tol` lets through the rounding of images
    computed in floating point). An attack that takes `gradients` cannot run under torch.inference_mode(), which
    torch.enable_grad() does not lift."""
    if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):  # numpy arrays, lists
        raise RobustlabError(f"attacks take torch tensors, got images as {type(x).__name__} and labels as "
                             f"{type(y).__name__} (torch.as_tensor converts them)")
    if gradients and torch.is_inference_mode_enabled():
        raise RobustlabError("gradient attacks cannot run under torch.inference_mode(); call them outside it "
                             "(torch.no_grad() is fine)")
    if not x.is_floating_point():
        hint = " (uint8 images: divide by 255)" if x.dtype == torch.uint8 else ""
        raise RobustlabError(f"attack inputs must be float images in [0, 1], got {x.dtype}{hint}")
    if y.shape != (len(x),) or y.is_floating_point() or y.is_complex():
        raise RobustlabError(f"attacks take one integer label per image: {len(x)} images, labels {y.dtype} "
                             f"{tuple(y.shape)}")
    check_in_box(x, "attack inputs", tol)
    if len(y) and int(y.min()) < 0:
        raise RobustlabError(f"attack labels must be class indices >= 0, got {int(y.min())}")
    if model is not None:
        check_model_takes(model, x)
    return y.long()


def check_model_takes(model: torch.nn.Module, x: torch.Tensor):
    """A model whose weights are all of another float type than the images failed deep inside the attack, in
    torch's "Input type (float) and bias type (c10::Half) should be the same". Such a model may still take the
    images (it casts them itself, or runs under autocast): one image through it decides."""
    weights = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if not weights or x.dtype in weights or not len(x) or torch.is_autocast_enabled(x.device.type):
        return
    try:
        with eval_mode(model), torch.no_grad():
            model(x[:1])
    except RuntimeError as exc:
        names = ", ".join(sorted(str(d).removeprefix("torch.") for d in weights))
        raise RobustlabError(f"the model's weights are {names} and it fails on {str(x.dtype).removeprefix('torch.')} "
                             f"images ({str(exc).splitlines()[0]}): call model.float() (for bf16 speed, torch.autocast "
                             f"with float32 weights) or pass images of the weights' type") from None


def check_label_vector(y, unit: str = "image"):
    """One integer label per `unit`, as a 1-D tensor: (N, 1) labels broadcast against the predictions, and float or
    list labels failed inside torch."""
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.is_floating_point():
        got = f"{y.dtype} {tuple(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
        raise RobustlabError(f"labels must be a tensor of one integer per {unit}, got {got}")


def not_logits(output) -> RobustlabError:
    """The error for a model whose output is not an N × classes tensor (of any framework)."""
    got = f"shape {tuple(output.shape)}" if hasattr(output, "shape") else f"a {type(output).__name__}"
    return RobustlabError(f"the model returns {got}; attacks need logits alone, N × classes (wrap a model that "
                          "returns more)")


def check_labels(logits: torch.Tensor, y: torch.Tensor):
    """Labels that index the model's outputs. One beyond them made APGD, FAB-T, Square and AutoAttack count the
    image as broken before any attack, and cross-entropy fail in an IndexError."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:  # (logits, features), {"logits": ...}
        raise not_logits(logits)
    if len(y) and int(y.max()) >= logits.shape[1]:
        raise RobustlabError(f"labels must index the model's {logits.shape[1]} outputs (0 to {logits.shape[1] - 1}), "
                             f"got {int(y.max())}")


def check_in_box(x: torch.Tensor, what: str, tol: float = 1e-6):
    """Float images in [0, 1], up to `tol`: normalized ones are refused with the cause, not scored wrongly."""
    if not x.numel():
        return
    low, high = (float(v) for v in x.detach().aminmax())  # images that require grad: no warning per call
    if math.isnan(low) or math.isnan(high):  # NaN compares False with both bounds
        raise RobustlabError(f"{what} hold NaN values; they must be images in [0, 1]")
    if low < -tol or high > 1 + tol:
        raise RobustlabError(f"{what} must lie in [0, 1] (normalization belongs inside the model), got values "
                             f"from {low:.3g} to {high:.3g}")


def make_threat(norm: str, eps: float, step_size: float):
    check_choice("norm", norm, NORMS)
    check_size("eps", eps)
    check_size("step size", step_size)
    return (LinfBall if norm == "linf" else L2Ball)(eps, step_size)


def within_ball(x_adv, x, norm: str, eps: float, tol: float = 1e-6) -> bool:
    """True when every example lies inside the ε-ball around `x` and inside [0, 1]."""
    in_box = bool((x_adv >= -tol).all() and (x_adv <= 1 + tol).all())
    delta = (x_adv - x).flatten(1)
    dist = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    return in_box and bool((dist <= eps + tol).all())
