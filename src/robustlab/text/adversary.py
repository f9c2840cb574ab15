"""Adversarial training of text classifiers in embedding space: FGM, PGD-K, FreeAT and FreeLB.

Words are discrete, so the perturbation δ is added to the output of the model's word-embedding module
(a forward hook), never to token ids and never to the embedding weights, which therefore need no
restoring. δ is zero on padding positions: the hook multiplies it by the padding mask, so its gradient
there is zero too. Norms are per example over the whole sequence (all tokens × all dimensions), as in
Miyato et al. and the FreeLB code, so ε is a budget for the sentence, in the embedding's own scale.

One object serves every method and every model that exposes its embedding module (robustlab's text
models and Hugging Face models through `get_input_embeddings()`); the model is called through a
closure, so any forward signature works:

    adversary = EmbeddingAdversary(model, "freelb")
    for ids, y in batches:
        loss, logits = adversary.step(lambda: model(ids), y, optimizer)
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from robustlab.attacks import attack_mode
from robustlab.attacks.threat import check_label_vector, check_labels, l2_unit, lp_norm, per_example
from robustlab.errors import RobustlabError, check_choice, is_integer

# Each method's options and their defaults (sources in the EmbeddingAdversary docstring).
DEFAULTS = {
    "fgm": {"eps": 0.6, "norm": "l2"},
    "pgd": {"eps": 0.6, "steps": 3, "step_size": 0.2, "norm": "l2"},
    "free-at": {"eps": 0.6, "replays": 2, "step_size": 0.1, "init_mag": 1.0, "norm": "l2"},
    "freelb": {"eps": 0.6, "steps": 3, "step_size": 0.1, "init_mag": 1.0, "norm": "l2"},
}
NORMS = ("l2", "linf")


def finite_at_least_zero(value) -> bool:
    """A number (a 0-d tensor too, as the image attacks take) in [0, ∞)."""
    try:
        return not isinstance(value, (bool, str)) and 0 <= float(value) < math.inf
    except (TypeError, ValueError, RuntimeError):  # float() of a list, or of a tensor of several numbers
        return False


def adversary_options(method: str, **options) -> dict:
    """The method's full options: its defaults overridden by `options` (None = default), validated."""
    check_choice("text adversarial method", method, DEFAULTS)
    given = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(given) - set(DEFAULTS[method]))
    if unknown:
        raise RobustlabError(f"method {method} takes no option {', '.join(unknown)}; "
                             f"its options: {', '.join(DEFAULTS[method])}")
    opts = {**DEFAULTS[method], **given}
    check_choice("norm", opts["norm"], NORMS)
    for name in ("steps", "replays"):
        if name in opts and not (is_integer(opts[name]) and opts[name] >= 1):  # 2.0 passed, then failed in range()
            raise RobustlabError(f"{name} must be a positive integer, got {opts[name]!r}")
    for name in ("eps", "step_size", "init_mag"):
        if name in opts and not finite_at_least_zero(opts[name]):
            raise RobustlabError(f"{name.replace('_', ' ')} must be a finite number >= 0, got {opts[name]!r}")
    if method in ("fgm", "pgd") and opts["eps"] <= 0:  # FreeLB and FreeAT read ε = 0 as "no bound"
        raise RobustlabError(f"eps must be > 0 for {method}, got {opts['eps']}")
    return opts


def input_embeddings(model: nn.Module, embedding: nn.Module | str | None = None) -> nn.Module:
    """The module whose output gets perturbed: `embedding` (a module or a submodule name), else the
    model's `get_input_embeddings()` (robustlab text models, Hugging Face models)."""
    if isinstance(embedding, nn.Module):
        return embedding
    if isinstance(embedding, str):
        try:
            return model.get_submodule(embedding)
        except AttributeError:
            raise RobustlabError(f"model has no submodule {embedding!r} to use as its embedding") from None
    getter = getattr(model, "get_input_embeddings", None)
    if getter is None:
        raise RobustlabError(f"{type(model).__name__} has no get_input_embeddings(); pass embedding=<module or name>")
    return getter()


def ascend(delta, grad, step_size: float, norm: str):
    """One ascent step: along g/‖g‖₂ per example (L2) or sign(g) (L∞)."""
    direction = l2_unit(grad) if norm == "l2" else grad.sign()
    return delta + step_size * direction


def project(delta, eps: float, norm: str):
    """Per-example projection onto the ε-ball; ε = 0 means no bound (FreeLB's max_norm = 0)."""
    if eps == 0:
        return delta
    if norm == "linf":
        return delta.clamp(-eps, eps)
    return delta * (eps / per_example(lp_norm(delta, "l2"), delta).clamp_min(1e-12)).clamp(max=1.0)


class _Hook:
    """Adds δ (masked) to the embedding output while attached. δ is made on the first forward pass,
    when its shape is known, by `init(output, mask)`; the caller then replaces it between passes."""

    def __init__(self, module: nn.Module, mask: torch.Tensor | None, init: Callable):
        self.module, self.given_mask, self.init = module, mask, init
        self.delta = self.mask = None

    def _mask(self, inputs, output):
        b, t = output.shape[:2]
        if self.given_mask is not None:
            mask = self.given_mask[:, :t]  # a model may trim trailing padding (robustlab's do)
        elif getattr(self.module, "padding_idx", None) is not None and inputs and inputs[0].shape == (b, t):
            mask = inputs[0] != self.module.padding_idx
        else:
            mask = torch.ones(b, t, device=output.device)
        if mask.shape != (b, t):
            raise RobustlabError(f"padding mask of shape {tuple(mask.shape)} does not fit the embedding output "
                                 f"{tuple(output.shape)}; pass a batch × tokens mask")
        return mask.to(output.dtype).unsqueeze(-1)

    def __call__(self, module, inputs, output):
        if self.mask is None:
            self.mask = self._mask(inputs, output)
        if self.delta is None:
            self.delta = self.init(output.detach(), self.mask).requires_grad_(True)
        if self.delta.shape != output.shape:
            raise RobustlabError(f"the embedding output changed shape between passes ({tuple(self.delta.shape)} -> "
                                 f"{tuple(output.shape)}); the embedding module must run once per forward pass")
        return output + self.delta * self.mask


def logits_of(output):
    """A forward pass's logits: the tensor itself, or a Hugging Face ModelOutput's `.logits`."""
    return output if isinstance(output, torch.Tensor) else getattr(output, "logits", output)


def check_class_labels(logits, y):
    """What cross-entropy needs, said in one line instead of torch's IndexError (a CUDA assert on a GPU): N × classes
    logits and one class index per example (reading the largest is a host sync)."""
    check_label_vector(y, "example")
    if isinstance(logits, torch.Tensor) and logits.dim() == 2 and len(logits) != len(y):
        raise RobustlabError(f"the forward pass gave logits for {len(logits)} examples but there are {len(y)} labels")
    check_labels(logits, y)


def _rng_state(device: torch.device):
    return (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(device: torch.device, state):
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class EmbeddingAdversary:
    """Embedding-space adversarial training for one model; `method` is fgm, pgd, free-at or freelb.

    Call `step(forward, y, optimizer)` once per minibatch, where `forward()` runs the model on the batch
    and returns logits (or an output with `.logits`, as Hugging Face models return): it zeroes the
    gradients, runs the method and steps the optimizer (FreeAT steps it m times). `backward(forward, y)`
    only accumulates the gradients, for loops that clip or accumulate them before their own
    `optimizer.step()` (every method but FreeAT, which must step between replays).
    Both return, detached, the mean of the losses whose gradients the parameters got (fgm and pgd: clean
    and adversarial; free-at and freelb: every pass) and the last pass's logits, so the train loss and
    accuracy logged mean the same for every method. The model runs in the mode the caller left it in.

    `mask` (batch × tokens, 1 for real tokens) marks what may be perturbed; without it the embedding's
    `padding_idx` decides, else every position is perturbed. `generator` draws the random starts.
    With the default loss, cross-entropy, the first minibatch's labels are checked against the model's
    outputs (`check_labels=False`: not at all, for a loop whose loader made them); a `loss_fn` of one's own
    takes whatever targets it takes.

    Methods and defaults (ε and step sizes are per-example norms over the sequence's embeddings):
    - fgm (Miyato et al., ICLR 2017): r = ε·g/‖g‖₂ at the clean point; the clean and adversarial
      losses' gradients are summed. ε = 0.6, FreeLB's per-example budget, so that all four methods
      share one budget by default. (The widely used FGM/PGD recipe for BERT fine-tuning says ε = 1, but
      normalises over the whole batch's embedding-matrix gradient, which is far less per example;
      Miyato et al. used 5.0 on embeddings normalised to unit variance per dimension, over sequences of
      hundreds of tokens.)
    - pgd: K ascent steps of size α from the clean gradient, projected onto the ε-ball; the parameters
      get the clean gradient plus the gradient at the last iterate (the recipe's "PGD": K = 3, α/ε = 0.3,
      here ε = 0.6 as above and α = 0.2, so that K steps can reach the boundary).
    - free-at (Shafahi et al., NeurIPS 2019, for text as in the FreeLB paper's baseline): the minibatch
      is replayed m times, one forward/backward and one optimizer step per replay, δ carried over between
      replays. m = 2, α = 0.1, init 1.0, ε = 0.6 (FreeLB's fairseq launch script for FreeAT on SST-2).
      Each replay's loss is taken whole, as in Shafahi et al.; the fairseq code divides it by
      1 + adv-steps (3 there), which under SGD is a learning rate a third as large.
    - freelb (Zhu et al., ICLR 2020): random start of magnitude init_mag/√(tokens·dim) per element
      (uniform, padding zero), K ascent steps, the parameters' gradients averaged over all K passes
      (each loss divided by K), per-example projection onto max_norm = ε (0: none), and the same dropout
      masks in all K passes (the RNG state is restored before each). K = 3, α = 0.1, init 1.0, ε = 0.6
      (FreeLB's fairseq launch script for SST-2: adv-steps 2, which its code runs as 3 passes).
    L∞ (`norm="linf"`) ascends along sign(g) (the FreeLB code divides g by its largest entry instead).
    """

    def __init__(self, model: nn.Module, method: str = "freelb", *, embedding: nn.Module | str | None = None,
                 loss_fn: Callable | None = None, generator: torch.Generator | None = None, check_labels: bool = True,
                 **options):
        self.method = method
        self.options = adversary_options(method, **options)
        self.model, self.embedding = model, input_embeddings(model, embedding)
        self.loss_fn = loss_fn or F.cross_entropy
        # A private generator: random starts must not draw from the global RNG, whose state FreeLB replays
        # for its dropout masks (and which plain training would otherwise see shifted).
        self.generator = generator if generator is not None else torch.Generator().manual_seed(torch.initial_seed())
        self._labels_checked = not check_labels or loss_fn is not None

    def __getattr__(self, name):  # adversary.eps, adversary.steps, ...
        options = self.__dict__.get("options", {})
        if name in options:
            return options[name]
        raise AttributeError(name)

    # -- building blocks -----------------------------------------------------------------------
    @contextlib.contextmanager
    def _attached(self, mask, init):
        hook = _Hook(self.embedding, mask, init)
        handle = self.embedding.register_forward_hook(hook)
        try:
            yield hook
        finally:
            handle.remove()

    @staticmethod
    def _zeros(output, mask):
        return torch.zeros_like(output)

    def _random_start(self, output, mask):
        """FreeLB's start: L2, uniform in [-1, 1] scaled by init_mag/√(real tokens · dim) (a norm of about
        init_mag/√3); L∞, uniform in [-init_mag, init_mag]. Zero on padding in both. Unlike the FreeLB code
        it is projected onto the ε-ball, so that every pass stays within the budget."""
        mag = self.options.get("init_mag", 0.0)
        if mag == 0:
            return torch.zeros_like(output)
        g = self.generator
        noise = torch.rand(output.shape, generator=g, device=g.device, dtype=output.dtype).to(output.device)
        noise = (2 * noise - 1) * mask
        if self.norm == "linf":
            return project(noise * mag, self.eps, self.norm)
        dims = mask.sum(dim=(1, 2), keepdim=True) * output.shape[-1]
        return project(noise * mag / dims.sqrt(), self.eps, self.norm)

    def _update(self, delta, grad, step_size):
        return project(ascend(delta, grad, step_size, self.norm), self.eps, self.norm)

    def _pass(self, forward, y):
        logits = logits_of(forward())
        if not self._labels_checked:  # the first batch shows a wrong label space; every batch would cost a sync
            check_class_labels(logits, y)
            self._labels_checked = True
        return self.loss_fn(logits, y), logits

    # -- the methods -------------------------------------------------------------------------
    def _fgm(self, forward, y, mask):
        with self._attached(mask, self._zeros) as hook:
            loss, logits = self._pass(forward, y)
            loss.backward()  # the clean gradient, for the parameters and for δ
            hook.delta = ascend(torch.zeros_like(hook.delta), hook.delta.grad, self.eps, self.norm).detach()
            adv_loss, adv_logits = self._pass(forward, y)
            adv_loss.backward()
        return (loss + adv_loss).detach() / 2, adv_logits.detach()

    def _pgd(self, forward, y, mask):
        with self._attached(mask, self._zeros) as hook:
            clean_loss, logits = self._pass(forward, y)
            clean_loss.backward()
            grad, delta = hook.delta.grad, torch.zeros_like(hook.delta)
            for k in range(self.steps):
                delta = self._update(delta, grad, self.step_size).detach()
                hook.delta = delta.requires_grad_(True)
                loss, logits = self._pass(forward, y)
                if k < self.steps - 1:  # δ's gradient only: the parameters keep the clean gradient
                    grad, = torch.autograd.grad(loss, hook.delta)
                else:
                    loss.backward()
        return (clean_loss + loss).detach() / 2, logits.detach()

    def _freelb(self, forward, y, mask, device):
        rng = _rng_state(device)
        total = 0.0
        with self._attached(mask, self._random_start) as hook:
            for k in range(self.steps):
                _set_rng_state(device, rng)  # the same dropout masks in every pass
                loss, logits = self._pass(forward, y)
                (loss / self.steps).backward()  # parameter gradients: the mean over the K passes
                total += loss.detach() / self.steps
                if k < self.steps - 1:
                    delta = self._update(hook.delta.detach(), hook.delta.grad, self.step_size)
                    hook.delta = delta.detach().requires_grad_(True)
        return total, logits.detach()

    def _free_at(self, forward, y, mask, optimizer):
        total = 0.0
        with self._attached(mask, self._random_start) as hook:
            for _ in range(self.replays):
                optimizer.zero_grad(set_to_none=True)
                loss, logits = self._pass(forward, y)
                loss.backward()  # the replay's one backward: parameter and δ gradients together
                optimizer.step()
                total += loss.detach() / self.replays
                delta = self._update(hook.delta.detach(), hook.delta.grad, self.step_size)
                hook.delta = delta.detach().requires_grad_(True)
        return total, logits.detach()

    # -- public --------------------------------------------------------------------------------
    def backward(self, forward: Callable[[], torch.Tensor], y: torch.Tensor, mask: torch.Tensor | None = None):
        """Accumulate the method's parameter gradients for one minibatch (no optimizer step)."""
        if self.method == "free-at":
            raise RobustlabError("free-at steps the optimizer between its replays: use step(forward, y, optimizer)")
        if self.method == "freelb":
            return self._freelb(forward, y, mask, next(self.model.parameters()).device)
        return {"fgm": self._fgm, "pgd": self._pgd}[self.method](forward, y, mask)

    def step(self, forward: Callable[[], torch.Tensor], y: torch.Tensor, optimizer: torch.optim.Optimizer,
             mask: torch.Tensor | None = None):
        """Zero the gradients, run the method on one minibatch and step the optimizer."""
        if self.method == "free-at":
            return self._free_at(forward, y, mask, optimizer)
        optimizer.zero_grad(set_to_none=True)
        result = self.backward(forward, y, mask)
        optimizer.step()
        return result


def embedding_pgd(model: nn.Module, forward: Callable[[], torch.Tensor], y: torch.Tensor, *, eps: float,
                  steps: int = 20, step_size: float | None = None, norm: str = "l2", mask=None,
                  embedding: nn.Module | str | None = None) -> torch.Tensor:
    """Evaluation attack: per example, True when the model is still right at every PGD iterate in the
    embedding ε-ball (starting from the clean point; an example wrong at any iterate counts as broken).

    Runs in eval mode with the parameters frozen (no parameter .grad is touched) and restores the
    caller's mode. Step size default 2.5·ε/steps (Madry et al.'s rule).
    """
    check_choice("norm", norm, NORMS)
    if not (finite_at_least_zero(eps) and eps > 0 and is_integer(steps) and steps >= 1):
        raise RobustlabError(f"embedding PGD needs a finite eps > 0 and an integer steps >= 1, got eps={eps!r}, "
                             f"steps={steps!r}")
    if torch.is_inference_mode_enabled():  # torch.enable_grad() does not lift it
        raise RobustlabError("embedding_pgd cannot run under torch.inference_mode(); call it outside it "
                             "(torch.no_grad() is fine)")
    step_size = 2.5 * eps / steps if step_size is None else step_size
    module = input_embeddings(model, embedding)
    hook = _Hook(module, mask, EmbeddingAdversary._zeros)
    handle = module.register_forward_hook(hook)
    try:
        robust = None  # made from the first pass's logits, once the labels are checked against them
        with attack_mode(model), torch.enable_grad():  # a caller may hold torch.no_grad(), as for image attacks
            for k in range(steps + 1):
                logits = logits_of(forward())
                if k == 0:
                    check_class_labels(logits, y)
                correct = logits.argmax(1) == y
                robust = correct if robust is None else robust & correct
                if k == steps:
                    break
                # Summed per-example losses: each example's δ gets its own loss's gradient.
                loss = F.cross_entropy(logits, y, reduction="sum")
                grad, = torch.autograd.grad(loss, hook.delta)
                delta = project(ascend(hook.delta.detach(), grad, step_size, norm), eps, norm)
                hook.delta = delta.detach().requires_grad_(True)
    finally:
        handle.remove()
    return robust.detach()
