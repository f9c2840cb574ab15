"""YOPO, "You Only Propagate Once" (Zhang et al. 2019): adversarial training via the maximal principle."""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from robustlab import distributed
from robustlab.attacks import make_threat
from robustlab.errors import RobustlabError
from robustlab.training.methods import Method, StepResult


class _StopForward(Exception):
    """Raised by a forward hook to end a forward pass once the first layer's output exists."""

    def __init__(self, output):
        super().__init__()
        self.output = output


def named_layer(model: nn.Module, path: str) -> nn.Module:
    try:
        layer = model.get_submodule(path)
    except AttributeError:
        raise RobustlabError(f"the model has no layer {path!r}; name its first layer (first_layer), "
                             f"e.g. 'net.conv1' for robustlab's models") from None
    if not any(p.requires_grad for p in layer.parameters()):
        raise RobustlabError(f"layer {path!r} has no trainable parameters; YOPO needs the first layer with weights")
    return layer


def _stop_forward(module, inputs, output):
    raise _StopForward(output)


def first_layer_output(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The output of `layer` when `model` runs on `x`, without running the rest of the network."""
    handle = layer.register_forward_hook(_stop_forward)
    try:
        model(x)
    except _StopForward as stop:
        return stop.output
    finally:
        handle.remove()
    raise RobustlabError("YOPO's first layer did not run in the model's forward pass")


@contextmanager
def recorded_output(layer: nn.Module):
    """Keep the layer's output of the next forward pass, with its gradient retained (the co-state)."""
    record = {}

    def hook(module, inputs, output):
        if output.requires_grad:
            output.retain_grad()
        record["output"] = output

    handle = layer.register_forward_hook(hook)
    try:
        yield record
    finally:
        handle.remove()


class YOPO(Method):
    """YOPO-m-n: m full forward/backward passes per minibatch, each followed by n cheap updates of the
    perturbation η that propagate through the first layer only.

    Pontryagin's maximal principle says that, for the network f = g ∘ f₀ (f₀ the first layer), the
    adversary couples with the rest of the network only through the co-state p = ∂ℓ/∂f₀ (the gradient
    at the first layer's output). So each outer step j = 1..m:
      1. one full forward/backward at x + η gives p and the gradient for all layers but the first;
      2. n inner steps ascend the Hamiltonian H(η) = ⟨p, f₀(x + η)⟩ (p fixed): a forward and backward
         through f₀ only (sign steps for L∞, per-example normalized steps for L2; projected onto the
         ε-ball and [0, 1]);
      3. the first layer's gradient is ∂H/∂θ₀ at the new η (the paper's p·∇θ₀ f₀(x + η^{j,n})).
    The parameter update is one optimizer step on the gradients averaged over the m outer steps.

    `first_layer` is the module path of the first layer with weights (everything before it, such as
    robustlab's input `Normalize`, must be parameter-free); "net.conv1" for every robustlab model.
    Examples are generated in **train mode** (the full passes are the training passes).

    Defaults and their sources (a1600012888/YOPO-You-Only-Propagate-Once):
    - `outer` m = 5, `inner` n = 3: YOPO-5-3, the CIFAR-10 setting (`K = 5`, `inner_iters = 3`); the
      MNIST setting is YOPO-5-10.
    - `step_size`: the protocol's PGD step, which matches the reference σ = 2/255 at ε = 8/255 (ε/4) for
      CIFAR and σ = 0.01 at ε = 0.3 for MNIST.
    - η starts uniform in the ε-ball (the reference's `uniform_(-eps, eps)`) and is carried across the
      outer steps.
    Deliberate differences from the reference code: gradients are averaged over the m outer steps (the
    reference sums them and divides the learning rate by K instead, same update); the first layer
    learns from ∂H/∂θ₀ only, as in the paper's algorithm (the latest reference code also adds the full
    backward's first-layer gradient); one optimizer for all layers (same lr, momentum, weight decay as
    the reference's two optimizers).
    """
    name = "yopo"
    protocol_fields = ("eps", "norm", "step_size")

    def __init__(self, eps=0.1, norm="linf", step_size=0.025, outer=5, inner=3, first_layer="net.conv1"):
        for label, value in (("outer (m)", outer), ("inner (n)", inner)):
            if int(value) != value or value < 1:
                raise RobustlabError(f"YOPO's {label} must be a positive integer, got {value}")
        self.eps, self.norm, self.step_size = eps, norm, step_size
        self.outer, self.inner, self.first_layer = int(outer), int(inner), first_layer
        self._threat = make_threat(norm, eps, step_size)

    # H(η) = ⟨p, f₀(x + η)⟩ is never formed: its gradients are vector-Jacobian products of f₀ with p
    # (`grad_outputs=p`), which skips a product and a sum over the first layer's whole output per step.
    def _inner_steps(self, ctx, layer, x, eta, costate):
        for _ in range(self.inner):
            eta = eta.detach().requires_grad_(True)
            with ctx.autocast():
                out = first_layer_output(ctx.module, layer, x + eta)
            (grad,) = torch.autograd.grad(out, eta, grad_outputs=costate)
            with torch.no_grad():
                eta = self._threat.project(self._threat.step(x + eta, grad), x) - x
        return eta.detach()

    def train_step(self, ctx, x, y):
        layer = named_layer(ctx.module, self.first_layer)
        layer_params = [p for p in layer.parameters() if p.requires_grad]
        eta = self._threat.random_start(x, ctx.generator) - x
        ctx.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(self.outer):
            with recorded_output(layer) as record, ctx.autocast():
                logits = ctx.model(x + eta)
                loss = F.cross_entropy(logits, y)
            first_layer_grads = [p.grad for p in layer_params]
            for p in layer_params:  # set aside, so the full backward's first-layer gradient can be dropped
                p.grad = None
            (loss / self.outer).backward()  # the one full backward of this outer step
            for p, g in zip(layer_params, first_layer_grads):  # the first layer learns from ∂H/∂θ₀ below
                p.grad = g
            costate = record["output"].grad.detach()
            eta = self._inner_steps(ctx, layer, x, eta, costate)
            with ctx.autocast():
                out = first_layer_output(ctx.module, layer, x + eta)
            out.backward(costate)  # ∂H/∂θ₀, through the first layer only
            total += loss.detach()
        distributed.average_gradients(layer_params)  # ∂H/∂θ₀ came from the unwrapped module, which DDP does not see
        ctx.optimizer.step()
        return StepResult(total / self.outer, logits.detach())
