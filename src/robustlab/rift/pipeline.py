"""RiFT end to end: MRC → fine-tune → interpolate → checkpoint, plots, and a before/after report.

Every choice (the module in automatic mode, the learning rate, α) is made on the validation split; the test
set is read only afterwards, to report. Each step is cached in the output directory (`rift_state.json`, the
fine-tuning runs, AutoAttack states), so a killed run continues where it stopped.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from robustlab import checkpoint, provenance
from robustlab.attacks import apgd_targeted, autoattack_accuracy, dlr_loss, first_success, pgd
from robustlab.checkpoint import weights_digest
from robustlab.data import ImageSet, Splits, check_cifar_c
from robustlab.errors import RobustlabError, check_choice
from robustlab.evaluate.accuracy import accuracy
from robustlab.evaluate.corruptions import ood_accuracy
from robustlab.models import fast_memory_format
from robustlab.protocol import threat_defaults
from robustlab.rift.finetune import ALPHAS, BN_MODES, AlphaSearch, finetune, module_names, recalibrate_bn
from robustlab.rift.mrc import MRCConfig, compute_mrc, file_sha256, plot_mrc, ranked, read_json
from robustlab.rift.report import plot_alpha, write_report
from robustlab.training.registry import METHODS
from robustlab.training.run import load_model


# "+apgd-t": APGD on the targeted DLR loss against the clean image's 3 most likely wrong classes, 20 steps each; the
# part of AutoAttack (there: 9 targets × 100 steps) that broke RiFT models which untargeted PGD had passed.
CHECK_TARGETS, CHECK_APGD_STEPS = 3, 20
# Each robust check along α, and how the report words it after "fixed-seed PGD-10".
ALPHA_CHECKS = {
    "pgd": "",
    "pgd+dlr": " on cross-entropy and on DLR, the worse per image",
    "pgd+dlr+apgd-t": f" on cross-entropy and on DLR, then APGD-T ({CHECK_TARGETS} targets × "
                      f"{CHECK_APGD_STEPS} steps), the worst per image",
}
ALPHA_ATTACKS = tuple(ALPHA_CHECKS)


def alpha_check(name: str, attack, eps: float, norm: str):
    """The robust check along α that `--alpha-attack` names, built on the training attack `attack`."""
    if name == "pgd":
        return attack
    checks = [attack, partial(attack, loss_fn=dlr_loss)]
    if name.endswith("+apgd-t"):
        checks.append(partial(apgd_targeted, eps=eps, norm=norm, steps=CHECK_APGD_STEPS,
                              n_target_classes=CHECK_TARGETS))
    return first_success(*checks)


@dataclass
class RiftSettings:
    module: str | None = None       # None: the lowest-MRC module (the paper's pick); "a,b": several together
    auto: int = 0                   # > 0: also try the `auto` least-critical modules × `lrs`, keep the best
    lr: float = 0.001               # reference code's default
    lrs: tuple = (0.001, 0.01)      # the automatic mode's grid (the reference default and 10×)
    epochs: int = 10
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: str | None = None      # None: the source run's training augmentation (else the dataset's default)
    bn: str = "update"              # "update": re-estimate BatchNorm statistics while fine-tuning (reference)
    recal_n: int = 10000            # bn="recalibrate": training images whose PGD examples give θ(α)'s statistics
    alpha_attack: str = "pgd"       # the robust check along α: "pgd" (the training attack, cross-entropy), or
                                    # "pgd+dlr": per image the first success of it and the same PGD on the DLR
                                    # loss; "pgd+dlr+apgd-t": then also a short APGD-T
    seed: int = 0
    train_n: int | None = None      # fine-tune on the first n training images (tests, quick looks)
    val_n: int | None = None        # validation images for the fine-tuned epoch and α (None: all)
    tolerance: float = 0.001        # robust accuracy may fall this much below the original's: a fraction, not
                                    # points (0.001 = 0.1 point = the command line's --tolerance 0.1)
    mrc: MRCConfig = field(default_factory=MRCConfig)

    def validate(self):
        check_choice("bn", self.bn, BN_MODES)
        check_choice("alpha attack", self.alpha_attack, ALPHA_ATTACKS)
        self.mrc.validate()
        if not (self.auto >= 0 and self.recal_n > 0 and self.epochs > 0 and self.lr > 0 and all(lr > 0 for lr in self.lrs)
                and 0 <= self.tolerance <= 1):  # written as what must hold, so that nan fails
            raise RobustlabError("auto must be >= 0, recal_n, epochs and learning rates > 0, tolerance a fraction in "
                                 "[0, 1] (0.001 = 0.1 point)")


@dataclass
class TestSettings:
    n: int | None = None            # first n test images (None: all)
    aa: bool = True
    aa_n: int | None = None         # AutoAttack on the first aa_n of them (None: the same n)
    aa_steps: int = 100             # protocol
    aa_queries: int = 5000          # protocol
    ood: bool = True
    cifar_c_dir: str | None = None  # OOD on the published CIFAR-10/100-C files there (None: generated corruptions)
    batch_size: int = 500


class State:
    """rift_state.json: everything measured so far, rewritten atomically after each measurement."""

    def __init__(self, path: Path, source: dict):
        self.path, self.data = path, read_json(path)
        if self.data and self.data.get("source", {}).get("sha256") != source["sha256"]:
            raise RobustlabError(f"{path.parent} holds RiFT results for another checkpoint "
                                 f"({self.data['source'].get('path')}); choose another --out")
        self.data["source"] = source
        self.data.setdefault("candidates", {})
        self.data.setdefault("test", {})
        self.save()  # at once: a killed first run's --out is then refused to another checkpoint from the start

    def save(self):
        checkpoint.write_json(self.path, self.data, default=float)


def candidate_id(module: str, lr: float) -> str:
    return "+".join(name.removeprefix("net.") for name in module.split(",")) + f"-lr{lr:g}"


def rift(source, data: Splits, out, settings: RiftSettings = RiftSettings(), test: TestSettings | None = TestSettings(),
         *, mrc_dir=None, show=None, command: str | None = None, device="cpu") -> dict:
    """Run RiFT on the checkpoint file `source`, writing `out`/best.safetensors, plots and rift_report.md/json.

    `mrc_dir`: where the MRC cache lives (default `out`/mrc). `test=None` stops after the checkpoint and the
    validation plots: the test split is then never read. Every step runs on `device`. Returns the report's
    dictionary.
    """
    from robustlab.training.run import resolve_checkpoint
    settings.validate()
    out, source, device = Path(out), resolve_checkpoint(source), torch.device(device)  # a run directory: its best
    kept = out / "best.safetensors"
    if kept.exists() and "rift" not in checkpoint.read_metadata(kept):  # e.g. --out RUN: the robust model itself
        raise RobustlabError(f"{kept} is a trained model that RiFT's result would overwrite; choose another --out")
    if test is not None and test.ood and test.cifar_c_dir is not None:  # the files now, the test labels at the end
        check_cifar_c(test.cifar_c_dir, checkpoint.read_metadata(source)["dataset"]["input_shape"])

    def load():  # channels_last: ~2× faster convolutions on CPUs
        fresh = load_model(source)
        return fresh.to(device, memory_format=fast_memory_format(fresh, device))

    out.mkdir(parents=True, exist_ok=True)
    model = load()
    meta = model.checkpoint_meta
    dataset, norm = meta["dataset"]["name"], meta.get("method", {}).get("norm", "linf")
    budget = threat_defaults(dataset, norm)
    threat = {"norm": norm, "eps": budget.train.eps, "steps": budget.train.steps, "step_size": budget.train.step_size}
    paper_module = (",".join(module_names(model, settings.module))  # bad names fail early
                    if settings.module is not None else None)
    state = State(out / "rift_state.json", {"path": str(source), "sha256": file_sha256(source),
                                             "model": meta["model"], "method": meta.get("method", {}).get("name")})
    wall = {}

    # 1. Module robust criticality, on a fixed PGD set from the validation split.
    mrc = compute_mrc(model, data.val, mrc_dir or out / "mrc", source_sha256=state.data["source"]["sha256"],
                      threat=threat, config=settings.mrc, show=show)
    wall["adversarial set"] = mrc["adv_set_seconds"]
    wall[f"MRC ({len(mrc['modules'])} modules)"] = round(sum(r["seconds"] for r in mrc["modules"].values()), 1)
    order = ranked(mrc)
    paper_module = paper_module or order[0]
    candidates = [(paper_module, settings.lr)]
    if settings.auto:
        candidates += [(m, lr) for m in order[:settings.auto] for lr in settings.lrs if (m, lr) not in candidates]

    # 2-3. Fine-tune each candidate, then choose α on validation data.
    run_meta = {k: meta[k] for k in ("model", "dataset")}
    # The reference fine-tunes with the robust model's own training augmentation; a different one shifts the
    # data: preact-resnet18-small trained without crops classifies 87.1% of 10,000 clean training images, 73.4% cropped.
    augment = settings.augment or meta.get("config", {}).get("augment")
    robust_state = {k: v.clone() for k, v in model.state_dict().items()}
    val = data.val.subset(settings.val_n) if settings.val_n else data.val
    tune_data = replace(data, val=val)
    attack = partial(pgd, eps=threat["eps"], norm=norm, steps=threat["steps"], step_size=threat["step_size"])
    curve_key = {"val_n": len(val), "attack": threat, "seed": settings.seed, "bn": settings.bn}
    check = alpha_check(settings.alpha_attack, attack, threat["eps"], norm)
    if settings.alpha_attack != "pgd":  # (absent from the key by default: earlier caches stay valid)
        curve_key["alpha_attack"] = settings.alpha_attack
    prepare, tune_bn = None, settings.bn
    if settings.bn == "recalibrate":  # fine-tune with the statistics fixed, then re-estimate them for each θ(α)
        prepare, recal_key = _recalibration(settings, data, meta.get("method", {}), attack, show)
        tune_bn = "keep"
        curve_key.update(recal_key)
    searches, tuned_states = {}, {}
    work = load()  # holds θ(α) while it is measured
    for i, (module, lr) in enumerate(candidates, 1):
        cid = candidate_id(module, lr)
        if show is not False and len(candidates) > 1:  # the fine-tuning bars name epochs only
            tqdm.write(f"candidate {i}/{len(candidates)}: {module}, lr {lr:g}", file=sys.stderr)  # beside the bars
        tuned, record = finetune(model, module, tune_data, out / "finetune" / cid, run_meta, lr=lr,
                                 epochs=settings.epochs, batch_size=settings.batch_size, momentum=settings.momentum,
                                 weight_decay=settings.weight_decay, augment=augment, bn=tune_bn,
                                 seed=settings.seed, train_n=settings.train_n, show=show)
        tuned_states[cid] = tuned.state_dict()
        entry = state.data["candidates"].setdefault(cid, {})
        key = {**curve_key, "tuned": weights_digest(tuned)}  # a curve belongs to one fine-tuned endpoint
        if entry.get("curve_key") != key:
            entry.update(curve_key=key, curve={})
        # Several modules fine-tuned together: the largest of their MRCs.
        entry.update(module=module, lr=lr, finetune=record,
                     mrc=max(mrc["modules"][name]["mrc"] for name in module.split(",")))
        searches[cid] = AlphaSearch(work, robust_state, tuned_states[cid], val, val, check, seed=settings.seed,
                                    curve=entry["curve"], on_update=lambda _: state.save(), show=show,
                                    prepare=prepare)
        # The automatic mode measures robust accuracy only where it decides; the finalists' curves are completed below.
        entry["alpha"] = searches[cid].choose(ALPHAS, settings.tolerance, full=not settings.auto)
        state.save()
    paper = candidate_id(*candidates[0])
    entries = {candidate_id(m, lr): state.data["candidates"][candidate_id(m, lr)] for m, lr in candidates}

    def val_clean(cid):
        return entries[cid]["curve"][f"{entries[cid]['alpha']:.2f}"]["clean"]

    best = max(entries, key=val_clean)  # first of equals: the paper's pick, then the MRC order
    for cid in dict.fromkeys((paper, best)):
        searches[cid].choose(ALPHAS, settings.tolerance, full=True)
    for cid, entry in entries.items():
        point = entry["curve"][f"{entry['alpha']:.2f}"]
        entry.update(val_clean=point["clean"], val_robust=point.get("robust"))
        wall[f"fine-tuning {cid}"] = entry["finetune"]["train_seconds"]
        wall[f"α search {cid}"] = round(sum(p.get("seconds", 0) for p in entry["curve"].values()), 1)
    state.data.update(paper_pick=paper, chosen=best, mrc_ranking=order, settings=settings_dict(settings))
    state.save()

    # The result: an ordinary robustlab checkpoint.
    chosen = entries[best]
    final = load()
    final.load_state_dict(searches[best].state(chosen["alpha"]))
    rift_meta = {"module": chosen["module"], "alpha": chosen["alpha"], "lr": chosen["lr"], "bn": settings.bn,
                 **({k: curve_key[k] for k in ("recal_n", "recal_inputs")} if prepare else {}),
                 "source": state.data["source"], "paper_pick": paper, "automatic": bool(settings.auto),
                 "mrc": {n: r["mrc"] for n, r in mrc["modules"].items()},
                 "val": {"clean": chosen["val_clean"], "robust": chosen["val_robust"],
                         "robust_original": chosen["curve"]["0.00"]["robust"], "images": len(val)}}
    checkpoint.save(out / "best.safetensors", checkpoint.prefixed("model.", final.state_dict()),
                    {**run_meta, "method": meta.get("method", {}), "kind": "model", "epoch": meta.get("epoch"),
                     # the source's training, for reports
                     **{k: meta[k] for k in ("config", "epochs_total") if k in meta},
                     "metrics": {"val_clean": chosen["val_clean"], "val_robust": chosen["val_robust"]},
                     "rift": rift_meta})

    title = f"{meta['model']['name']} ({state.data['source']['method']}) on {dataset}"
    plot_mrc(mrc, out / "mrc.png", f"MRC per module, {title}", highlight=set(chosen["module"].split(",")))
    plot_alpha({cid: entries[cid] for cid in dict.fromkeys([paper, best, *entries])}, out / "alpha.png",
               f"Validation accuracy of θ(α), {title}", settings.tolerance)

    # 4. Before / after on the test set (read here for the first time).
    models = {"original": model, "rift": final}
    if paper != best:  # automatic mode: is the winner better than the paper's pick on the test set too?
        paper_model = load()
        paper_model.load_state_dict(searches[paper].state(entries[paper]["alpha"]))
        models["paper pick"] = paper_model
    results = _test_report(models, data, budget, norm, test, state, out, show, wall) if test is not None else {}
    report = {"source": state.data["source"], "dataset": dataset, "norm": norm, "settings": settings_dict(settings),
              "test_settings": asdict(test) if test else None, "mrc": mrc, "mrc_ranking": order, "paper_pick": paper,
              "chosen": best, "rift": rift_meta, "candidates": entries, "test": results, "wall_s": wall,
              "command": command, "alpha_check": ALPHA_CHECKS[settings.alpha_attack], **provenance.record()}
    write_report(out, report)
    return report


def _recalibration(settings: RiftSettings, data: Splits, method: dict, attack, show):
    """--bn recalibrate: the function that re-estimates θ(α)'s BatchNorm statistics, and what keys its curve."""
    if not isinstance(data.train, ImageSet):
        raise RobustlabError("--bn recalibrate needs a training set held in memory; this dataset is streamed")
    recal = data.train.subset(settings.recal_n)
    # The kind of input the source run's statistics were measured on (PGD-AT: adversarial; TRADES: both).
    source_method = METHODS.get(method.get("name"))
    inputs = source_method.batchnorm_inputs_of(method) if source_method else "adversarial"
    # The training attack's examples: its last iterates, not the first that fools the model, as `pgd` keeps.
    train_attack = partial(attack, keep_best=False)
    prepare = partial(recalibrate_bn, images=recal, attack=train_attack if "adversarial" in inputs else None,
                      clean="clean" in inputs, joint="joint" in inputs, seed=settings.seed, show=show)
    return prepare, {"recal_n": len(recal), "recal_inputs": inputs}


def _test_report(models: dict, data: Splits, budget, norm: str, test: TestSettings, state: State, out: Path, show,
                 wall: dict) -> dict:
    """Step 4, each model on the test set (read here for the first time); the same weights are measured once."""
    results, seen = {}, {}
    for name, m in models.items():
        results[name] = evaluate_test(m, data, threat_eval=budget.eval, norm=norm, settings=test, state=state,
                                      out=out, show=show)
        digest = results[name]["weights"]
        if digest in seen:  # e.g. α = 0
            results[name]["same_weights_as"] = seen[digest]
            continue
        seen[digest] = name
        for metric, seconds in results[name]["seconds"].items():
            wall[f"test {name}: {metric}"] = seconds
    return results


def settings_dict(settings: RiftSettings) -> dict:
    d = asdict(settings)
    d["lrs"] = list(settings.lrs)
    return d


def evaluate_test(model, data: Splits, *, threat_eval, norm, settings: TestSettings, state: State, out: Path,
                  show=None) -> dict:
    """Clean, protocol PGD, OOD mean and AutoAttack accuracy on the test set, each cached once measured
    (keyed by the model's weights, so that a resumed or repeated run measures nothing twice)."""
    test = data.test.subset(settings.n) if settings.n else data.test
    digest = weights_digest(model)
    key = {"n": len(test), "aa_n": settings.aa_n, "aa_steps": settings.aa_steps, "aa_queries": settings.aa_queries}
    # AutoAttack's resumable state is kept per setting too: another --aa-n once found the old state and stopped
    settings_digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
    cached = state.data["test"].setdefault(digest, {})
    if cached.get("key") != key:
        cached.clear()
        cached.update(key=key, seconds={})
    restarts = f"×{threat_eval.restarts}" if threat_eval.restarts > 1 else ""
    pgd_label = f"PGD-{threat_eval.steps}{restarts}"
    attack = partial(pgd, eps=threat_eval.eps, norm=norm, steps=threat_eval.steps, step_size=threat_eval.step_size,
                     restarts=threat_eval.restarts)
    jobs = {"clean": lambda: accuracy(model, test, batch_size=settings.batch_size, progress="test clean", show=show),
            pgd_label: lambda: accuracy(model, test, attack=attack, batch_size=settings.batch_size, seed=0,
                                        progress=f"test {pgd_label}", show=show)}
    if settings.ood:
        published = settings.cifar_c_dir is not None  # its own name: cached apart from the generated suite's
        jobs["OOD mean (the published CIFAR-C files)" if published else "OOD mean"] = lambda: ood_accuracy(
            model, test, progress=show is not False, batch_size=settings.batch_size, cifar_c_dir=settings.cifar_c_dir,
            cache_dir=Path.home() / ".cache" / "robustlab" / "corruptions").mean
    if settings.aa:
        aa_dir = out / "eval"
        aa_dir.mkdir(exist_ok=True)
        jobs["AutoAttack"] = lambda: autoattack_accuracy(
            model, test, threat_eval.eps, norm, n=settings.aa_n, batch_size=max(1, settings.batch_size // 2), seed=0,
            progress=show is not False, state_path=aa_dir / f"autoattack-{digest}-{settings_digest}.safetensors",
            steps=settings.aa_steps, queries=settings.aa_queries).robust_accuracy
    for name, job in jobs.items():
        if name not in cached:
            start = time.perf_counter()
            cached[name] = job()
            cached["seconds"][name] = round(time.perf_counter() - start, 1)
            state.save()
    return {"weights": digest, "n": len(test), "aa_n": min(settings.aa_n or len(test), len(test)),
            **{k: cached[k] for k in jobs}, "seconds": dict(cached["seconds"])}
