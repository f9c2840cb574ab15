"""YOPO, "You Only Propagate Once" (Zhang et al. 2019): adversarial training via the maximal principle."""
from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from robustlab import distributed
from robustlab.attacks import make_threat
from robustlab.errors import RobustlabError, check_choice
from robustlab.models.registry import Normalize
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
        layers = [name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))][:3]
        raise RobustlabError(f"first_layer {path!r} is no layer of the model; name its first layer, e.g. "
                             f"{' or '.join(map(repr, layers)) or repr('net.conv1')}") from None
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


AFFINE_STEM = (Normalize, nn.Identity, nn.Flatten)  # parameter-free modules that are affine in their input
AFFINE_FIRST_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def is_affine_up_to(model: nn.Module, path: str) -> bool:
    """Whether the model's map from its input to the output of layer `path` is affine, judged from its
    structure: plain nn.Sequential chains down to a Conv/Linear layer with only AFFINE_STEM modules before
    it (robustlab's sequential models: Normalize, then net.conv1). Conservative: any other structure is
    taken as non-affine."""
    module = model
    for name in path.split("."):
        if type(module).forward is not nn.Sequential.forward:
            return False
        for child_name, child in module.named_children():
            if child_name == name:
                break
            if not isinstance(child, AFFINE_STEM):
                return False
        module = module.get_submodule(name)
    return isinstance(module, AFFINE_FIRST_LAYERS)


class YOPO(Method):
    """YOPO-m-n: m full forward/backward passes per minibatch, each followed by n cheap updates of the
    perturbation η that propagate through the first layer only.

    Pontryagin's maximal principle says that, for the network f = g ∘ f₀ (f₀ the first layer), the
    adversary couples with the rest of the network only through the co-state p = ∂ℓ/∂f₀ (the gradient
    at the first layer's output). So each outer step j = 1..m:
      1. one full forward/backward at x + η gives the gradient for the layers and p; its input gradient
         is already ∇η H at this η, for the Hamiltonian H(η) = ⟨p, f₀(x + η)⟩;
      2. n inner steps ascend H with p fixed (sign steps for L∞, per-example normalized steps for L2;
         projected onto the ε-ball and [0, 1]). Each step after the first needs ∇η H at the new η, a
         forward and backward through f₀ only, unless f₀ (with everything before it) is affine: then
         ∇η H = J₀ᵀ p is the same at every η and the full backward's input gradient serves all n steps
         exactly (robustlab's sequential models; see `is_affine_up_to`).
    The parameter update is one optimizer step on the gradients averaged over the m outer steps.

    The first layer's own gradient (`first_layer_grad`):
    - "full" (the default): from the full backward, like every other layer.
    - "hamiltonian": the paper's Algorithm 1, ∂H/∂θ₀ at the η after the inner steps (one more pass
      through f₀ per outer step). On Fashion-MNIST cnn-small it stalled training: 5 one-cycle epochs of
      YOPO-5-3 reached 82.9% / 66.8% on validation (clean / PGD-10) against 86.2% / 73.8% with "full"
      (docs/results.md, "YOPO's first-layer gradient").
    - "both": their sum, as the reference code's later versions do (they keep the full backward's
      first-layer gradient and add ∂H/∂θ₀).

    `first_layer` is the module path of the first layer with weights (everything before it, such as
    robustlab's input `Normalize`, must be parameter-free); "net.conv1" for every robustlab model
    but `mlp`, whose first layer is "net.fc1".
    Examples are generated in **train mode** (the full passes are the training passes).

    Defaults and their sources (a1600012888/YOPO-You-Only-Propagate-Once):
    - `outer` m = 5, `inner` n = 3: YOPO-5-3, the CIFAR-10 setting (`K = 5`, `inner_iters = 3`); the
      MNIST setting is YOPO-5-10.
    - `step_size`: the protocol's PGD step, which matches the reference σ = 2/255 at ε = 8/255 (ε/4) for
      CIFAR and σ = 0.01 at ε = 0.3 for MNIST.
    - η starts uniform in the ε-ball (the reference's `uniform_(-eps, eps)`) and is carried across the
      outer steps.
    Other deliberate differences from the reference code: gradients are averaged over the m outer steps
    (the reference sums them and divides the learning rate by K instead); the weight decay is divided by m
    for YOPO's step, so that the update is the reference's, decay term included (SGD adds the decay to the
    summed gradient before the learning rate's 1/K); one optimizer for all layers (same lr, momentum,
    weight decay as the reference's two optimizers).
    """
    name = "yopo"
    protocol_fields = ("eps", "norm", "step_size")
    FIRST_LAYER_GRADS = ("full", "hamiltonian", "both")

    def __init__(self, eps=0.1, norm="linf", step_size=0.025, outer=5, inner=3, first_layer="net.conv1",
                 first_layer_grad="full"):
        for label, value in (("outer (m)", outer), ("inner (n)", inner)):
            if int(value) != value or value < 1:
                raise RobustlabError(f"YOPO's {label} must be a positive integer, got {value}")
        check_choice("first_layer_grad", first_layer_grad, self.FIRST_LAYER_GRADS)
        self.eps, self.norm, self.step_size = eps, norm, step_size
        self.outer, self.inner, self.first_layer = int(outer), int(inner), first_layer
        self.first_layer_grad = first_layer_grad
        self._threat = make_threat(norm, eps, step_size)

    def init_run_state(self, model, config):
        named_layer(model, self.first_layer)  # a wrong name fails before training, not at its first step
        return {}

    # H(η) = ⟨p, f₀(x + η)⟩ is never formed: its gradients are vector-Jacobian products of f₀ with p
    # (`grad_outputs=p`), which skips a product and a sum over the first layer's whole output per step.
    def _hamiltonian_grad(self, ctx, layer, x, eta, costate):
        eta = eta.detach().requires_grad_(True)
        with ctx.autocast():
            out = first_layer_output(ctx.module, layer, x + eta)
        (grad,) = torch.autograd.grad(out, eta, grad_outputs=costate)
        return grad

    def _inner_steps(self, ctx, layer, x, eta, grad, costate, affine):
        for s in range(self.inner):
            if s > 0 and not affine:
                grad = self._hamiltonian_grad(ctx, layer, x, eta, costate)
            eta = self._threat.project(self._threat.step(x + eta, grad), x) - x
        return eta

    def train_step(self, ctx, x, y):
        layer = named_layer(ctx.module, self.first_layer)
        layer_params = [p for p in layer.parameters() if p.requires_grad]
        affine = is_affine_up_to(ctx.module, self.first_layer)
        hamiltonian = self.first_layer_grad in ("hamiltonian", "both")  # ∂H/∂θ₀ is added
        drop_full = self.first_layer_grad == "hamiltonian"  # the full backward's first-layer gradient is not
        need_costate = hamiltonian or (self.inner > 1 and not affine)
        eta = self._threat.random_start(x, ctx.generator) - x
        ctx.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(self.outer):
            eta.requires_grad_(True)
            with (recorded_output(layer) if need_costate else nullcontext({})) as record, ctx.autocast():
                logits = ctx.model(x + eta)
                loss = F.cross_entropy(logits, y)
            if drop_full:
                set_aside = [p.grad for p in layer_params]
                for p in layer_params:
                    p.grad = None
            (loss / self.outer).backward()  # the one full backward of this outer step
            if drop_full:
                for p, g in zip(layer_params, set_aside):
                    p.grad = g
            costate = record["output"].grad.detach() if need_costate else None
            eta = self._inner_steps(ctx, layer, x, eta.detach(), eta.grad, costate, affine)
            if hamiltonian:
                with ctx.autocast():
                    out = first_layer_output(ctx.module, layer, x + eta)
                out.backward(costate)  # ∂H/∂θ₀, through the first layer only
            total += loss.detach()
        if hamiltonian:  # ∂H/∂θ₀ came from the unwrapped module, which DDP does not see
            distributed.average_gradients(layer_params, ctx.share)
        decays = [group["weight_decay"] for group in ctx.optimizer.param_groups]
        for group in ctx.optimizer.param_groups:
            group["weight_decay"] /= self.outer
        ctx.optimizer.step()
        for group, decay in zip(ctx.optimizer.param_groups, decays):
            group["weight_decay"] = decay
        return StepResult(total / self.outer, logits.detach())
