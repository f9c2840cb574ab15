"""`robustlab eval RUN`: clean accuracy and one attack, or the standard suite, with a report; text runs and
transfer attacks too. Wired into robustlab/cli.py by `add_parser`."""
from __future__ import annotations

import json
import shlex
import sys
import time
from functools import partial
from pathlib import Path

from robustlab.cli import flag, given
from robustlab.errors import RobustlabError, check_at_most, check_choice, output_dir, they_apply
from robustlab.evaluate.evaluation import (SWEEP_N, AdversarialExamples, add_gallery, attack_at_radius,
                                           attack_budget, check_adversarial_file,
                                           check_attack_options, check_smoothable, eps_sweep, finish_report,
                                           measure_all, measure_with, results_dict)
from robustlab.protocol import largest_radius


def add_parser(sub):
    from robustlab.cli import nonnegative, positive, seed

    e = sub.add_parser("eval", help="evaluate a trained run under attack and write RUN/report.md")
    e.add_argument("run", help="run directory or checkpoint file")
    e.add_argument("--attack", default="pgd", help="fgsm, fgm, pgd, apgd-ce (AutoAttack's first stage: APGD on the "
                   "cross-entropy with its own step sizes; 100 steps unless --steps), or pgd-smooth: PGD on the margin "
                   "loss with ReLU's gradient smoothed, an adaptive attack for gradient masking (robustlab.attacks.smooth)")
    e.add_argument("--tau", type=positive(float), help="pgd-smooth: temperature of ReLU's sigmoid "
                   "gradient (default 0.1)")
    e.add_argument("--norm", help="linf or l2 (default: the run's)")
    e.add_argument("--eps", type=nonnegative(float), help="default: the protocol's for the run's dataset (a text run: "
                   "0.5, L2 in the embedding's scale)")
    e.add_argument("--steps", type=positive(int), help="PGD steps (default: the protocol's)")
    e.add_argument("--step-size", type=positive(float), help="PGD step in pixel scale (default: the protocol's, scaled "
                   "with --eps; 2.5·ε/steps with another --steps)")
    e.add_argument("--restarts", type=positive(int), help="PGD restarts, each on the images still robust (default: "
                   "the protocol's)")
    e.add_argument("--n", "--subset", dest="n", type=positive(int),
                   help="evaluate the first N test images (default: all); under torchrun write --subset")
    e.add_argument("--split", default="test",
                   help="test (default), or val: the validation split held out of training, for choices (a recipe, "
                        "a checkpoint) that must not see the test set; prints (or --json) without writing a report")
    e.add_argument("--batch-size", type=positive(int), default=500, help="default 500")
    e.add_argument("--seed", type=seed, default=0, help="seeds the attacks' random starts, per batch (default 0)")
    e.add_argument("--sweep-n", type=nonnegative(int), help=f"test images for the accuracy-vs-ε plot (default {SWEEP_N}; "
                   "0: no plot)")
    e.add_argument("--suite", default="none", help="none, or standard: clean, PGD, AutoAttack-standard, "
                   "gradient-masking checks, corruptions (OOD)")
    e.add_argument("--aa-n", type=positive(int), help="--suite standard: AutoAttack on the first N of the evaluated "
                   "images (default: all of them)")
    e.add_argument("--aa-steps", type=positive(int), help="AutoAttack iterations (protocol: 100)")
    e.add_argument("--aa-queries", type=positive(int), help="Square queries (protocol: 5000)")
    e.add_argument("--sanity-n", type=positive(int), help="test images for the sanity checks (default 500)")
    e.add_argument("--no-ood", dest="ood", action="store_false", help="skip the corruption suite")
    e.add_argument("--cifar-c-dir", metavar="DIR", help="--suite standard: the OOD accuracy on the published "
                   "CIFAR-10-C or CIFAR-100-C files in DIR (each corruption's .npy and labels.npy), as they are, "
                   "instead of generated corruptions")
    e.add_argument("--transfer-from", metavar="SOURCE", help="black-box transfer: make the attack against SOURCE (a run "
                   "directory or checkpoint file, the same data) and score RUN on its examples, beside the attack "
                   "white-box on RUN and the worst case of the two per image; prints (or --json), writes no report")
    e.add_argument("--save-adversarial", metavar="FILE", help="write the attack's adversarial examples (the ones behind "
                   "its figure; with --suite standard, the PGD row's: AutoAttack's are in OUT/autoattack_state.safetensors, as "
                   "adv_rows for the images adv_index, broken_by per image) to FILE, a safetensors file with the labels and "
                   "the model's predictions (robustlab.evaluate.load_adversarial reads it)")
    e.add_argument("--checkpoint", help="best (default) or last, when RUN is a run directory (a kept epoch: give "
                   "RUN/epoch-NNN.safetensors as RUN)")
    e.add_argument("--data-dir", help="default: the run's own")
    e.add_argument("--json", action="store_true", help="print the results as JSON")
    e.add_argument("--out", help="folder for report.md, report.json, the plots and AutoAttack's resumable state "
                   "(default: the run's directory for its best checkpoint, RUN/eval-NAME for RUN/NAME.safetensors); "
                   "another folder keeps an earlier evaluation's report")
    e.add_argument("--threads", type=positive(int), help="torch CPU threads")
    e.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun: the GPU of each LOCAL_RANK)")


def cmd_eval(args) -> int:
    import torch
    from robustlab import distributed, load_model
    from robustlab.data import check_cifar_c
    from robustlab.models import fast_memory_format
    from robustlab.training.run import run_dataset

    if args.threads:
        torch.set_num_threads(args.threads)
    _check_eval_options(args)
    device = distributed.init(args.device)  # under torchrun every attack below shares the test set out over the ranks
    model = load_model(_source(args))  # a text run's model comes with its vocabulary
    if model.checkpoint_meta.get("task") == "text":
        return _eval_text(args, model.to(device), device)
    # channels_last halves the cost of model passes on CPUs (measured in the AutoAttack timing).
    model = model.to(device, memory_format=fast_memory_format(model, device))  # attacks follow the model's device
    meta = model.checkpoint_meta
    if args.attack == "pgd-smooth":
        check_smoothable(model, args.run, named=flag)
    norm, eps, steps, step_size, restarts = attack_budget(
        args.attack, meta["dataset"]["name"], args.norm or meta.get("method", {}).get("norm", "linf"), eps=args.eps,
        steps=args.steps, step_size=args.step_size, restarts=args.restarts, named=flag,
        input_shape=meta["dataset"].get("input_shape"))
    source = _transfer_source(args, model, device) if args.transfer_from else None  # fails before the data is read
    # A folder or npy test set is decoded as far as it is read: --n 1000 reads 1,000 images.
    data = run_dataset(meta, args.data_dir)
    images = getattr(data, args.split)
    _check_counts(args, images, "images")
    images = images.subset(args.n) if args.n else images
    if args.cifar_c_dir is not None:  # before the attacks: a folder of another dataset fails now, not hours later
        check_cifar_c(args.cifar_c_dir, images.images.shape[1:], images.labels)
    attack_at, label = attack_at_radius(args.attack, norm, eps, steps, step_size, restarts, args.tau)
    attack_record = {"name": args.attack, "norm": norm, "eps": eps, "steps": steps, "step_size": step_size,
                     "restarts": restarts, "seed": args.seed}
    measure = measure_with(model, attack_at, batch_size=args.batch_size, seed=args.seed)
    if args.transfer_from:
        return _eval_transfer(args, model, source, images, attack_at(eps), label)
    out = _report_dir(args)
    kept = None
    if args.save_adversarial is not None:
        save = check_adversarial_file(args.save_adversarial, eps, out, named=flag)
        kept = AdversarialExamples(images, model=model, model_name=str(_source(args)), label=label,
                                   attack=attack_record, dataset=data.info.name, split=args.split,
                                   batch_size=args.batch_size, data_dir=args.data_dir or meta["dataset"].get("data_dir"),
                                   command=_command())
    start = time.perf_counter()
    clean, robust, rows, extra, plots = measure_all(
        model, images, data.info, measure, suite=args.suite, attack_at=attack_at, label=label, norm=norm, eps=eps,
        out_dir=out, ood=args.ood, seed=args.seed, batch_size=args.batch_size,
        budget={"aa_n": args.aa_n, "aa_steps": args.aa_steps, "aa_queries": args.aa_queries, "sanity_n": args.sanity_n,
                "cifar_c_dir": args.cifar_c_dir}, keep=kept)
    results = _results(meta, clean, robust, len(images), label, start, rows, extra, attack=attack_record)
    if kept is not None:
        kept.save(save)
        print(f"{len(images)} adversarial examples: {save}", file=sys.stderr)
    if args.split == "test" and eps > 0 and distributed.is_main():
        add_gallery(model, images, attack_at(eps), label, data.info.class_names, out, plots, args.seed)
    return _finish_eval(args, meta, results, plots, measure, images, out, unit="images")


def _eval_text(args, model, device) -> int:
    """`robustlab eval` of a text run: clean and embedding-space PGD accuracy (docs/text.md), the ε sweep and the
    training curves, in the same report as an image run's."""
    from robustlab.text.adversary import embedding_pgd
    from robustlab.text.data import load_text_dataset
    from robustlab.text.training import EVAL_EPS, EVAL_STEPS, text_accuracy

    if other := given([("--attack", None if args.attack == "pgd" else args.attack),
                       ("--suite", None if args.suite == "none" else args.suite),
                       ("--restarts", None if (args.restarts or 1) == 1 else args.restarts),
                       ("--transfer-from", args.transfer_from), ("--save-adversarial", args.save_adversarial)]):
        raise RobustlabError(f"{args.run} is a text run, evaluated with embedding-space PGD only: drop "
                             f"{', '.join(other)}")
    meta = model.checkpoint_meta
    info = meta["dataset"]
    data = load_text_dataset(info["name"], args.data_dir or info.get("data_dir"), max_len=info["max_len"],
                             vocab=model.vocab)  # the run's own vocabulary, so token ids mean what they meant
    if list(data.info.class_names) != list(info["class_names"]):  # e.g. a corpus rebuilt from other package lists
        raise RobustlabError(f"the {info['name']} data found has classes {list(data.info.class_names)}, but "
                             f"{args.run} was trained on {list(info['class_names'])}; pass the run's --data-dir")
    test = getattr(data, args.split)
    _check_counts(args, test, "texts")
    test = test.subset(args.n) if args.n else test
    # The text threat model is L2 at ε = 0.5 whatever the run trained with, as its validation was: ε = 0.5 per
    # coordinate of every token would be another, far larger ball.
    norm = args.norm or "l2"
    check_choice("norm", norm, ("l2", "linf"))  # before the clean pass, not in the attack after it
    if norm == "linf" and args.eps is None:
        raise RobustlabError(f"--norm linf needs --eps for a text run: the default ε = {EVAL_EPS} is an L2 radius per "
                             "sentence")
    eps = EVAL_EPS if args.eps is None else args.eps
    steps = args.steps or EVAL_STEPS

    def measure(texts, e, progress=None):
        attack = partial(embedding_pgd, eps=e, steps=steps, norm=norm,
                         step_size=None if args.step_size is None else args.step_size * e / eps) if e > 0 else None
        return text_accuracy(model, texts, attack=attack, batch_size=args.batch_size, device=device, progress=progress)

    step_size = 2.5 * eps / steps if args.step_size is None else args.step_size
    label = f"PGD-{steps} {norm} ε={eps:g} step {step_size:g} on the word embeddings"
    out = _report_dir(args)
    start = time.perf_counter()
    clean = measure(test, 0, "clean")
    robust = measure(test, eps, label) if eps > 0 else clean
    results = _results(meta, clean, robust, len(test), label, start,
                       attack={"name": "embedding-pgd", "norm": norm, "eps": eps, "steps": steps,
                               "step_size": step_size, "restarts": 1, "seed": args.seed})
    return _finish_eval(args, meta, results, {}, measure, test, out, unit="texts")


def _transfer_source(args, target, device):
    """The --transfer-from model, checked to be an image run of the target's data, on `device`."""
    from robustlab import load_model
    from robustlab.models import fast_memory_format

    try:
        source = load_model(args.transfer_from)
    except RobustlabError as exc:
        raise RobustlabError(f"--transfer-from: {exc}") from None
    if source.checkpoint_meta.get("task") == "text":
        raise RobustlabError(f"--transfer-from {args.transfer_from} is a text run; transfer needs an image run of "
                             f"{args.run}'s data")
    theirs, ours = source.checkpoint_meta.get("dataset", {}), target.checkpoint_meta["dataset"]
    data_of = lambda info: [info.get(k) for k in ("name", "input_shape", "class_names")]  # noqa: E731
    if data_of(theirs) != data_of(ours):
        raise RobustlabError(f"--transfer-from {args.transfer_from} was trained on {theirs.get('name')} "
                             f"{theirs.get('input_shape')}, {args.run} on {ours['name']} {ours.get('input_shape')}: "
                             "transfer needs models of the same data")
    return source.to(device, memory_format=fast_memory_format(source, device))


def _eval_transfer(args, target, source, test, attack, label) -> int:
    """`eval RUN --transfer-from SOURCE`: the attack made against SOURCE and scored on RUN (black-box), beside the same
    attack white-box on RUN. Per image the worst of the two is the robust accuracy to quote; images that only the
    transferred examples break mean the white-box attack misses them (robustlab.attacks.transfer)."""
    from robustlab import distributed
    from robustlab.attacks import transfer
    from robustlab.evaluate import correct_mask, fraction

    crafted = partial(attack, keep_best=False) if args.attack == "pgd" else attack  # the last iterate transfers better
    start = time.perf_counter()

    def correct(attack=None, progress=None):
        return correct_mask(target, test.images, test.labels, attack=attack, batch_size=args.batch_size,
                            seed=args.seed, progress=progress)
    clean, white, moved = correct(None, "clean"), correct(attack, label), correct(transfer(source, crafted),
                                                                                 f"{label}, made on the source")
    results = {"split": args.split, "n": len(test), "clean": fraction(clean), "white_box": fraction(white),
               "transfer": fraction(moved), "worst_case": fraction(white & moved),
               "transfer_only": int((white & ~moved).sum()), "attack": label, "source": str(args.transfer_from),
               "wall_s": round(time.perf_counter() - start, 1)}
    if not distributed.is_main():
        return 0
    if args.json:
        print(json.dumps(results))
        return 0
    print(f"clean             {results['clean']:7.2%}  ({len(test)} {args.split} images)\n"
          f"white-box         {results['white_box']:7.2%}  {label}\n"
          f"transferred       {results['transfer']:7.2%}  the same attack made on {args.transfer_from}\n"
          f"worst of the two  {results['worst_case']:7.2%}")
    if n := results["transfer_only"]:
        print(f"{n} image{'s' if n > 1 else ''} fell to the transferred examples but not to the white-box attack: "
              "it misses them (masked gradients, or too few steps); quote the worst case")
    return 0


def _check_eval_options(args):
    """Options this evaluation would ignore are refused, so that a report never names an attack other than the one
    that ran: FGSM and FGM take one step of size ε in their own norm, only pgd-smooth has a τ, and the AutoAttack,
    sanity and OOD options belong to --suite standard. Validation and transfer figures are printed, not reported."""
    check_attack_options(args.attack, norm=args.norm, steps=args.steps, step_size=args.step_size,
                         restarts=args.restarts, tau=args.tau, named=flag)
    check_choice("suite", args.suite, ("none", "standard"))
    check_choice("split", args.split, ("test", "val"))
    if args.split == "val" and args.suite != "none":
        raise RobustlabError("--split val evaluates clean and one attack; run --suite standard on the test split")
    if args.split == "val" and (report := given([("--out", args.out), ("--sweep-n", args.sweep_n)])):
        raise RobustlabError(f"--split val prints its figures and writes neither a report nor a plot; drop "
                             f"{' and '.join(report)}")
    if args.transfer_from and (args.suite != "none" or args.out or args.sweep_n is not None or args.attack == "pgd-smooth"
                               or args.save_adversarial is not None):
        raise RobustlabError("--transfer-from prints its figures and writes no report: it takes --attack fgsm, fgm or pgd, "
                             "without --suite, --out, --sweep-n or --save-adversarial")
    suite = given([("--aa-n", args.aa_n), ("--aa-steps", args.aa_steps), ("--aa-queries", args.aa_queries),
                   ("--sanity-n", args.sanity_n), ("--no-ood", not args.ood), ("--cifar-c-dir", args.cifar_c_dir)])
    if suite and args.suite != "standard":
        raise RobustlabError(f"{they_apply(suite)} to --suite standard")
    if not args.ood and args.cifar_c_dir is not None:
        raise RobustlabError("--cifar-c-dir names the corruption files of the OOD suite, which --no-ood skips")
    if args.suite == "standard" and args.eps == 0:  # else AutoAttack fails on it, after the clean and PGD passes
        raise RobustlabError("--suite standard needs --eps > 0: AutoAttack and the sanity checks attack at ε")


def _check_counts(args, split, unit: str):
    """--n beyond the split, and the suite's and the sweep's counts beyond the images evaluated, were cut down to
    them without a word (--n 100000 evaluated the 10,000 test images)."""
    which = {"test": "test", "val": "validation"}[args.split]
    check_at_most("--n", args.n, len(split), f"{which} {unit}")
    n = args.n or len(split)
    evaluated = f"{which} {unit} evaluated" + (f" (--n {args.n})" if args.n else "")
    check_at_most("--aa-n", args.aa_n, n, evaluated)
    for name, value in (("--sanity-n", args.sanity_n), ("--sweep-n", args.sweep_n)):
        check_at_most(name, value, n, evaluated, all_by_default=False)


def _run_dir(args) -> Path:
    """The run's directory: RUN itself, or the folder of the checkpoint file RUN names."""
    return Path(args.run) if Path(args.run).is_dir() else Path(args.run).parent


def _source(args) -> Path:
    """The checkpoint file evaluated (RUN, with --checkpoint), resolved once for the model, the report's folder and
    its record."""
    if getattr(args, "source_file", None) is None:
        from robustlab.training.run import resolve_checkpoint
        args.source_file = resolve_checkpoint(args.run, args.checkpoint).resolve()
    return args.source_file


def _evaluated(args) -> tuple[Path, str]:
    """The default report folder and the report's title: the run's directory and name for its best checkpoint,
    RUN/eval-NAME and RUN/NAME.safetensors for any other (last, epoch-005, or one of several files in a folder),
    so that evaluating one checkpoint never overwrites another's report."""
    source, run_dir = _source(args), _run_dir(args)
    if source.stem == "best":
        return run_dir, run_dir.name
    return run_dir / f"eval-{source.stem}", f"{run_dir.name}/{source.name}"


def _report_dir(args) -> Path:
    """Where the report goes: --out, else `_evaluated`'s folder (made now, so a bad path fails before the attacks).
    An --out that holds another run, or another checkpoint's report, is refused: it was overwritten without a word,
    and the report named the folder's run, not the one evaluated."""
    out = Path(args.out) if args.out else _evaluated(args)[0]
    if args.out and args.split == "test":
        another_run = any((out / f).exists() for f in ("config.json", "last.safetensors"))
        if another_run and out.resolve() != _run_dir(args).resolve():
            raise RobustlabError(f"--out {out} is another run's folder; give the report a folder of its own")
        source = str(_source(args))
        try:
            earlier = json.loads((out / "report.json").read_text())["run"].get("checkpoint", source)
        except (OSError, ValueError, KeyError, AttributeError):  # none, or one that records no checkpoint
            earlier = source
        if earlier != source:
            raise RobustlabError(f"--out {out} holds the report of {earlier}; choose another --out, or delete its "
                                 "report.json to replace it")
    return output_dir(out) if args.split == "test" else out


def _results(meta, clean, robust, n, label, start, rows=None, extra=None, *, attack) -> dict:
    method = meta.get("method", {}).get("name")
    if rift := meta.get("rift"):  # a RiFT result holds its source's method and epoch, and reads as that run without it
        method = f"{method} + RiFT ({rift['module']}, α {rift['alpha']:g})"
    run = {"model": meta["model"]["name"], "dataset": meta["dataset"]["name"], "method": method,
           "epoch": meta.get("epoch"), "epochs": meta.get("epochs_total") or meta.get("config", {}).get("epochs")}
    return results_dict(run, clean, robust, n, label, start, rows, extra, attack=attack, command=_command())


def _command() -> str | None:
    """The command line that repeats the evaluation: `robustlab eval ...`, or the demo that ran it."""
    if sys.argv[1:2] not in (["eval"], ["demo"]):
        return None
    return " ".join(["robustlab", *(shlex.quote(a) for a in sys.argv[1:])])


def _finish_eval(args, meta, results, plots, measure, test, out, unit: str) -> int:
    """The end of every evaluation: validation figures are printed only; test figures get the ε sweep, the training
    curves and report.md / report.json. `meta`: the evaluated checkpoint's metadata; `measure(subset, eps,
    progress)`: the run's accuracy under its attack."""
    from robustlab import distributed
    from robustlab.checkpoint import read_metrics
    from robustlab.evaluate.report import plot_training_curves

    clean, label, n, eps = results["clean"], results["label"], results["n"], results["attack"]["eps"]
    results["unit"] = unit
    if args.split == "val":  # the run's report and plot describe the test set; validation figures are only printed
        if distributed.is_main():
            print(json.dumps({"split": "val", **{k: results[k] for k in ("clean", "robust", "n", "attack", "wall_s")}})
                  if args.json else f"validation: clean {clean:.2%}, {label} {results['robust']:.2%} ({n} validation {unit})")
        return 0
    sweep_n = SWEEP_N if args.sweep_n is None else args.sweep_n
    if sweep_n > 0 and eps > 0:
        max_eps = None if unit == "texts" else largest_radius(results["attack"]["norm"],  # embeddings: no bound
                                                              meta.get("dataset", {}).get("input_shape"))
        results["sweep"] = eps_sweep(measure, test, eps, sweep_n, max_eps=max_eps)
    if not distributed.is_main():
        return 0
    run = results["run"]
    run_dir = _run_dir(args)
    run["checkpoint"] = str(_source(args))  # which model, wherever the report goes
    if metrics := read_metrics(run_dir):
        run["train_s"] = metrics[-1].get("elapsed_s")  # so that `robustlab summary` finds it wherever the report goes
        if stop := metrics[-1].get("stopped_early"):  # e.g. Fast-AT's overfitting check: the reader should know
            run["stopped_early"] = f"after epoch {metrics[-1]['epoch'] + 1}: {stop}"
        val_n, val_size = meta.get("config", {}).get("val_n"), meta.get("dataset", {}).get("val_size")
        robust_on = f"robust: PGD-10 on the first {val_n}" if val_n and val_size and val_n < val_size else "robust: PGD-10"
        name = run["method"] or run_dir.name
        plot_training_curves({name: metrics}, out / "training_curves.png",
                             f"{run['model']} on {run['dataset']}: validation during training\n(clean on "
                             f"{val_size or 'all'} images, {robust_on})",
                             best={name: (meta.get("best") or {}).get("epoch")})
        plots["Training curves"] = "training_curves.png"
    finish_report(out, results, plots, _evaluated(args)[1], f"{run['model']} on {run['dataset']}",
                  "embedding scale" if unit == "texts" else "pixel scale")
    if args.json:  # with --suite standard, every row (AutoAttack's stages, OOD) and the sanity verdict too
        summary = {k: results[k] for k in ("clean", "robust", "n", "attack", "label", "rows", "wall_s")}
        print(json.dumps({**summary, **({"sanity": results["sanity"].get("verdict")} if "sanity" in results else {})}))
    else:
        print(f"clean accuracy   {clean:.2%} ({n} test {unit})")
        for row in results["rows"][1:]:
            fewer = f" (first {row['n']} test {unit})" if row.get("n", n) != n else ""  # e.g. AutoAttack on --aa-n
            print(f"{row['accuracy']:7.2%}  {row['name']}{fewer}")
        if "sanity" in results:
            print(f"sanity checks: {results['sanity'].get('verdict')}")
        print(f"report: {out / 'report.md'}")
    return 0
