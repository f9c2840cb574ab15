"""Module robust criticality (MRC), step 1 of RiFT (Zhu et al., ICCV 2023).

MRC of a Conv or Linear module: how much the adversarial loss can rise when only that module's weight is
perturbed by Δ with ‖Δ‖₂ ≤ ε·‖θ‖₂, on a fixed adversarial set. As in the reference code
(microsoft/robustlearn, RiFT/main.py, `layer_sharpness`): the adversarial set is generated once with PGD-10
against the robust model; the maximization is SGD with lr 1 on the negative cross-entropy over the weight
only (not the bias), batches of 512, 10 epochs over the set, with the projection onto the constraint and a
full evaluation of the loss after every epoch; MRC = the worst loss seen minus the original loss.

Differences from the reference, each deliberate:
- The adversarial set comes from the validation split: the reference draws it from the CIFAR *test* set,
  i.e. data the model was not trained on; the validation split is such data without touching the test set
  (the module choice is a choice, and choices are made on validation data).
- The worst loss starts at the original loss (Δ = 0 is feasible), so MRC ≥ 0; the reference starts at 0.
- Batches are shuffled from a seeded generator and gradients are taken with `torch.autograd.grad`, so the
  run is reproducible and no parameter `.grad` is touched.
The model is kept in eval mode throughout (BatchNorm statistics fixed) and every weight is restored exactly.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from robustlab import checkpoint
from robustlab.attacks import attack_mode, make_threat, perturb
from robustlab.attacks.threat import check_batch
from robustlab.data import ImageSet
from robustlab.errors import RobustlabError, check_choice
from robustlab.models import classifier_modules, model_device
from robustlab.progress import progress


@dataclass(frozen=True)
class MRCConfig:
    n: int = 2000           # validation images in the adversarial set (of 5,000): all 21 modules of the residual
                            # network in about 10 minutes on 2 CPU cores; the reference used 10,000 test images
    eps: float = 0.1        # relative radius of the weight perturbation (paper, Sec. 3.1; reference code)
    epochs: int = 10        # ascent epochs over the set (reference code)
    lr: float = 1.0         # SGD learning rate on the negative loss (reference code)
    batch_size: int = 512   # reference code
    seed: int = 0           # attack random starts and batch order

    def validate(self):
        for name in ("n", "epochs", "batch_size"):
            if getattr(self, name) <= 0:
                raise RobustlabError(f"MRC {name.replace('_', ' ')} must be > 0, got {getattr(self, name)}")
        if not (self.eps > 0 and self.lr > 0):  # (nan fails every comparison)
            raise RobustlabError(f"MRC eps and lr must be > 0, got eps={self.eps}, lr={self.lr}")


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_json(path: Path) -> dict:
    """A cache file's contents ({} when there is none yet); a damaged one is a one-line error, not a traceback."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RobustlabError(f"{path} is damaged (not JSON); delete it and run again: its step is recomputed") from None


def adversarial_set(model: nn.Module, images: ImageSet, *, norm: str, eps: float, steps: int, step_size: float,
                    seed: int = 0, batch_size: int = 500, show=None) -> tuple[torch.Tensor, torch.Tensor]:
    """PGD examples (last iterate, random start, as in training) against `model`, float32 in [0, 1], on the
    model's device. The random starts come from the device's generator: a GPU's set differs from a CPU's."""
    threat = make_threat(norm, eps, step_size)
    device = model_device(model)
    g = torch.Generator(device).manual_seed(seed)
    out = []
    with attack_mode(model):
        for s in progress(range(0, len(images), batch_size), show=show, desc="adversarial set", unit="batch",
                          leave=False):
            x = images.images[s:s + batch_size].to(device).float().div_(255)
            out.append(perturb(model, x, images.labels[s:s + batch_size].to(device), threat, steps, generator=g))
    return torch.cat(out), images.labels.to(device, copy=True)


@torch.no_grad()
def _loss_and_accuracy(model, x, y, batch_size=1000) -> tuple[float, float]:
    loss = correct = 0.0
    for s in range(0, len(y), batch_size):
        logits = model(x[s:s + batch_size])
        loss += F.cross_entropy(logits, y[s:s + batch_size], reduction="sum").item()
        correct += (logits.argmax(1) == y[s:s + batch_size]).sum().item()
    return loss / len(y), correct / len(y)


def module_criticality(model: nn.Module, name: str, x: torch.Tensor, y: torch.Tensor, config: MRCConfig = MRCConfig(),
                       original: tuple[float, float] | None = None) -> dict:
    """MRC of module `name` on the adversarial set (x, y); the model's weights and modes are left unchanged.

    Returns mrc, the original and worst loss, the accuracy at the worst loss, and the seconds it took.
    `original` (loss, accuracy) skips recomputing them when known.
    """
    modules = dict(classifier_modules(model))
    check_choice("module", name, modules)
    y = check_batch(x, y, model=model)  # images in [0, 1] (x·255 gave an MRC of 191 without a word), integer labels
    start = time.perf_counter()
    weight = modules[name].weight
    saved = weight.detach().clone()
    bound = config.eps * saved.norm()
    g = torch.Generator().manual_seed(config.seed)
    with attack_mode(model):  # eval mode, every parameter frozen; modes and requires_grad restored afterwards
        base_loss, base_acc = original or _loss_and_accuracy(model, x, y)
        worst_loss, worst_acc = base_loss, base_acc
        weight.requires_grad_(True)
        try:
            for _ in range(config.epochs):
                order = torch.randperm(len(y), generator=g)
                for s in range(0, len(y), config.batch_size):
                    idx = order[s:s + config.batch_size]
                    loss = F.cross_entropy(model(x[idx]), y[idx])
                    (grad,) = torch.autograd.grad(loss, weight)
                    with torch.no_grad():
                        weight.add_(grad, alpha=config.lr)  # an SGD step on the negative loss
                with torch.no_grad():
                    delta = weight - saved
                    norm = delta.norm()
                    if norm > bound:
                        weight.copy_(saved + delta * (bound / norm))
                loss, acc = _loss_and_accuracy(model, x, y)
                if loss > worst_loss:
                    worst_loss, worst_acc = loss, acc
        finally:
            weight.requires_grad_(False)
            with torch.no_grad():
                weight.copy_(saved)
    return {"mrc": worst_loss - base_loss, "loss": base_loss, "worst_loss": worst_loss, "accuracy": base_acc,
            "worst_accuracy": worst_acc, "weights": weight.numel(), "seconds": round(time.perf_counter() - start, 2)}


def compute_mrc(model: nn.Module, val: ImageSet, cache_dir, *, source_sha256: str, threat: dict,
                config: MRCConfig = MRCConfig(), show=None) -> dict:
    """MRC of every Conv/Linear module of `model`, cached in `cache_dir` so that a killed run resumes.

    `threat`: the attack that builds the adversarial set (norm, eps, steps, step_size: the protocol's training
    PGD). The set is `adv_set.safetensors` and the results `mrc.json`, written after every module; both carry
    the settings they were made with (and the checkpoint's sha256) and are recomputed when these differ.
    Returns {"key", "original": {loss, accuracy}, "modules": {name: result}, "adv_set_seconds"}.
    """
    config.validate()
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    images = val.subset(config.n)
    set_key = {"checkpoint_sha256": source_sha256, "source": "validation split", "n": len(images),
               "attack": dict(threat), "seed": config.seed}
    key = {**set_key, "mrc": asdict(config)}

    set_path = cache / "adv_set.safetensors"
    x = y = None
    if set_path.exists():
        tensors, meta = checkpoint.load(set_path)
        if meta.get("key") == set_key:
            device = model_device(model)
            x, y, set_seconds = tensors["x"].to(device), tensors["y"].to(device), meta["seconds"]
    if x is None:
        start = time.perf_counter()
        x, y = adversarial_set(model, images, seed=config.seed, show=show, **threat)
        set_seconds = round(time.perf_counter() - start, 2)
        checkpoint.save(set_path, {"x": x, "y": y}, {"kind": "rift-adversarial-set", "key": set_key,
                                                     "seconds": set_seconds})

    path = cache / "mrc.json"
    result = read_json(path)
    if result.get("key") != key:
        result = {"key": key, "modules": {}}
    result["adv_set_seconds"] = set_seconds
    if "original" not in result:
        with attack_mode(model):
            loss, acc = _loss_and_accuracy(model, x, y)
        result["original"] = {"loss": loss, "accuracy": acc}
    original = (result["original"]["loss"], result["original"]["accuracy"])
    names = [n for n, _ in classifier_modules(model)]
    todo = [n for n in names if n not in result["modules"]]
    bar = progress(todo, show=show, desc="MRC", unit="module", total=len(names), initial=len(names) - len(todo))
    for name in bar:
        bar.set_postfix_str(name, refresh=False)
        result["modules"][name] = module_criticality(model, name, x, y, config, original)
        checkpoint.write_json(path, result, default=float)
    bar.close()
    result["modules"] = {n: result["modules"][n] for n in names}  # network order
    checkpoint.write_json(path, result, default=float)
    return result


def ranked(mrc: dict) -> list[str]:
    """Module names from the least to the most robust-critical (ties: network order)."""
    names = list(mrc["modules"])
    return sorted(names, key=lambda n: (mrc["modules"][n]["mrc"], names.index(n)))


def plot_mrc(mrc: dict, path, title: str, highlight=()):
    """Bar chart of MRC per module in network order, module names on the axis; `highlight`ed bars in red."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state

    names = list(mrc["modules"])
    values = [mrc["modules"][n]["mrc"] for n in names]
    fig = Figure(figsize=(max(5.0, 0.34 * len(names) + 1.5), 4.2), dpi=120)
    ax = fig.subplots()
    colours = ["#c0392b" if n in highlight else "#5b7db1" for n in names]
    ax.bar(range(len(names)), values, color=colours)
    ax.set_xticks(range(len(names)), [n.removeprefix("net.") for n in names], rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("MRC (rise of the adversarial loss)")
    ax.set_yscale("log" if min(values) > 0 and max(values) / min(values) > 50 else "linear")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
