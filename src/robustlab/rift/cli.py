"""`robustlab rift RUN --out OUT` and `robustlab mrc RUN`; wired into robustlab/cli.py by `add_parsers`."""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from robustlab.errors import RobustlabError, check_at_most, output_dir, they_apply

LR_GRID = "0.001,0.01"


def _learning_rates(text) -> tuple[float, ...]:
    """--lrs: "0.001,0.01" (argparse applies it to the default too)."""
    from robustlab.cli import positive
    try:
        return tuple(positive(float)(v) for v in text.split(","))
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"takes comma-separated learning rates > 0, got {text!r}") from None


def add_parsers(sub):
    from robustlab.cli import momentum, nonnegative, positive, seed
    from robustlab.rift.mrc import MRCConfig

    def points(text):  # accuracy points: a tolerance above 100 tolerates anything
        value = nonnegative(float)(text)
        if value > 100:
            raise argparse.ArgumentTypeError(f"is in accuracy points, 0 to 100, got {text}")
        return value

    def mrc_options(p):
        g = p.add_argument_group("module robust criticality (defaults: the RiFT reference code)")
        d = MRCConfig()  # one set of defaults for the CLI and the Python API
        g.add_argument("--mrc-n", type=positive(int),  # None: d.n, or all of a smaller validation split
                       help=f"validation images in the fixed adversarial set (default {d.n}; the split has 5000)")
        g.add_argument("--mrc-eps", type=positive(float), default=d.eps,
                       help=f"weight perturbation ‖Δ‖ ≤ ε‖θ‖ ({d.eps:g})")
        g.add_argument("--mrc-epochs", type=positive(int), default=d.epochs,
                       help=f"gradient-ascent epochs ({d.epochs})")
        g.add_argument("--mrc-batch-size", type=positive(int), default=d.batch_size,
                       help=f"images per gradient-ascent step ({d.batch_size})")
        p.add_argument("--checkpoint", help="best (default) or last, when RUN is a run directory (a kept epoch: "
                       "give RUN/epoch-NNN.safetensors as RUN)")
        p.add_argument("--seed", type=seed, default=0, help="seeds every random choice: the attacks' random starts, "
                       "the fine-tuning's data order (default 0)")
        p.add_argument("--data-dir", help="default: the run's own")
        p.add_argument("--threads", type=positive(int), help="torch CPU threads")
        p.add_argument("--device", default="cpu", help="cpu or cuda")

    m = sub.add_parser("mrc", help="module robust criticality of every Conv/Linear module of a run (RiFT step 1)")
    m.add_argument("run", help="run directory or checkpoint file")
    m.add_argument("--out", help="where the cache, mrc.json and mrc.png go (default RUN/mrc)")
    m.add_argument("--json", action="store_true", help="print the results as JSON")
    mrc_options(m)

    r = sub.add_parser("rift", help="RiFT (Zhu et al., ICCV 2023): fine-tune a robust run's least robust-critical "
                       "module, interpolate, report before/after")
    r.add_argument("run", help="run directory or checkpoint file")
    r.add_argument("--out", required=True, help="output directory: checkpoint, plots, rift_report.md")
    r.add_argument("--mrc-dir", help="where the MRC cache goes (default beside the checkpoint, RUN/mrc, which "
                                     "robustlab mrc RUN shares)")
    r.add_argument("--module", help="fine-tune this module, or several together, comma-separated "
                                    "(default: the lowest MRC)")
    r.add_argument("--auto", type=nonnegative(int), default=0, metavar="K",
                   help="also try the K least-critical modules × --lrs and keep the best on validation")
    r.add_argument("--lr", type=positive(float), default=0.001, help="fine-tuning learning rate (reference: 0.001)")
    r.add_argument("--lrs", type=_learning_rates,
                   help=f"learning rates for --auto, comma-separated ({LR_GRID})")
    r.add_argument("--epochs", type=positive(int), default=10, help="fine-tuning epochs; the learning rate drops "
                   "10× after half of them (reference: 10)")
    r.add_argument("--batch-size", type=positive(int), default=128, help="fine-tuning batch size (128)")
    r.add_argument("--momentum", type=momentum, default=0.9, help="SGD momentum (reference: 0.9)")
    r.add_argument("--weight-decay", type=nonnegative(float), default=5e-4, help="weight decay (reference: 5e-4)")
    r.add_argument("--augment", help="none, crop, crop-flip (default: the source run's, else the dataset's)")
    r.add_argument("--bn", default="update",
                   help="update (re-estimate BatchNorm statistics on clean data while fine-tuning, the reference), "
                        "keep (freeze them), or recalibrate (freeze them while fine-tuning, then re-estimate them "
                        "for each α on PGD examples of --recal-n training images)")
    r.add_argument("--recal-n", type=positive(int), help="training images for --bn recalibrate (default 10000)")
    r.add_argument("--train-n", type=positive(int), help="fine-tune on the first N training images only")
    r.add_argument("--val-n", type=positive(int),
                   help="validation images for choosing the fine-tuned epoch and α (default: all)")
    r.add_argument("--alpha-attack", default="pgd",
                   help="robust check along α: pgd (the training PGD on cross-entropy), pgd+dlr (per image, the "
                        "first success of it and the same PGD on the DLR loss; twice the cost) or pgd+dlr+apgd-t "
                        "(then also APGD-T, 3 targets × 20 steps; about five times the cost)")
    r.add_argument("--tolerance", type=points, default=0.1,
                   help="points of validation robust accuracy α may cost, 0 to 100 (0.1)")
    t = r.add_argument_group("test-set report")
    t.add_argument("--n", "--subset", dest="n", type=positive(int),
                   help="evaluate on the first N test images (default: all); --subset under torchrun, whose parser takes --n")
    t.add_argument("--aa-n", type=positive(int), help="AutoAttack on the first N of them (default: the same)")
    t.add_argument("--aa-steps", type=positive(int), help="AutoAttack iterations (protocol: 100)")
    t.add_argument("--aa-queries", type=positive(int), help="Square queries (protocol: 5000)")
    t.add_argument("--test-batch-size", type=positive(int),
                   help="images per batch for the test-set report (default 500; AutoAttack takes half); larger is "
                        "faster on GPUs")
    t.add_argument("--no-aa", dest="aa", action="store_false", help="skip AutoAttack")
    t.add_argument("--no-ood", dest="ood", action="store_false", help="skip the corruption suite")
    t.add_argument("--cifar-c-dir", metavar="DIR", help="the OOD accuracy on the published CIFAR-10-C or CIFAR-100-C "
                   "files in DIR, as they are, instead of generated corruptions")
    t.add_argument("--no-test", dest="test", action="store_false", help="stop before reading the test set")
    mrc_options(r)


def _source(args) -> Path:
    from robustlab.training.run import resolve_checkpoint
    return resolve_checkpoint(args.run, args.checkpoint)


def _mrc_dir(source: Path, out=None) -> Path:
    """The MRC belongs to the robust model: by default it is cached beside its checkpoint, so `robustlab mrc RUN`
    and any `robustlab rift RUN` share it."""
    if out:
        return Path(out)
    return source.parent / ("mrc" if source.stem == "best" else f"mrc-{source.stem}")


def _mrc_config(args):
    from robustlab.rift.mrc import MRCConfig
    return MRCConfig(n=args.mrc_n or MRCConfig.n, eps=args.mrc_eps, epochs=args.mrc_epochs,
                     batch_size=args.mrc_batch_size, seed=args.seed)


def _setup(args, check=lambda source: None):
    """The checkpoint file, its metadata, then (after `check(source)`, so bad input fails fast) the dataset,
    and the device."""
    import torch
    from robustlab.checkpoint import read_metadata
    from robustlab.distributed import launched_by_torchrun, resolve_device
    from robustlab.training.run import check_model_meta, run_dataset

    if launched_by_torchrun():  # every rank ran the whole of it and wrote the same files
        raise RobustlabError(f"robustlab {args.command} runs in one process; run it without torchrun (--device cuda "
                             "for a GPU)")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    source = _source(args)
    meta = check_model_meta(read_metadata(source), source)
    check(source)
    return source, meta, run_dataset(meta, args.data_dir), device


def cmd_mrc(args) -> int:
    from robustlab import load_model
    from robustlab.models import fast_memory_format
    from robustlab.protocol import threat_defaults
    from robustlab.rift.mrc import compute_mrc, file_sha256, plot_mrc, ranked

    source, meta, data, device = _setup(args)
    check_at_most("--mrc-n", args.mrc_n, len(data.val), "validation images", all_by_default=False)
    model = load_model(source)
    model = model.to(device, memory_format=fast_memory_format(model, device))
    norm = meta.get("method", {}).get("norm", "linf")
    budget = threat_defaults(meta["dataset"]["name"], norm).train
    out = output_dir(_mrc_dir(source, args.out))
    result = compute_mrc(model, data.val, out, source_sha256=file_sha256(source), config=_mrc_config(args),
                         threat={"norm": norm, "eps": budget.eps, "steps": budget.steps, "step_size": budget.step_size})
    order = ranked(result)
    plot_mrc(result, out / "mrc.png", f"MRC per module, {meta['model']['name']} on {meta['dataset']['name']}",
             highlight={order[0]})
    if args.json:
        print(json.dumps({"ranking": order, "modules": result["modules"], "original": result["original"]}))
    else:
        print(f"{'module':32} {'MRC':>9} {'robust acc at worst Δ':>22}")
        for name in order:
            r = result["modules"][name]
            print(f"{name:32} {r['mrc']:9.4f} {r['worst_accuracy']:22.2%}")
        original = result["original"]
        print(f"original adversarial loss {original['loss']:.4f}, accuracy {original['accuracy']:.2%} "
              f"on {result['key']['n']} validation images; results and plot in {out}")
    return 0


def _check_options_in_use(args):
    """Options that the rest of the command line leaves unused are refused rather than ignored without a word."""
    from robustlab.cli import given
    aa = given([("--aa-n", args.aa_n), ("--aa-steps", args.aa_steps), ("--aa-queries", args.aa_queries)])
    test = given([("--n", args.n), ("--test-batch-size", args.test_batch_size), ("--no-aa", not args.aa),
                  ("--no-ood", not args.ood), ("--cifar-c-dir", args.cifar_c_dir)]) + aa
    if not args.test and test:
        raise RobustlabError(f"{they_apply(test)} to the test-set report, which --no-test skips")
    if not args.aa and aa:
        raise RobustlabError(f"{they_apply(aa)} to AutoAttack, which --no-aa skips")
    if not args.ood and args.cifar_c_dir is not None:
        raise RobustlabError("--cifar-c-dir names the corruption files of the OOD suite, which --no-ood skips")
    if args.recal_n is not None and args.bn != "recalibrate":
        raise RobustlabError(f"--recal-n is for --bn recalibrate, not --bn {args.bn}")
    if args.lrs is not None and not args.auto:
        raise RobustlabError("--lrs is the grid of --auto K; without it RiFT fine-tunes with --lr")


def _check_counts(args, data):
    """Counts beyond the data were cut down to it without a word (--val-n 100000 chose α on the 5,000 validation
    images, --n 100000 reported on the 10,000 test images)."""
    train, val = len(data.train), len(data.val)
    check_at_most("--train-n", args.train_n, train, f"training images (the {val} validation images are not among them)")
    check_at_most("--recal-n", args.recal_n, train, "training images", all_by_default=False)
    check_at_most("--val-n", args.val_n, val, "validation images")
    check_at_most("--mrc-n", args.mrc_n, val, "validation images", all_by_default=False)
    if args.test:
        test = len(data.test)
        check_at_most("--n", args.n, test, "test images")
        check_at_most("--aa-n", args.aa_n, args.n or test,
                      "test images of the report" + (f" (--n {args.n})" if args.n else ""))


def cmd_rift(args) -> int:
    from robustlab import load_model
    from robustlab.data import AUGMENTATIONS, check_cifar_c
    from robustlab.errors import check_choice
    from robustlab.models import batch_norms, classifier_modules
    from robustlab.rift.finetune import module_names
    from robustlab.rift.pipeline import RiftSettings, TestSettings, rift
    from robustlab.rift.report import metric_label

    _check_options_in_use(args)
    settings = RiftSettings(module=args.module, auto=args.auto, lr=args.lr, lrs=args.lrs or RiftSettings.lrs,
                            epochs=args.epochs, batch_size=args.batch_size, momentum=args.momentum,
                            weight_decay=args.weight_decay, augment=args.augment, bn=args.bn,
                            recal_n=args.recal_n or RiftSettings.recal_n, alpha_attack=args.alpha_attack,
                            seed=args.seed, train_n=args.train_n, val_n=args.val_n, tolerance=args.tolerance / 100,
                            mrc=_mrc_config(args))
    settings.validate()
    if args.augment:
        check_choice("augmentation", args.augment, AUGMENTATIONS)
    def check_model(source):  # before the data is read: names the modules, and --bn needs BatchNorm layers
        model = load_model(source)
        if args.module is not None:  # '' too: it once fell back to the lowest-MRC module without a word
            module_names(model, args.module)
        if args.auto > (n := len(modules := classifier_modules(model))):  # it tried them all without a word
            raise RobustlabError(f"--auto {args.auto} is more than the {n} modules of {source} that RiFT can fine-tune "
                                 f"({', '.join(name for name, _ in modules)}); give at most {n}")
        if args.bn != "update" and not batch_norms(model):
            raise RobustlabError(f"--bn {args.bn}: {source} has no BatchNorm layers to keep or recalibrate; drop --bn")
        if args.cifar_c_dir is not None:  # the files fit the model's images? (their labels: after the fine-tuning)
            check_cifar_c(args.cifar_c_dir, model.checkpoint_meta["dataset"]["input_shape"])
    source, _, data, device = _setup(args, check_model)
    _check_counts(args, data)
    mrc_dir = output_dir(_mrc_dir(source, args.mrc_dir), "--mrc-dir")  # beside the run by default: writable?
    output_dir(args.out)
    test_options = {"n": args.n, "aa_n": args.aa_n, "aa_steps": args.aa_steps, "aa_queries": args.aa_queries,
                    "batch_size": args.test_batch_size, "cifar_c_dir": args.cifar_c_dir}
    test = (TestSettings(aa=args.aa, ood=args.ood, **{k: v for k, v in test_options.items() if v is not None})
            if args.test else None)
    command = "robustlab " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["rift"] else None
    report = rift(source, data, args.out, settings, test, mrc_dir=mrc_dir, command=command,
                  device=device)
    chosen = report["candidates"][report["chosen"]]
    print(f"fine-tuned {chosen['module']} (lr {chosen['lr']:g}), α = {chosen['alpha']:.1f}: validation clean "
          f"{chosen['val_clean']:.2%}, robust {chosen['val_robust']:.2%} "
          f"(original {report['rift']['val']['robust_original']:.2%})")
    for name, row in report["test"].items():
        print(f"test {name}: " + ", ".join(f"{metric_label(k, row, report['test_settings'])} {v:.2%}"
                                           for k, v in row.items() if isinstance(v, float) and k != "seconds"))
    print(f"report: {Path(args.out) / 'rift_report.md'}")
    return 0


COMMANDS = {"mrc": cmd_mrc, "rift": cmd_rift}
