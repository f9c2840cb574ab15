"""FGSM and PGD (L∞, L2) for any tinygrad callable that maps inputs in [0, 1] to logits.

Gradients are taken for the input only, with `loss.gradient(x_adv)`: unlike `backward()`, that
writes no `.grad` on any tensor, so the model's parameter gradients are never touched. The model
runs under `Context(TRAINING=0)` (tinygrad's eval mode: no dropout, BatchNorm running statistics
used and not updated), and the caller's TRAINING setting is restored on exit.

Every iterate is projected onto the ε-ball around x and onto [0, 1] (clipping
only in the forward pass would give saturated pixels zero gradient and weaken the attack).
Random starts are drawn with numpy from `seed`, so a figure does not depend on tinygrad's global RNG.
"""
from __future__ import annotations

import numpy as np

from robustlab.attacks.threat import NORMS, check_budget, check_size, not_logits
from robustlab.errors import RobustlabError, check_choice
from robustlab.tinygrad.backend import capture_first_call, require

require()
from tinygrad import Context, Tensor, dtypes  # noqa: E402
from tinygrad.nn.state import get_parameters  # noqa: E402


# -- inputs --------------------------------------------------------------------------------------
def as_inputs(x, y) -> tuple[Tensor, Tensor]:
    """(x, y) as realized tinygrad tensors: float32 pixels in [0, 1] and int32 labels."""
    if isinstance(x, Tensor):
        if not dtypes.is_float(x.dtype):
            raise RobustlabError(f"x must hold float pixels in [0, 1], got dtype {x.dtype}; divide uint8 images by 255")
        x = x.cast(dtypes.float32).contiguous().realize()
    else:
        array = np.asarray(x)
        if array.dtype.kind != "f":
            raise RobustlabError(f"x must hold float pixels in [0, 1], got dtype {array.dtype}; divide uint8 images by 255")
        x = Tensor(np.ascontiguousarray(array, np.float32))
    labels = y.numpy() if isinstance(y, Tensor) else np.asarray(y)
    if labels.dtype.kind not in "iu" or (labels.size and labels.min() < 0):  # a cast would truncate 0.7 to class 0
        raise RobustlabError(f"y must hold integer class indices >= 0, got dtype {labels.dtype}")
    y = Tensor(np.ascontiguousarray(labels, np.int32))
    if x.ndim < 2 or y.shape != (x.shape[0],):
        raise RobustlabError(f"x must be a batch N×... and y its N labels; got x {tuple(x.shape)}, y {tuple(y.shape)}")
    if (x != x).any().item():  # NaN: tinygrad's min and max pass over it
        raise RobustlabError("x holds NaN values; it must hold images in [0, 1]")
    lo, hi = float(x.min().item()), float(x.max().item())
    if lo < -1e-6 or hi > 1 + 1e-6:  # the PyTorch attacks' tolerance (threat.check_in_box)
        raise RobustlabError(f"x must lie in [0, 1] (the model normalizes inside); got values in [{lo:.7g}, {hi:.7g}]")
    return x, y


def check_labels(logits: Tensor, y: Tensor):
    """Labels beyond the model's classes: tinygrad's one-hot cross-entropy would score them as 0, silently."""
    check_logits(logits)
    if y.shape[0] and int(y.max().item()) >= logits.shape[1]:
        raise RobustlabError(f"y holds class {int(y.max().item())} but the model has {logits.shape[1]} outputs")


def check_logits(logits) -> Tensor:
    if not isinstance(logits, Tensor) or len(logits.shape) != 2:  # (logits, features), {"logits": ...}
        raise not_logits(logits)
    return logits


def _like(result: Tensor, original):
    """Give back the caller's kind: a tinygrad Tensor for a Tensor, else a numpy array."""
    return result if isinstance(original, Tensor) else result.numpy()


def _check_budget(eps, steps, restarts, step_size):
    check_budget(eps, steps, restarts)
    if step_size is not None:
        check_size("step size", step_size)


# -- the threat model, in tinygrad ----------------------------------------------------------------
def _per_example(t: Tensor, values: Tensor) -> Tensor:
    """Reshape per-example `values` (N) to broadcast against `t` (N×...)."""
    return values.reshape(t.shape[0], *([1] * (t.ndim - 1)))


def l2_norms(t: Tensor) -> Tensor:
    return _per_example(t, t.flatten(1).square().sum(1).sqrt())


def project(x_adv: Tensor, x: Tensor, norm: str, eps: float) -> Tensor:
    """The nearest point of the ε-ball around x (for L2: radial shrink), then clipped to [0, 1]."""
    if norm == "linf":
        return x_adv.maximum(x - eps).minimum(x + eps).clip(0, 1)
    delta = x_adv - x
    factor = (eps / l2_norms(delta).maximum(1e-12)).minimum(1.0)
    return (x + delta * factor).clip(0, 1)


def ascent_step(x_adv: Tensor, grad: Tensor, norm: str, step_size: float) -> Tensor:
    if norm == "linf":
        return x_adv + step_size * grad.sign()
    return x_adv + step_size * grad / l2_norms(grad).maximum(1e-12)


def random_delta(shape, norm: str, eps: float, rng: np.random.Generator) -> np.ndarray:
    """A random start offset: uniform in the L∞ cube, or uniform in the L2 ball (Gaussian direction, radius ε·U^(1/d))."""
    if norm == "linf":
        return ((2 * rng.random(shape, dtype=np.float32) - 1) * eps).astype(np.float32)
    direction = rng.standard_normal(shape, dtype=np.float32)
    direction /= np.maximum(np.linalg.norm(direction.reshape(shape[0], -1), axis=1), 1e-12).reshape(-1, *([1] * (len(shape) - 1)))
    d = int(np.prod(shape[1:]))
    radius = rng.random(shape[0], dtype=np.float32) ** (1.0 / d)
    return (direction * (eps * radius).reshape(-1, *([1] * (len(shape) - 1)))).astype(np.float32)


def input_gradient(model, x_adv: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """(∇ₓ of the summed cross-entropy, logits): the gradient of the input alone, no `.grad` written."""
    logits = model(x_adv)
    loss = logits.sparse_categorical_crossentropy(y, reduction="sum")
    (grad,) = loss.gradient(x_adv)
    return grad, logits


def pgd_steps(model, x: Tensor, y: Tensor, x_start: Tensor, *, norm: str, eps: float, steps: int,
              step_size: float, realize_each: bool = True) -> Tensor:
    """The training form: `steps` projected ascent steps from `x_start`, returning the last iterate.

    realize_each=False keeps all steps in one lazy graph (what a TinyJit capture wants).
    """
    x_adv = x_start
    for _ in range(steps):
        grad, _ = input_gradient(model, x_adv, y)
        x_adv = project(ascent_step(x_adv, grad, norm, step_size), x, norm, eps).detach()
        if realize_each:
            x_adv = x_adv.realize()
    return x_adv


# -- public attacks -------------------------------------------------------------------------------
def pgd(model, x, y, *, eps: float, norm: str = "linf", steps: int = 10, step_size: float | None = None,
        random_start: bool = True, restarts: int = 1, seed: int = 0, jit: bool = True):
    """Evaluation PGD, as robustlab.attacks.pgd: the worst case per example over `restarts` runs.

    Per example, the first iterate that the model misclassifies is kept (any iterate in the ball
    is a valid adversarial example), the clean input counting as the first (an example already
    misclassified comes back as it is), else the last. Restarts after the first start at random and
    count only for the examples that earlier ones did not break. Unlike the PyTorch version, a
    restart runs on the whole batch: one batch shape means tinygrad lowers the kernels once
    (a new shape per restart cost ~20 s of lowering each), for ~20% more arithmetic.
    step_size defaults to 2.5·ε/steps (Madry et al.). Returns the kind of x it was given: a
    tinygrad Tensor, or a numpy array for anything else. jit=False runs every step eagerly, for
    a model that TinyJit cannot capture (one that reads values back to Python mid-forward).
    """
    check_choice("norm", norm, NORMS)
    _check_budget(eps, steps, restarts, step_size)
    step_size = 2.5 * eps / steps if step_size is None else step_size
    xt, yt = as_inputs(x, y)
    rng = np.random.default_rng(seed)
    with Context(TRAINING=0):
        logits = model(xt)
        check_labels(logits, yt)
        fooled_at_x = logits.argmax(1).numpy() != yt.numpy()
        best, broken = None, fooled_at_x.copy()
        for r in range(restarts):
            adv, fooled = _one_run(model, xt, yt, norm=norm, eps=eps, steps=steps, step_size=step_size,
                                   random=random_start or r > 0, rng=rng, jit=jit)
            best = adv if best is None else np.where(_per_example_np(adv, ~broken), adv, best)
            broken |= fooled
            if broken.all():
                break
    best = np.where(_per_example_np(best, fooled_at_x), xt.numpy(), best)
    return _like(Tensor(best), x)


def _per_example_np(a: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return mask.reshape(-1, *([1] * (a.ndim - 1)))


def _one_run(model, x: Tensor, y: Tensor, *, norm, eps, steps, step_size, random, rng, jit):
    """One PGD run with keep-best; returns (adversarial inputs, fooled mask) as numpy arrays.

    The state (iterate, best iterate, fooled flags) lives in three buffers that each step
    updates in place, so with `jit` the step is captured once by TinyJit and replayed: tinygrad's
    per-step graph work (~0.2 s here) is then paid once, not for every step.
    """
    start = (x + Tensor(random_delta(x.shape, norm, eps, rng))).clip(0, 1) if random else x
    x_adv, best = start.clone().realize(), start.clone().realize()  # own buffers: both are assigned in place
    done = Tensor.zeros(x.shape[0], dtype=dtypes.bool).contiguous().realize()

    def step(x_adv, best, done, x, y):
        grad, logits = input_gradient(model, x_adv, y)
        fooled = (logits.argmax(1) != y) & done.logical_not()
        best.assign(_per_example(x_adv, fooled).where(x_adv, best))
        done.assign(done | fooled)
        x_adv.assign(project(ascent_step(x_adv, grad, norm, step_size), x, norm, eps).detach())
        Tensor.realize(best, done, x_adv)

    run = capture_first_call(step, get_parameters(model)) if jit and steps > 1 else step
    for _ in range(steps):
        run(x_adv, best, done, x, y)
    fooled = (model(x_adv).argmax(1) != y) & done.logical_not()  # the final iterate counts too
    best = _per_example(x_adv, fooled).where(x_adv, best)
    done = done | fooled
    done_np = done.numpy()
    return np.where(_per_example_np(x_adv.numpy(), done_np), best.numpy(), x_adv.numpy()), done_np


def fgsm(model, x, y, eps: float):
    """Fast gradient sign method (Goodfellow et al. 2015): one L∞ step of size ε from x."""
    return pgd(model, x, y, eps=eps, norm="linf", steps=1, step_size=eps, random_start=False)


def fgm(model, x, y, eps: float):
    """Fast gradient method: one step of L2 length ε along the normalized gradient."""
    return pgd(model, x, y, eps=eps, norm="l2", steps=1, step_size=eps, random_start=False)
