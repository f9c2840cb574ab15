"""One evaluation for every model: the attack `robustlab eval` runs (its budget, its label, its checks), the ε sweep,
the gallery of adversarial examples, and `evaluate_model`, the same report for a model of your own."""
from __future__ import annotations

import inspect
import json
import math
import numbers
import os
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from robustlab import provenance
from robustlab.errors import RobustlabError, check_choice, check_integer, output_dir, they_apply
from robustlab.protocol import largest_radius

ATTACK_NAMES = ("fgsm", "fgm", "pgd", "apgd-ce", "pgd-smooth")
ONE_STEP_NORMS = {"fgsm": "linf", "fgm": "l2"}
APGD_STEPS = 100  # AutoAttack-standard's iterations
SWEEP_N = 1000  # test images for the report's accuracy-vs-ε plot
SWEEP_FACTORS = (0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)  # the sweep's radii, in units of the evaluated ε


def check_attack_options(attack, *, norm=None, steps=None, step_size=None, restarts=None, tau=None,
                         named: Callable[[str], str] = str):
    """Options the attack would ignore are refused, so that a report never names an attack other than the one that
    ran: FGSM and FGM take one step of size ε in their own norm, APGD sets its own steps, only pgd-smooth has a τ.
    `named(keyword)` is how the caller spells an option: the keyword itself, or the CLI's flag."""
    check_choice("attack", attack, ATTACK_NAMES)
    if attack == "apgd-ce" and step_size is not None:
        raise RobustlabError(f"{named('attack')} apgd-ce sets its own step sizes (from 2ε, halved when progress "
                             f"stalls); drop {named('step_size')}")
    if tau is not None and attack != "pgd-smooth":
        raise RobustlabError(f"{named('tau')} is pgd-smooth's temperature; {named('attack')} {attack} has none")
    own = ONE_STEP_NORMS.get(attack)
    if own is None:
        return
    if norm not in (None, own):
        other = {v: k for k, v in ONE_STEP_NORMS.items()}[check_choice("norm", norm, ONE_STEP_NORMS.values())]
        raise RobustlabError(f"{named('attack')} {attack} is the {own} one-step attack; for {named('norm')} {norm} "
                             f"use {named('attack')} {other}")
    if ignored := [named(k) for k, v in (("steps", steps), ("step_size", step_size), ("restarts", restarts))
                   if v is not None]:
        raise RobustlabError(f"{named('attack')} {attack} takes one step of size ε; {they_apply(ignored)} to pgd "
                             "and pgd-smooth")


def attack_budget(attack, dataset: str, norm: str, *, eps=None, steps=None, step_size=None, restarts=None,
                  named: Callable[[str], str] = str, input_shape=None) -> tuple:
    """(norm, ε, steps, step size, restarts) of the evaluation: the protocol's evaluation PGD for `dataset` and `norm`,
    each part overridable; one step of ε for FGSM and FGM, in their own norm; AutoAttack's 100 steps for apgd-ce,
    whose step sizes are its own (None). `input_shape`: the images' (C, H, W), which bounds an L2 ε."""
    from robustlab.protocol import check_eps, step_for, threat_defaults
    norm = ONE_STEP_NORMS.get(attack) or norm
    budget = threat_defaults(dataset, norm).eval
    eps = budget.eps if eps is None else eps
    check_eps(eps, norm, named("eps"), input_shape)
    if attack in ONE_STEP_NORMS:
        return norm, eps, 1, eps, 1
    restarts = restarts if restarts is not None else 1 if attack == "apgd-ce" else budget.restarts
    if attack == "apgd-ce":
        return norm, eps, steps if steps is not None else APGD_STEPS, None, restarts
    step_size = step_size if step_size is not None else step_for(budget, eps, steps)
    return norm, eps, steps if steps is not None else budget.steps, step_size, restarts


def attack_at_radius(attack, norm, eps, steps, step_size, restarts, tau) -> tuple[Callable, str]:
    """(`attack_at(e)`, the report's label): the evaluation's attack at radius e with its step scaled with e (the ε
    sweep and the sanity checks run it at other radii; ε = 0 keeps the step)."""
    from robustlab.attacks import ATTACKS, apgd, pgd, pgd_smooth
    from robustlab.evaluate.sanity import SMOOTH_GRADIENT_TAU
    tau = SMOOTH_GRADIENT_TAU if tau is None else tau

    def attack_at(e):
        step = step_size * (e / eps if eps else 1) if step_size is not None else None
        if attack == "pgd":
            return partial(pgd, eps=e, norm=norm, steps=steps, step_size=step, restarts=restarts)
        if attack == "apgd-ce":
            return partial(apgd, eps=e, norm=norm, steps=steps, restarts=restarts)
        if attack == "pgd-smooth":
            return partial(pgd_smooth, eps=e, norm=norm, steps=steps, step_size=step, restarts=restarts, tau=tau)
        return lambda m, x, y, generator=None: ATTACKS[attack](m, x, y, eps=e)

    runs = f"{steps}{'×' + str(restarts) if restarts > 1 else ''}"
    if attack == "apgd-ce":
        label = f"APGD-CE-{runs} {norm} ε={eps:g}"
    elif attack in ("pgd", "pgd-smooth"):
        label = f"PGD-{runs} {norm} ε={eps:g} step {step_size:g}"
        label += f", margin loss, smooth ReLU gradients τ={tau:g}" if attack == "pgd-smooth" else ""
    else:
        label = f"{attack.upper()} {norm} ε={eps:g}"
    if eps == 0:  # the "robust" row is then clean accuracy itself: no attack ran
        label = "no attack (ε = 0)"
    return attack_at, label


def eps_sweep(measure, test, eps: float, n: int, max_eps: float | None = None) -> dict:
    """Accuracy at SWEEP_FACTORS × ε, up to `max_eps` (`largest_radius`: beyond it every image is reachable), on the
    first n images; `measure(images, e, progress)` as in `robustlab eval`."""
    sweep = test.subset(min(n, len(test)))
    radii = [f * eps for f in SWEEP_FACTORS if max_eps is None or f * eps <= max_eps]
    points = [(e, measure(sweep, e, f"sweep ε={e:g}" if e else None)) for e in radii]
    return {"n": len(sweep), "points": points}


def gallery_examples(model, test, attack, n: int = 8, seed: int = 0):
    """For the report's gallery: the first n test images (among the first 8n) that the model classifies correctly,
    their adversarial versions, the labels and the predictions on the adversarial images."""
    from robustlab.models import eval_mode, model_device

    device, first = model_device(model), test.subset(8 * n)  # a lazy folder set decodes only these
    x, y = first.images.to(device), first.labels.to(device)
    x = x.float().div(255) if x.dtype == torch.uint8 else x
    with eval_mode(model):
        with torch.no_grad():
            right = model(x).argmax(1) == y
        x, y = x[right][:n], y[right][:n]
        x_adv = attack(model, x, y, generator=torch.Generator(device).manual_seed(seed))
        with torch.no_grad():
            pred = model(x_adv).argmax(1)
    return x, x_adv, y, pred


def add_gallery(model, test, attack, label: str, class_names, out: Path, plots: dict, seed: int = 0):
    """Eight adversarial examples beside their clean images, into out/adversarial_examples.png and `plots`."""
    from robustlab.evaluate.report import plot_adversarial_examples
    x, x_adv, y, pred = gallery_examples(model, test, attack, seed=seed)
    if len(x):  # none when no image of the first 64 is classified correctly
        plot_adversarial_examples(x, x_adv, y, pred, class_names, out / "adversarial_examples.png",
                                  f"{label} on the first {len(x)} correctly classified test images")
        plots["Adversarial examples"] = "adversarial_examples.png"


def check_model(model, images, info):
    """One pass on two images, so that a model that does not fit the data fails here, in one line, and not inside
    the first attack."""
    from robustlab.models import eval_mode, model_device
    if not isinstance(model, torch.nn.Module):
        raise RobustlabError(f"model must be a torch.nn.Module that maps images in [0, 1] to logits, not a "
                             f"{type(model).__name__}")
    if other := {p.dtype for p in model.parameters() if p.is_floating_point()} - {torch.float32}:
        raise RobustlabError(f"the model's weights are {', '.join(sorted(map(str, other)))}; the attacks feed "
                             "float32 images, so call model.float() first")
    x = images[:2].to(model_device(model))
    x = x.float().div(255) if x.dtype == torch.uint8 else x
    shape = "×".join(map(str, x.shape[1:]))
    try:
        with eval_mode(model), torch.no_grad():
            logits = model(x)
    except RobustlabError:
        raise
    except Exception as exc:  # a shape mismatch deep inside the model, a forward that wants more arguments
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise RobustlabError(f"the model fails on {info.name} images ({shape}, values in [0, 1]): "
                             f"{type(exc).__name__}{': ' + first if first else ''}") from None
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (len(x), info.num_classes):
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else f"a {type(logits).__name__}"
        raise RobustlabError(f"the model returns {got} for {len(x)} {info.name} images ({shape}); evaluation needs "
                             f"logits alone, of shape ({len(x)}, {info.num_classes}) (wrap a model that returns more)")


def check_smoothable(model, what: str, named: Callable[[str], str] = str):
    """pgd-smooth replaces the gradient of every nn.ReLU module; a model without one would get plain PGD's figure
    under pgd-smooth's name."""
    from robustlab.attacks.smooth import relu_count
    if not relu_count(model):
        raise RobustlabError(f"{named('attack')} pgd-smooth: {what} has no nn.ReLU modules to smooth; use pgd")


def measure_with(model, attack_at, *, batch_size: int, seed: int):
    """`measure(images, e, progress, keep)`: accuracy under the evaluation's attack at radius e (clean at e = 0);
    `keep` as for `correct_mask`."""
    from robustlab.evaluate.accuracy import accuracy

    def measure(images, e, progress=None, keep=None):
        return accuracy(model, images, attack=attack_at(e) if e > 0 else None, batch_size=batch_size, seed=seed,
                        progress=progress, keep=keep)
    return measure


def finish_report(out: Path, results: dict, plots: dict, run_name: str, subject: str, scale: str = "pixel scale"):
    """report.md and report.json in `out`, the ε sweep's plot (if one ran) first among `plots`."""
    from robustlab.evaluate.report import plot_accuracy_vs_eps, write_report
    if "sweep" in results:
        smooth = " smooth-gradient" if results["attack"]["name"] == "pgd-smooth" else ""
        plot_accuracy_vs_eps({results["label"].split(" ")[0] + smooth: results["sweep"]["points"]},
                             out / "accuracy_vs_eps.png", f"{subject} ({results['sweep']['n']} test {results['unit']})",
                             results["attack"]["norm"], scale)
        plots = {"Accuracy versus ε": "accuracy_vs_eps.png", **plots}
    write_report(out, results, plots, run_name=run_name)


ADVERSARIAL_FORMAT = "robustlab-adversarial/1"


class AdversarialExamples:
    """The evaluation's examples, recorded batch by batch from its clean and its attack's passes (`clean` and
    `adversarial` are `correct_mask`'s `keep`), then written to one safetensors file: the clean images (uint8),
    the adversarial inputs (float32), the labels and the model's predictions on both, exactly those behind the
    reported figures, with metadata naming the attack, the model's weights and the images."""

    def __init__(self, images, *, model, model_name: str, label: str, attack: dict, dataset: str, split: str,
                 batch_size: int, data_dir=None, command=None):
        from robustlab.checkpoint import weights_digest
        n = len(images)
        self.tensors = {"clean": images.images[:n].clone(), "labels": images.labels[:n].clone(),
                        "clean_predictions": torch.full((n,), -1), "predictions": torch.full((n,), -1)}
        self.metadata = {"format": ADVERSARIAL_FORMAT, "n": n, "label": label, "attack": attack, "model": model_name,
                         "weights": weights_digest(model), "dataset": dataset, "data_dir": data_dir, "split": split,
                         "first_image": 0, "batch_size": batch_size, "command": command}

    def clean(self, rows: slice, x, predicted):
        self.tensors["clean_predictions"][rows] = predicted.cpu()

    def adversarial(self, rows: slice, x, predicted):
        if "adversarial" not in self.tensors:
            self.tensors["adversarial"] = torch.empty((len(self.tensors["labels"]), *x.shape[1:]))
        self.tensors["adversarial"][rows] = x.detach().float().cpu()
        self.tensors["predictions"][rows] = predicted.cpu()

    def save(self, path: Path):
        from safetensors.torch import save_file

        from robustlab.checkpoint import atomic_write, versions
        if "adversarial" not in self.tensors or (self.tensors["predictions"] < 0).any():
            raise RuntimeError("the attack did not run on every image")  # a bug here, not the user's input
        text = json.dumps({**self.metadata, "versions": versions(), **provenance.record()}, default=str)
        # the folder was checked before the attack; a full disk now is one line from atomic_write
        atomic_write(path, lambda tmp: save_file(self.tensors, str(tmp), metadata={"robustlab": text}))


ADVERSARIAL_TENSORS = ("clean", "adversarial", "labels", "clean_predictions", "predictions")


def load_adversarial(path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a file that `robustlab eval --save-adversarial` or `evaluate_model(save_adversarial=)`
    wrote: `clean` (N×C×H×W uint8), `adversarial` (float32 in [0, 1]), `labels`, `clean_predictions` and
    `predictions` (on the adversarial inputs); the metadata names the attack, ε, the model, its weights' digest and
    the images (the first N of a split)."""
    from safetensors import SafetensorError, safe_open
    path = Path(path)
    if path.is_dir():
        raise RobustlabError(f"{path} is a folder; load_adversarial reads the file that --save-adversarial wrote")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(header["robustlab"]) if "robustlab" in header else None
    except (SafetensorError, OSError, ValueError) as exc:
        raise RobustlabError(f"{path} is not a readable safetensors file ({str(exc).splitlines()[0]})") from None
    if not isinstance(meta, dict):
        raise RobustlabError(f"{path} is a safetensors file without robustlab's metadata: no adversarial examples")
    if meta.get("format") != ADVERSARIAL_FORMAT:
        raise RobustlabError(f"{path} holds no adversarial examples (its format is {meta.get('format')!r}, not "
                             f"{ADVERSARIAL_FORMAT})")
    if sorted(tensors) != sorted(ADVERSARIAL_TENSORS) or {len(t) for t in tensors.values()} != {meta.get("n")}:
        raise RobustlabError(f"{path} is damaged: expected {', '.join(ADVERSARIAL_TENSORS)} of {meta.get('n')} "
                             f"images, found {', '.join(f'{k} ({len(v)})' for k, v in tensors.items()) or 'none'}")
    return tensors, meta


REPORT_FILES = ("report.md", "report.json", "autoattack_state.safetensors", "autoattack_state.json")


def check_adversarial_file(path, eps, out=None, named: Callable[[str], str] = str) -> Path:
    """Where adversarial examples go, checked before the attack: one process (each rank attacks its own batches),
    an attack that runs (ε > 0), a new file or one of examples (never a checkpoint, nor a file of the report in
    `out`), in a folder it can write."""
    from robustlab import distributed
    flag = named("save_adversarial")
    if distributed.world_size() > 1:
        raise RobustlabError(f"{flag} runs in one process: each torchrun rank attacks only its share of the images")
    if eps == 0:
        raise RobustlabError(f"{flag} needs ε > 0: at ε = 0 no attack runs")
    text = os.fspath(path)
    if not text or text.endswith(("/", os.sep)) or Path(text).is_dir():
        raise RobustlabError(f"{flag} {text!r} names no file; give one, e.g. runs/x/adversarial.safetensors")
    path = Path(text)
    if out is not None and path.name in REPORT_FILES and path.resolve().parent == Path(out).resolve():
        raise RobustlabError(f"{flag} {path} is a file of the evaluation's own report; choose another name")
    if path.exists():  # only examples of an earlier call may be replaced: a checkpoint, say, never
        try:
            load_adversarial(path)
        except RobustlabError:
            raise RobustlabError(f"{flag} {path} exists and holds no adversarial examples; choose another file") \
                from None
    output_dir(path.parent, flag)
    try:
        with tempfile.NamedTemporaryFile(dir=path.parent):
            pass
    except OSError as exc:
        raise RobustlabError(f"{flag} {path}: cannot write in {path.parent} ({exc.strerror})") from None
    return path


def measure_all(model, images, info, measure, *, suite, attack_at, label, norm, eps, out_dir, ood, seed, batch_size,
                budget, keep=None) -> tuple:
    """(clean, robust, report rows, extra results, plots): clean accuracy and the attack, or with suite="standard"
    the whole suite (robustlab.evaluate.suite); `budget`: its aa_n, aa_steps, aa_queries, sanity_n and cifar_c_dir
    where given. `keep`: an `AdversarialExamples` that records the clean and the attack's passes."""
    if suite != "standard":
        clean = measure(images, 0, "clean", keep and keep.clean)
        return clean, measure(images, eps, label, keep and keep.adversarial) if eps > 0 else clean, None, {}, {}
    from robustlab.evaluate.suite import run_suite
    rows, extra, plots = run_suite(model, images, info, norm=norm, eps=eps, attack_at=attack_at, pgd_label=label,
                                   out_dir=out_dir, ood=ood, seed=seed, batch_size=batch_size, keep=keep,
                                   **{k: v for k, v in budget.items() if v is not None})
    return rows[0]["accuracy"], rows[1]["accuracy"], rows, extra, plots


def results_dict(run: dict, clean, robust, n, label, start, rows=None, extra=None, *, attack, command=None) -> dict:
    """What report.json holds (and `write_report` reads)."""
    return {"run": run, "attack": attack, "label": label, "clean": clean, "robust": robust, "n": n,
            "wall_s": round(time.perf_counter() - start, 1),
            "rows": rows or [{"name": "clean", "n": n, "accuracy": clean}, {"name": label, "n": n, "accuracy": robust}],
            **(extra or {}), "command": command, **provenance.record()}


def evaluate_model(model, data, *, out=None, name: str | None = None, split: str = "test", n: int | None = None,
                   attack: str = "pgd", norm: str | None = None, eps: float | None = None, steps: int | None = None,
                   step_size: float | None = None, restarts: int | None = None, tau: float | None = None,
                   suite: str = "standard", aa_n: int | None = None, aa_steps: int | None = None,
                   aa_queries: int | None = None, sanity_n: int | None = None, ood: bool | None = None,
                   cifar_c_dir=None, seed: int = 0, batch_size: int = 500, sweep_n: int = SWEEP_N, data_dir=None,
                   save_adversarial=None) -> dict:
    """The evaluation of `robustlab eval` for a model of your own, with the same report.

    `model`: any torch.nn.Module that maps N×C×H×W float32 images in [0, 1] to logits (normalization inside it),
    on the device where the evaluation should run; its mode, weights and gradients are left as they were. `data`:
    a dataset name, read as `load_dataset` reads it (from `data_dir`), or the `Splits` that `load_dataset`
    returned. `name` titles the report (default: the model's class). The other keywords are `robustlab eval`'s
    options:
    - `attack`: pgd (default), apgd-ce, pgd-smooth (temperature `tau`), fgsm or fgm; `norm`: linf unless the
      attack's own (fgm: l2). Not given, ε, steps, step size and restarts are the protocol's evaluation PGD for the
      dataset and norm; apgd-ce takes 100 steps and one restart, fgsm and fgm one step of ε.
    - `suite="standard"` (the default) adds AutoAttack-standard (`aa_steps` 100, `aa_queries` 5,000, on the first
      `aa_n` images), the gradient-masking checks (on `sanity_n`, 500) and the corruption suite (`ood`, on;
      generated, or the published CIFAR-10/100-C files of the folder `cifar_c_dir`); `suite="none"` measures clean
      accuracy and the attack only.
    - `n`: the first n images of `split` (test, or val for choices that must not see the test set, which writes
      nothing); `seed` seeds each batch's attack from its index, so `batch_size` is part of the figure's recipe.
    - `out`: the folder for report.md, report.json, the plots (the ε sweep on the first `sweep_n` images, the
      gallery) and AutoAttack's resumable state. Without it nothing is written and no sweep runs.
    - `save_adversarial`: a file for the attack's adversarial examples, the ones behind its figure (with
      suite="standard", the PGD row's; AutoAttack's are in its state file in `out`), with the clean images and
      the predictions on both (`load_adversarial` reads it back).
    Returns what report.json holds.
    """
    call = {k: v for k, v in locals().items() if k not in ("model", "data")}  # the keywords, for the report
    from robustlab import distributed
    from robustlab.data import Splits, check_cifar_c, load_dataset

    check_choice("split", split, ("test", "val"))
    check_choice("suite", suite, ("none", "standard"))
    check_attack_options(attack, norm=norm, steps=steps, step_size=step_size, restarts=restarts, tau=tau)
    for key in ("n", "steps", "restarts", "aa_n", "aa_steps", "aa_queries", "sanity_n", "batch_size"):
        if call[key] is not None:  # not given: the default
            check_integer(key, call[key])
    check_integer("sweep_n", sweep_n, 0)
    check_integer("seed", seed, 0, below=2 ** 63)  # what torch.Generator.manual_seed takes
    for key in ("step_size", "tau"):
        value = call[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)
                                  or not 0 < value < math.inf):
            raise RobustlabError(f"{key} must be a finite number > 0, got {value!r}")
    if suite == "none" and (suite_only := [k for k in ("aa_n", "aa_steps", "aa_queries", "sanity_n", "ood",
                                                       "cifar_c_dir") if call[k] is not None]):
        raise RobustlabError(f"{they_apply(suite_only)} to suite='standard'")
    if ood is False and cifar_c_dir is not None:
        raise RobustlabError("cifar_c_dir names the corruption files of the OOD suite, which ood=False skips")
    if suite == "standard" and split == "val":
        raise RobustlabError("suite='standard' reports on the test split; on split='val' use suite='none'")
    if split == "val" and out is not None:
        raise RobustlabError("split='val' writes no report (its figures are for choices, not for quoting); pass "
                             "out=None")
    if isinstance(data, str):
        data = load_dataset(data, data_dir)
    elif not isinstance(data, Splits):
        raise RobustlabError(f"data must be a dataset name or the Splits that load_dataset returns, not a "
                             f"{type(data).__name__}")
    elif data_dir is not None:
        raise RobustlabError("data_dir reads a dataset named by data; these Splits are loaded already: drop data_dir")
    info = data.info
    norm, eps, steps, step_size, restarts = attack_budget(attack, info.name, norm or "linf", eps=eps, steps=steps,
                                                          step_size=step_size, restarts=restarts,
                                                          input_shape=info.input_shape)
    if suite == "standard" and eps == 0:
        raise RobustlabError("suite='standard' needs eps > 0: AutoAttack and the sanity checks attack at ε")
    images = getattr(data, split)
    images = images.subset(n) if n else images
    check_model(model, images.images, info)
    if cifar_c_dir is not None:  # before the attacks: a folder of another dataset fails now, not hours later
        check_cifar_c(cifar_c_dir, images.images.shape[1:], images.labels)
    if attack == "pgd-smooth":
        check_smoothable(model, "the model")
    if save_adversarial is not None:  # after the model's check: a refused model leaves no folder behind
        save_adversarial = check_adversarial_file(save_adversarial, eps, out)
    out = output_dir(out, "out") if out is not None else None
    attack_at, label = attack_at_radius(attack, norm, eps, steps, step_size, restarts, tau)
    measure = measure_with(model, attack_at, batch_size=batch_size, seed=seed)

    name = name or type(model).__name__
    keywords = ", ".join(f"{k}={str(v) if isinstance(v, os.PathLike) else v!r}" for k, v in call.items()
                         if v != SIGNATURE[k] and k != "name")
    command = f"evaluate_model({name}, {info.name!r}{', ' + keywords if keywords else ''})"
    attack_record = {"name": attack, "norm": norm, "eps": eps, "steps": steps, "step_size": step_size,
                     "restarts": restarts, "seed": seed}
    kept = AdversarialExamples(images, model=model, model_name=name, label=label, attack=attack_record,
                               dataset=info.name, split=split, batch_size=batch_size, data_dir=data_dir,
                               command=command) if save_adversarial is not None else None
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:  # without `out`, the suite's plots and state are dropped
        clean, robust, rows, extra, plots = measure_all(
            model, images, info, measure, suite=suite, attack_at=attack_at, label=label, norm=norm, eps=eps,
            out_dir=out or Path(scratch), ood=ood is not False, seed=seed, batch_size=batch_size,
            budget={"aa_n": aa_n, "aa_steps": aa_steps, "aa_queries": aa_queries, "sanity_n": sanity_n,
                    "cifar_c_dir": cifar_c_dir}, keep=kept)
    if kept is not None:  # first: a failure in what follows loses no attack
        kept.save(save_adversarial)
    results = results_dict({"model": name, "dataset": info.name}, clean, robust, len(images), label, start, rows,
                           extra, attack=attack_record, command=command)
    results["unit"] = "images"
    if out is not None and split == "test" and eps > 0 and sweep_n > 0:
        results["sweep"] = eps_sweep(measure, images, eps, sweep_n, max_eps=largest_radius(norm, info.input_shape))
    if out is not None and distributed.is_main():
        if eps > 0:
            add_gallery(model, images, attack_at(eps), label, info.class_names, out, plots, seed)
        finish_report(out, results, plots, name, f"{name} on {info.name}")
    return {k: v for k, v in results.items() if k != "sanity_markdown"}


SIGNATURE = {k: p.default for k, p in inspect.signature(evaluate_model).parameters.items()}
