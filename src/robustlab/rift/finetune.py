"""RiFT steps 2 and 3: fine-tune one module on clean data, then interpolate back toward the robust weights.

Fine-tuning runs in the project's `Trainer` (batching, augmentation, progress, atomic checkpoints, resume),
with every parameter frozen except the chosen module's weight and bias. Defaults are the reference code's
(microsoft/robustlearn, RiFT/main.py): SGD momentum 0.9, weight decay 5e-4, batch 128, 10 epochs, the
learning rate ×0.1 after half the epochs (its MultiStepLR at epochs // 2), learning rate 0.001 (its
default; its README: "try different learning rates, usually a small one is preferred"). The fine-tuned
endpoint is the epoch with the best *validation* clean accuracy (the reference keeps the best test accuracy).

BatchNorm: as in the reference, the model trains in train mode, so every BatchNorm layer's running
statistics are re-estimated on the clean training data (their affine parameters stay frozen); `bn="keep"`
keeps them fixed instead. Interpolation mixes all floating-point state, the running statistics included,
so θ(α) moves the statistics from the robust model's (adversarial inputs) toward clean-data ones together
with the weights, and α = 0 is exactly the robust model. `bn="recalibrate"` fine-tunes as "keep", then
gives every θ(α) with α > 0 statistics re-estimated on training images attacked against θ(α) itself
(`recalibrate_bn`; also passed clean where the source method trained on clean batches too, as TRADES): the
kind of input the robust model's own statistics were measured on.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from robustlab import checkpoint
from robustlab.data import ImageSet, Splits
from robustlab.errors import RobustlabError, check_choice
from robustlab.evaluate.accuracy import accuracy
from robustlab.models import batch_norms, classifier_modules, model_device
from robustlab.progress import progress
from robustlab.training.methods import Method, StepResult
from robustlab.training.trainer import TrainConfig, Trainer, changed_settings

ALPHAS = tuple(i / 10 for i in range(11))
BN_MODES = ("update", "keep", "recalibrate")


class CriticalFinetune(Method):
    """Cross-entropy on clean inputs, with the reference code's step decay (×`gamma` after half the epochs)."""
    name = "rift-finetune"
    adversarial = False

    def __init__(self, module: str, lr: float, bn: str = "update", gamma: float = 0.1):
        self.module, self.lr, self.bn, self.gamma = module, lr, check_choice("bn", bn, ("update", "keep")), gamma

    def loss(self, ctx, x, y):
        logits = ctx.model(x)
        return StepResult(F.cross_entropy(logits, y), logits)

    def train_step(self, ctx, x, y):
        # Per epoch, as the reference's MultiStepLR([epochs // 2]); this overrides the Trainer's constant rate.
        lr = self.lr * (self.gamma if ctx.epoch >= ctx.epochs // 2 else 1.0)
        for group in ctx.optimizer.param_groups:
            group["lr"] = lr
        if self.bn == "keep":
            for m in batch_norms(ctx.model):
                m.eval()
        return super().train_step(ctx, x, y)


def module_names(model: nn.Module, spec: str) -> list[str]:
    """The Conv/Linear modules that `spec` names, comma-separated (RiFT fine-tunes one; several are fine-tuned
    together), by their qualified names; names without the Normalize wrapper's `net.` prefix are accepted."""
    modules = dict(classifier_modules(model))
    names = []
    for name in spec.split(","):
        name = name.strip()
        if name not in modules and f"net.{name}" in modules:
            name = f"net.{name}"
        check_choice("module", name, modules)
        names.append(name)
    if len(set(names)) < len(names):
        raise RobustlabError(f"module: {spec!r} names a module twice")
    return names


def finetune(model: nn.Module, module: str, data: Splits, out_dir, run_meta: dict, *, lr: float = 0.001,
             epochs: int = 10, batch_size: int = 128, momentum: float = 0.9, weight_decay: float = 5e-4,
             augment: str | None = None, bn: str = "update", seed: int = 0, train_n: int | None = None,
             show=None) -> tuple[nn.Module, dict]:
    """Fine-tune a copy of `model` on clean training data, only `module` trainable (comma-separated: several).

    A Trainer run in `out_dir` (resumed when it holds one with the same settings). Returns the fine-tuned
    model at its best validation-clean epoch (eval mode) and the Trainer's record of it. Reads no test data.
    """
    tuned = copy.deepcopy(model)  # the Trainer puts it in the fast memory format on the model's device
    modules = dict(tuned.named_modules())
    for p in tuned.parameters():
        p.requires_grad_(False)
    for name in module_names(tuned, module):
        for p in modules[name].parameters():
            p.requires_grad_(True)
    config = TrainConfig(epochs=epochs, batch_size=batch_size, optimizer="sgd", lr=lr, momentum=momentum,
                         weight_decay=weight_decay, schedule="constant", seed=seed, augment=augment,
                         train_n=train_n, ema=None,  # the epoch choice's data, and the weights started from:
                         extra={"val_images": len(data.val), "start": checkpoint.weights_digest(model)})
    method = CriticalFinetune(module, lr, bn)
    out = Path(out_dir)
    trainer = Trainer(tuned, method, data, config, out, run_meta, val_attack=None, device=model_device(model),
                      show_progress=show)
    if (out / "last.safetensors").exists():
        meta = checkpoint.read_metadata(out / "last.safetensors")
        def settings(config: dict, method: dict) -> dict:  # one level, so that a difference is named by its key
            return {**{k: v for k, v in config.items() if k != "extra"}, **config.get("extra", {}),
                    **{f"method.{k}": v for k, v in method.items()}}
        if changed := changed_settings(settings(meta.get("config") or {}, meta.get("method") or {}),
                                       settings(asdict(config), {"name": method.name, **method.config()}),
                                       names={"start": "weights started from"}):
            raise RobustlabError(f"{out} holds a fine-tuning run with other settings ({'; '.join(changed)}); "
                                 "remove it or choose another --out")
        trainer.resume()
    start = time.perf_counter()
    trainer.fit()
    tensors, meta = checkpoint.load(out / "best.safetensors")
    tuned.load_state_dict(checkpoint.unprefixed("model.", tensors))
    for p in tuned.parameters():
        p.requires_grad_(True)
    record = {"best_epoch": meta["epoch"], "val_clean": meta["metrics"]["val_clean"],
              "train_seconds": round(trainer.elapsed, 1),  # the whole run's (best.safetensors: up to its epoch)
              "fit_seconds_this_process": round(time.perf_counter() - start, 1)}
    return tuned.eval(), record


def recalibrate_bn(model: nn.Module, images: ImageSet, attack=None, *, clean: bool = False, joint: bool = False,
                   batch_size: int = 500, seed: int = 0, show=None) -> nn.Module:
    """Replace every BatchNorm layer's running statistics by their plain average over `images`, attacked first
    (when `attack` is given) against `model` as it stands, in eval mode, with seed `seed + i` for the batch at i.
    `clean`: each batch also passes unattacked, before its attacked copy (as TRADES and MART train), or with
    `joint` in one pass together with it (as they train by default).

    All examples are attacked before any statistic changes, so that no batch is attacked against half-estimated
    statistics. Weights, the modes of all modules and each layer's momentum are left as they were.
    """
    norms = batch_norms(model)
    if not norms:
        return model
    device = model_device(model)
    starts = range(0, len(images), batch_size)
    batches = []
    for i in progress(starts, show=show, desc="BN statistics: attack", leave=False):
        x = images.images[i:i + batch_size].to(device).float().div_(255)
        if attack is None:
            batches.append(x)
            continue
        y = images.labels[i:i + batch_size].to(device)
        x_adv = attack(model, x, y, generator=torch.Generator(device).manual_seed(seed + i))
        batches += [torch.cat([x, x_adv])] if clean and joint else [x, x_adv] if clean else [x_adv]
    modes, momenta = [(m, m.training) for m in model.modules()], [m.momentum for m in norms]
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average: every batch counts equally
        model.train()
        with torch.no_grad():
            for x in batches:
                model(x)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        for m, training in modes:
            m.training = training
    return model


def interpolate(robust: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], alpha: float) -> dict:
    """θ(α) = (1 − α)·θ_robust + α·θ_tuned for every floating-point tensor of two state dicts.

    α = 0 and α = 1 return copies of the endpoints themselves (bit for bit); integer buffers (BatchNorm's
    batch counters) are counts, not weights: they are taken from the nearer endpoint.
    """
    if not 0 <= alpha <= 1:
        raise RobustlabError(f"alpha must be in [0, 1], got {alpha}")
    if robust.keys() != tuned.keys():
        raise RobustlabError("cannot interpolate: the two models have different parameters")
    out = {}
    for k, a in robust.items():
        b = tuned[k]
        if alpha in (0, 1) or not a.is_floating_point():
            out[k] = (a if alpha < 0.5 else b).clone()
        else:  # not (1 − α)·a + α·b, which rounds a tensor the fine-tuning left alone (a == b) away from a
            out[k] = a + alpha * (b - a)
    return out


class AlphaSearch:
    """Validation clean and robust accuracy of θ(α), memoized in `curve` ({"0.3": {"clean": …, "robust": …}}),
    and RiFT's choice of α: the largest validation clean accuracy whose validation robust accuracy is at least
    the robust model's (α = 0) minus `tolerance` (ties: the smaller α). Robust accuracy comes from `attack`
    with a fixed seed, so every α meets the same random starts. Only `val` and `val_robust` are read.

    `prepare(model)`, when given, finishes θ(α) for every α > 0 after interpolation (RiFT's `--bn recalibrate`);
    each prepared state is computed once and kept, and `state(α)` returns what was measured.
    """

    def __init__(self, model: nn.Module, robust: dict, tuned: dict, val: ImageSet, val_robust: ImageSet, attack,
                 *, seed: int = 0, curve: dict | None = None, on_update=None, show=None, prepare=None):
        self.model, self.robust, self.tuned = model, robust, tuned
        self.val, self.val_robust, self.attack, self.seed = val, val_robust, attack, seed
        self.curve = curve if curve is not None else {}
        self.on_update, self.show = on_update or (lambda curve: None), show
        self.prepare, self._prepared = prepare, {}

    def state(self, alpha: float) -> dict:
        """θ(α) as measured: the interpolation, then `prepare` for α > 0."""
        if self.prepare is None or alpha == 0:
            return interpolate(self.robust, self.tuned, alpha)
        key = f"{alpha:.2f}"
        if key not in self._prepared:
            self.model.load_state_dict(interpolate(self.robust, self.tuned, alpha))
            self.prepare(self.model)
            self._prepared[key] = {k: v.clone() for k, v in self.model.state_dict().items()}
        return self._prepared[key]

    def _point(self, alpha: float) -> dict:
        return self.curve.setdefault(f"{alpha:.2f}", {})

    def _measure(self, alpha: float, what: str) -> float:
        point = self._point(alpha)
        if what not in point:
            start = time.perf_counter()
            self.model.load_state_dict(self.state(alpha))
            if what == "clean":
                point[what] = accuracy(self.model, self.val, batch_size=1000)
            else:
                point[what] = accuracy(self.model, self.val_robust, attack=self.attack, batch_size=500, seed=self.seed,
                                       progress=f"α = {alpha:.1f} robust", show=self.show)
            point["seconds"] = round(point.get("seconds", 0) + time.perf_counter() - start, 2)
            self.on_update(self.curve)
        return point[what]

    def clean(self, alpha):
        return self._measure(alpha, "clean")

    def robust_acc(self, alpha):
        return self._measure(alpha, "robust")

    def choose(self, alphas=ALPHAS, tolerance: float = 0.001, full: bool = True) -> float:
        """The chosen α. `full`: measure robust accuracy at every α (for the curves); otherwise only where it
        can change the choice, in order of falling clean accuracy, stopping at the first α that qualifies."""
        # Compared in images: accuracies are k/n stored in float32, where 3,972/5,000 reads 0.79439998 and
        # 3,977/5,000 − 0.001 reads 0.79440002, so a float floor refused an α costing exactly the tolerance.
        n = len(self.val_robust)

        def count(alpha):
            return round(self.robust_acc(alpha) * n)

        floor = count(0.0) - tolerance * n - 1e-9
        clean = {a: self.clean(a) for a in progress(alphas, show=self.show, desc="α clean", leave=False)}
        order = sorted(alphas, key=lambda a: (-clean[a], a))
        if full:
            for a in progress(alphas, show=self.show, desc="α robust", leave=False):
                self.robust_acc(a)
        return next((a for a in order if count(a) >= floor), 0.0)  # α = 0 always qualifies
