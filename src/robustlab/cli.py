"""The `robustlab` command: train, demo and bench here; eval in robustlab/evaluate/cli.py, rift and mrc in
robustlab/rift/cli.py. Bad input exits with status 2 and a one-line error."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from robustlab.allocator import keep_freed_memory
from robustlab.errors import RobustlabError, check_at_most, check_choice, one_line, output_dir
from robustlab.protocol import check_eps


OTHER_RANKS_ERROR_PAUSE_S = 5  # torchrun looks at its processes every 0.1 s


def say_error(message: str, name: str = "robustlab") -> None:
    """One line on stderr, said once under torchrun. Most errors are every rank's: rank 0 says it, and torchrun
    stops the other ranks as soon as rank 0 exits. One that a rank alone meets is said, with its rank, after a
    pause; without the pause, a rank other than 0 that failed first got rank 0 stopped before it had said anything."""
    rank = os.environ.get("RANK", "0")
    if rank != "0":
        time.sleep(OTHER_RANKS_ERROR_PAUSE_S)
        print(f"{name} (rank {rank}): error: {message}", file=sys.stderr)
    else:
        print(f"{name}: error: {message}", file=sys.stderr)


class OneLineParser(argparse.ArgumentParser):
    """argparse's own errors (an unknown option, a bad value) in one line with status 2, like every other error,
    named by the program: "robustlab" for every subcommand, else argparse's name for it (an experiment script)."""
    def error(self, message):
        say_error(message, "robustlab" if self.prog.split()[0] == "robustlab" else self.prog)
        self.exit(2)

    def _get_value(self, action, arg_string):
        # An empty value silently meant the default (`--method ''` trained PGD-AT) or the current folder (`--out ''`).
        if arg_string == "" and action.nargs not in (argparse.PARSER, argparse.REMAINDER):  # (the subcommand's own)
            self.error(f"{'/'.join(action.option_strings) or action.metavar or action.dest.upper()} is empty; give a value")
        return super()._get_value(action, arg_string)


def _number(kind, accepts, what: str):
    """An argparse type: a number of `kind` for which `accepts(value)` holds, else "must be {what}, got TEXT"."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:  # argparse would name this function: "invalid parse value: 'x'"
            value = math.nan
        if not (math.isfinite(value) and accepts(value)):  # nan and inf parse as floats
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value
    return parse


def positive(kind):
    return _number(kind, lambda v: v > 0, f"{'a whole' if kind is int else 'a finite'} number > 0")


def nonnegative(kind):
    return _number(kind, lambda v: v >= 0, f"{'a whole' if kind is int else 'a finite'} number >= 0")


def given(options) -> list[str]:
    """The names among (name, value) pairs whose value says the option was given (not None, not False)."""
    return [name for name, value in options if value is not None and value is not False]  # 0 is a value


# SGD's momentum: 0 to just below 1 (at 1 or more the step grows without bound, which the run then reports as a
# divergence to be cured by a smaller --lr).
momentum = _number(float, lambda v: 0 <= v < 1, "a number from 0 to below 1")
# An EMA decay: above 0 and below 1 (TrainConfig's own check named no flag).
decay = _number(float, lambda v: 0 < v < 1, "a number above 0 and below 1 (e.g. 0.999)")


def seed(text):
    """A seed torch.manual_seed takes: 0 to 2⁶³ − 1 (beyond, it overflowed in a traceback)."""
    try:
        value = int(text)
    except ValueError:  # argparse would say "invalid seed value"
        value = -1
    if not 0 <= value < 2 ** 63:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to 2**63 - 1, got {text}")
    return value


def _image_size(text):
    """"64" or "64,48" (height, width)."""
    try:
        size = tuple(int(v) for v in text.split(","))
    except ValueError:
        size = ()
    if len(size) == 1:
        size *= 2
    if len(size) != 2 or min(size) <= 0:
        raise argparse.ArgumentTypeError(f"expected a size like 64 or 64,48 (height,width), got {text}")
    return size


def build_parser() -> argparse.ArgumentParser:
    from robustlab.models import MODELS
    from robustlab.training.registry import METHODS
    from robustlab.training.schedules import SCHEDULES

    p = OneLineParser(prog="robustlab", description="Adversarial robustness for PyTorch.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    t = sub.add_parser("train", help="train a model (adversarially)")
    t.add_argument("--task", default="image", choices=("image", "text"),
                   help="image (default), or text: adversarial training in embedding space (docs/text.md)")
    t.add_argument("--dataset", help="fashion-mnist (default), mnist, cifar10, cifar100, folder (DATA_DIR/train/<class>/"
                   "<image>, DATA_DIR/test or val/...), npy (DATA_DIR/{train,test}_{images,labels}.npy); "
                   "text: debian-packages (default), sst2, ag-news, imdb")
    t.add_argument("--data-dir", help="where the dataset files are (default: the usual places)")
    t.add_argument("--image-size", type=_image_size, help="folder: resize images to H or H,W (default: the files' "
                   "own size, which must agree)")
    t.add_argument("--grayscale", action="store_true", help="folder: read images as one channel (default RGB)")
    t.add_argument("--workers", type=nonnegative(int), default=2, help="DataLoader processes decoding folder / npy training data")
    t.add_argument("--download", action="store_true", help="download missing dataset files (sha256-checked)")
    t.add_argument("--model", help=", ".join(MODELS) + " (default cnn-small); text: transformer (default), textcnn")
    t.add_argument("--width", type=positive(int), help="channel width of preact-resnet18 and resnet18 (default 64) and "
                   "preact-resnet18-small (default 16)")
    t.add_argument("--method", help=", ".join(METHODS) + " (default pgd-at); text: freelb (default), fgm, pgd, "
                   "free-at, standard")
    t.add_argument("--norm", help="linf (default) or l2; text: l2 (default) or linf")
    t.add_argument("--eps", type=nonnegative(float), help="attack radius in pixel scale (default: the protocol's)")
    t.add_argument("--steps", type=positive(int), help="attack steps during training (default: the protocol's)")
    t.add_argument("--step-size", type=positive(float), help="attack step size in pixel scale (default: the "
                   "protocol's, scaled with --eps; 2.5·ε/steps with another --steps)")
    m = t.add_argument_group("method options (defaults: each method's paper; see docs/methods.md)")
    m.add_argument("--beta", type=nonnegative(float), help="TRADES / MART / TRADES-AWP regularization weight "
                   "(Generalist: with --adv-loss trades)")
    m.add_argument("--separate-batches", dest="joint_batch", action="store_false", default=None,
                   help="TRADES / MART / TRADES-AWP: pass the clean and the adversarial batch through the model "
                        "separately, as the reference code does, so that BatchNorm normalizes each with its own statistics "
                        "(default: one pass over both; docs/methods.md)")
    m.add_argument("--attack-train-mode", dest="attack_in_eval", action="store_false", default=None,
                   help="PGD-AT / PGD-AT-AWP: generate the training examples in train mode, as Madry's and the AWP "
                        "code do (default: eval mode, as the TRADES and MART code)")
    m.add_argument("--replays", type=positive(int), help="FreeAT: replays m per minibatch")
    m.add_argument("--init-mag", type=nonnegative(float), help="text FreeLB / FreeAT: size of the random start")
    m.add_argument("--outer", type=positive(int), help="YOPO: outer steps m (full backward passes)")
    m.add_argument("--inner", type=positive(int), help="YOPO: inner steps n per outer step")
    m.add_argument("--first-layer", help="YOPO: qualified name of the first layer (default net.conv1)")
    m.add_argument("--first-layer-grad", help="YOPO: the first layer's gradient, full (default), hamiltonian "
                   "(the paper's) or both")
    m.add_argument("--awp-gamma", type=nonnegative(float), help="AWP: relative weight-perturbation size γ")
    m.add_argument("--awp-warmup", type=nonnegative(float), help="AWP: fraction of epochs before AWP starts")
    m.add_argument("--co-drop", type=nonnegative(float),
                   help="Fast-AT: stop when validation robust accuracy drops this much below the best")
    m.add_argument("--co-ratio", type=nonnegative(float),
                   help="Fast-AT: stop when validation robust accuracy falls below this fraction of the training "
                   "accuracy on FGSM examples")
    m.add_argument("--clip-start", action="store_true", default=None,
                   help="Fast-AT: take the FGSM step from the random start clipped to [0, 1] (default: unclipped, "
                   "as the paper's δ)")
    m.add_argument("--adv-loss", help="Generalist: the adversarial learner's loss, pgd-at or trades (--beta)")
    m.add_argument("--mix-final", type=nonnegative(float), help="Generalist: final mixing ratio β of the adversarial learner")
    m.add_argument("--mix-start", type=nonnegative(float), help="Generalist: fraction of the run after which β leaves 1")
    m.add_argument("--global-decay", type=nonnegative(float), help="Generalist: the global learner's EMA decay γ")
    m.add_argument("--redistribute-from", type=nonnegative(float),
                   help="Generalist: fraction of the run at which redistribution starts (t′)")
    m.add_argument("--redistribute-every", type=int, help="Generalist: epochs between redistributions c (0: never)")
    m.add_argument("--redistribute-per-step", action="store_true", default=None,
                   help="Generalist: redistribute at every step of those epochs (the reference code), not once")
    m.add_argument("--nat-lr", type=positive(float), help="Generalist: natural learner's learning rate (default --lr)")
    m.add_argument("--nat-weight-decay", type=nonnegative(float), help="Generalist: natural learner's weight decay")
    m.add_argument("--nat-schedule", help="Generalist: natural learner's schedule (default --schedule)")
    m.add_argument("--global-bn", help="Generalist: the global learner's BatchNorm statistics, mixed like the "
                                       "weights (mix, the paper), averaged from the adversarial learner only (adversarial), or "
                                       "estimated by the global learner's own forward pass on each adversarial batch (own)")
    t.add_argument("--epochs", type=positive(int), default=10, help="default 10")
    t.add_argument("--batch-size", type=positive(int), default=128, help="default 128")
    t.add_argument("--optimizer", default="sgd", help="sgd (default) or adam")
    t.add_argument("--lr", type=positive(float), default=0.05, help="learning rate, the peak of one-cycle (default 0.05)")
    t.add_argument("--momentum", type=momentum, default=0.9, help="SGD momentum (default 0.9)")
    t.add_argument("--weight-decay", type=nonnegative(float), default=5e-4, help="default 5e-4")
    t.add_argument("--schedule", default="one-cycle", help=", ".join(SCHEDULES) + " (default one-cycle)")
    t.add_argument("--augment", help="none, crop, crop-flip (default: the dataset's)")
    t.add_argument("--seed", type=seed, default=0, help="seeds the weights, the data order, augmentation and the "
                   "attacks' random starts (default 0)")
    t.add_argument("--precision", default="auto",
                   help="auto (bf16 where the CPU or GPU has bf16 units, else fp32), fp32, bf16 (autocast; several "
                        "times slower on CPUs without bf16 units) or fp16 (CUDA, with loss scaling). Training only: "
                        "validation and evaluation attacks always run in fp32")
    t.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                   help="keep the default memory format (channels_last is faster on CPUs)")
    t.add_argument("--val-n", type=positive(int),  # None: 1000, or all of a smaller validation split
                   help="validation images for the per-epoch PGD check (default 1000; clean accuracy uses them all)")
    t.add_argument("--train-n", type=positive(int), help="train on the first N training images only")
    t.add_argument("--threads", type=positive(int), help="torch CPU threads")
    t.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun: the GPU of each LOCAL_RANK)")
    t.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across torchrun ranks (CUDA only)")
    t.add_argument("--ema", type=decay, help="weight-EMA decay, e.g. 0.999 (validated and exported weights)")
    t.add_argument("--keep-every", type=positive(int), help="also keep every N-th epoch's weights as "
                   "RUN/epoch-NNN.safetensors (`robustlab eval RUN/epoch-NNN.safetensors` reports in RUN/eval-epoch-NNN)")
    t.add_argument("--backend", default="torch", help="torch, or tinygrad (models mlp, cnn-small; methods pgd-at, standard)")
    t.add_argument("--out", required=True, help="run directory (checkpoints, metrics, reports)")
    t.add_argument("--resume", action="store_true", help="continue from RUN/last.safetensors")

    from robustlab.evaluate.cli import add_parser as add_eval_parser
    add_eval_parser(sub)  # robustlab eval
    from robustlab.evaluate.summary import add_parser as add_summary_parser
    add_summary_parser(sub)  # robustlab summary

    d = sub.add_parser("demo", help="PGD-AT on Fashion-MNIST, evaluation and report, in a few minutes")
    d.add_argument("--out", default="runs/demo", help="run directory (default runs/demo); run again to resume")
    d.add_argument("--epochs", type=positive(int), default=DEMO_EPOCHS, help=f"default {DEMO_EPOCHS}")
    d.add_argument("--data-dir", help="where the Fashion-MNIST files are (default: the usual places)")
    d.add_argument("--threads", type=positive(int), help="torch CPU threads")

    from robustlab.bench import add_options as add_bench_options
    add_bench_options(sub.add_parser("bench", help="throughput against a textbook PyTorch loop"))

    from robustlab.rift.cli import add_parsers as add_rift_parsers
    add_rift_parsers(sub)  # robustlab rift, robustlab mrc
    return p


# The method options whose flag is not their name.
FLAGS = {"joint_batch": "--separate-batches", "attack_in_eval": "--attack-train-mode"}


def flag(option: str) -> str:
    return FLAGS.get(option, "--" + option.replace("_", "-"))


def check_method_flags(method: str, args):
    """The method options given on the command line that `method` does not take, named by their flags (the library's
    own check names its keyword arguments, which a command-line user never typed)."""
    from robustlab.training.registry import METHODS
    from robustlab.training.run import method_options, unknown_options
    check_choice("method", method, METHODS)
    cls = METHODS[method]
    check_clean_method_flags(method, cls.adversarial, args)
    if unknown := [flag(k) for k in unknown_options(cls, [k for k in METHOD_OPTIONS if getattr(args, k) is not None])]:
        own = [flag(k) for k in METHOD_OPTIONS if k in method_options(cls)]
        raise RobustlabError(f"--method {method} takes no {', '.join(unknown)}; its options: {', '.join(own) or 'none'}")


def check_clean_method_flags(method: str, adversarial: bool, args):
    """The library lets a clean-training method take (and ignore) the threat options, so that one set of options
    serves every method; on the command line they would change nothing, so they are refused."""
    if not adversarial and (ignored := [flag(k) for k in ("eps", "steps", "step_size") if getattr(args, k) is not None]):
        raise RobustlabError(f"--method {method} trains without attacks, so {', '.join(ignored)} would change "
                             "nothing (its validation attack is the default one)")


METHOD_OPTIONS = ("eps", "steps", "step_size", "beta", "replays", "outer", "inner", "first_layer",
                  "first_layer_grad", "awp_gamma", "awp_warmup", "co_drop", "co_ratio", "clip_start", "adv_loss",
                  "mix_final", "mix_start", "global_decay", "redistribute_from", "redistribute_every",
                  "redistribute_per_step", "nat_lr", "nat_weight_decay", "nat_schedule", "global_bn", "joint_batch",
                  "attack_in_eval", "init_mag")


def train_config(args):
    from robustlab.training.trainer import TrainConfig, resolve_precision
    # bf16 training was measured to keep cnn-small's accuracy (docs/results.md); the tinygrad backend and
    # text models train in fp32 unless asked.
    auto_fp32 = args.backend == "tinygrad" or args.task == "text"
    precision = "fp32" if args.precision == "auto" and auto_fp32 else resolve_precision(args.precision, args.device)
    return TrainConfig(epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
                       momentum=args.momentum, weight_decay=args.weight_decay, schedule=args.schedule,
                       seed=args.seed, precision=precision, channels_last=args.channels_last,
                       augment=args.augment, val_n=args.val_n or TrainConfig.val_n, train_n=args.train_n,
                       threads=args.threads, ema=args.ema, device=args.device, sync_bn=args.sync_bn, workers=args.workers,
                       keep_every=args.keep_every)


def _say_resumed(trainer, out: Path):
    last = trainer.last_metrics
    if last.get("stopped_early"):  # a stop is final: a loosened threshold applies to runs still training
        print(f"{out} stopped early after epoch {last['epoch'] + 1} ({last['stopped_early']}); nothing to train",
              file=sys.stderr)
    elif trainer.start_epoch >= trainer.epochs:
        print(f"{out} has trained all its {trainer.epochs} epochs; nothing to train", file=sys.stderr)
    else:
        print(f"resuming {out} after epoch {trainer.start_epoch}", file=sys.stderr)


def fit(trainer, out: Path, resume: bool, check=lambda: None) -> int:
    """Resume if asked, train, print the summary (rank 0 only under torchrun). `check()`: the command line's checks
    against the data, after --resume's own (another run's settings say more than a count beyond its data)."""
    from robustlab import distributed
    resumed = resume and trainer.resume()
    check()
    if resumed:
        if distributed.is_main():
            _say_resumed(trainer, out)
    elif resume and distributed.is_main():  # stopped in its first epoch or while reading its data (cmd_train checked)
        print(f"{out} holds no finished epoch; starting it afresh", file=sys.stderr)
    if resume and distributed.is_main():  # also a run started afresh: killed while writing its first checkpoints
        from robustlab import checkpoint
        checkpoint.remove_stale_temporaries(out)
    output_dir(out)
    requested = trainer.config.epochs
    if getattr(trainer, "epochs", requested) != requested and distributed.is_main():  # FreeAT: say so, not only in docs
        replays = getattr(trainer.method, "replays", None)
        print(f"--method {trainer.method.name} trains {trainer.epochs} epoch{'s' if trainer.epochs > 1 else ''} for "
              f"--epochs {requested}" + (f": it replays each minibatch {replays} times, so the epochs are divided by "
                                          f"{replays}, rounded up (docs/methods.md)" if replays else ""), file=sys.stderr)
    if hasattr(trainer.method, "awp_first_epoch") and distributed.is_main():  # else a short run is silently plain
        method, first = trainer.method, trainer.method.awp_first_epoch(trainer.epochs)
        why = "--awp-gamma 0" if method.awp_gamma == 0 else f"--awp-warmup {method.awp_warmup:g} of the run"
        if first is None or first > 0:
            print(f"--method {method.name} perturbs the weights " +
                  (f"from epoch {first + 1} of {trainer.epochs}" if first is not None else
                   f"in none of its {trainer.epochs} epochs, so it trains as {method.name.removesuffix('-awp')}") +
                  f" ({why})", file=sys.stderr)
    metrics = trainer.fit()
    if distributed.is_main():
        summary = json.dumps({"run": str(out), "best": trainer.best, "last": metrics})
        print(json.dumps(json.loads(summary, parse_constant=lambda _: None)))  # NaN (no validation) is not JSON
    return 0


def cmd_train(args) -> int:
    out = Path(args.out)
    if not args.resume and (out / "last.safetensors").exists():
        raise RobustlabError(f"{out} already holds a run; add --resume to continue it or choose another --out")
    if not args.resume and (out / "best.safetensors").exists():  # e.g. a RiFT result, which has no last.safetensors
        raise RobustlabError(f"{out} already holds a model (best.safetensors); choose another --out")
    # A run writes config.json before it reads its data: without either file nothing was started here (a mistyped
    # --out); with config.json alone it was stopped before its first epoch ended, and --resume starts it afresh,
    # so that a requeued job can always add it.
    if args.resume and not (out / "last.safetensors").exists() and not (out / "config.json").exists():
        raise RobustlabError(f"--resume: {out} holds no run to continue (no last.safetensors, no config.json)")
    config = train_config(args)
    if args.task == "text":
        from robustlab.text.training import text_trainer_from_args
        trainer = text_trainer_from_args(args, config)
        return fit(trainer, out, args.resume, lambda: check_data_counts(args, trainer, "texts"))
    # Image defaults (text has its own, so the parser leaves these unset).
    args.dataset, args.model = args.dataset or "fashion-mnist", args.model or "cnn-small"
    args.method, args.norm = args.method or "pgd-at", args.norm or "linf"
    check_eps(args.eps, args.norm, "--eps")
    check_method_flags(args.method, args)
    data_options = {"image_size": args.image_size, "grayscale": args.grayscale}
    if check_choice("backend", args.backend, ("torch", "tinygrad")) == "tinygrad":
        from robustlab import distributed
        from robustlab.data import LARGE_DATASETS
        from robustlab.tinygrad import build_trainer
        if args.dataset in LARGE_DATASETS or any(data_options.values()):
            raise RobustlabError(f"the tinygrad backend trains in-memory datasets only, not {args.dataset} "
                                 "(nor --image-size, --grayscale); use --backend torch")
        if distributed.launched_by_torchrun():  # every rank would train the whole run and write the same files
            raise RobustlabError("the tinygrad backend trains in one process; run it without torchrun")
        if args.device != "cpu" or args.sync_bn:  # tinygrad takes its device from DEV, not from torch
            raise RobustlabError("the tinygrad backend runs where tinygrad's DEV variable says (e.g. DEV=CUDA); drop "
                                 "--device and --sync-bn")
        extra = {}
    else:
        from robustlab.training.run import build_trainer
        extra = {"data_options": data_options}
    from robustlab.models.registry import MODELS, model_options
    if args.width and args.model in MODELS and "width" not in model_options(args.model):
        with_width = [name for name in MODELS if "width" in model_options(name)]
        raise RobustlabError(f"--width applies to {', '.join(with_width[:-1])} and {with_width[-1]}, not {args.model}")
    try:
        trainer = build_trainer(dataset=args.dataset, model=args.model, method=args.method, norm=args.norm, out=out,
                                data_dir=args.data_dir, download=args.download, config=config,
                                model_kwargs={"width": args.width} if args.width else None,
                                method_kwargs={k: getattr(args, k) for k in METHOD_OPTIONS}, **extra)
    except RobustlabError as exc:
        raise RobustlabError(named_by_flag(str(exc))) from None

    def check():
        check_data_counts(args, trainer, "images")
        check_eps(args.eps, args.norm, "--eps", trainer.data.info.input_shape)
    return fit(trainer, out, args.resume, check)


def check_data_counts(args, trainer, unit: str):
    """--train-n and --val-n beyond the data were cut down to it without a word (--train-n 60000 of Fashion-MNIST
    trained on its 55,000 images: the other 5,000 are the validation split), and --keep-every beyond the run's
    epochs kept none."""
    train, val = len(trainer.data.train), len(trainer.data.val)
    check_at_most("--train-n", args.train_n, train, f"training {unit} (the {val} validation {unit} are not among them)")
    check_at_most("--val-n", args.val_n, val, f"validation {unit}", all_by_default=False)
    if args.keep_every and args.keep_every > (epochs := getattr(trainer, "epochs", args.epochs)):
        raise RobustlabError(f"--keep-every {args.keep_every} keeps no epoch of a run of {epochs} epoch"
                             f"{'s' if epochs > 1 else ''}; give at most {epochs}")


def named_by_flag(message: str) -> str:
    """A method's own check names its keyword ("co_ratio must be in (0, 1]", "unknown nat_schedule 'x'"); the
    command line's, its flag."""
    prefix = "unknown " if message.startswith("unknown ") else ""
    word, _, rest = message.removeprefix(prefix).partition(" ")
    return f"{prefix}{flag(word)} {rest}" if word in METHOD_OPTIONS else message


# Chosen so the demo finishes in under 10 minutes on a 2-core CPU (see docs/results.md).
DEMO_EPOCHS = 2
DEMO_TRAIN = ["--steps", "5", "--step-size", "0.05", "--augment", "none", "--ema", "0.999", "--val-n", "500"]
DEMO_EVAL = ["--n", "1000", "--sweep-n", "300"]


def cmd_demo(args) -> int:
    """Train cnn-small with PGD-AT, evaluate it with the protocol's PGD-50×3, write the report."""
    from robustlab import checkpoint
    out = Path(args.out)
    data = ["--data-dir", args.data_dir] if args.data_dir else []
    data += ["--threads", str(args.threads)] if args.threads else []
    resume = ["--resume"] if (out / "last.safetensors").exists() else []
    if resume:
        meta = checkpoint.read_metadata(out / "last.safetensors")
        config, method = meta.get("config", {}), meta.get("method", {})
        found = (method.get("name"), meta.get("model", {}).get("name"), meta.get("dataset", {}).get("name"))
        # else train's "--resume: other settings", unasked for
        if found != ("pgd-at", "cnn-small", "fashion-mnist"):
            raise RobustlabError(f"{out} holds a run the demo did not train ({', '.join(map(str, found))}); choose "
                                 "another --out")
        if ((method.get("steps"), method.get("step_size"), config.get("ema"), config.get("val_n"), config.get("train_n"))
                != (5, 0.05, 0.999, 500, None)):  # DEMO_TRAIN's
            raise RobustlabError(f"{out} holds a PGD-AT run of cnn-small on Fashion-MNIST that the demo did not train "
                                 "(other steps, EMA, validation or training images); choose another --out")
        if (was := config.get("epochs")) != args.epochs:
            raise RobustlabError(f"{out} holds a demo run of {was} epoch{'s' if was != 1 else ''}: `robustlab demo "
                                 f"--epochs {was}` continues it; for another length choose another --out")
    print(f"[1/2] PGD adversarial training of cnn-small on Fashion-MNIST ({args.epochs} epochs) -> {out}")
    code = main(["train", "--epochs", str(args.epochs), *DEMO_TRAIN, *data, *resume, "--out", str(out)])
    if code:
        return code
    print("[2/2] evaluation: clean and PGD-50×3 (ε = 0.1) on the first 1,000 test images")
    return main(["eval", str(out), *DEMO_EVAL, *data])


def cmd_bench(args) -> int:
    from robustlab.bench import run
    run(args)
    return 0


# What a killed command keeps, told to whoever pressed Ctrl-C.
INTERRUPTED = {"train": "the last completed epoch is saved; continue with --resume",
               "demo": "the last completed epoch is saved; the same command continues",
               "eval": "AutoAttack's finished batches are saved (--suite standard); the same command continues",
               "rift": "finished steps are cached in --out and the MRC in --mrc-dir (default RUN/mrc); the same "
                       "command continues",
               "mrc": "finished modules are cached; the same command continues",
               "summary": "nothing to keep",
               "bench": "nothing to keep"}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()
    try:
        from robustlab.evaluate.cli import cmd_eval
        from robustlab.evaluate.summary import cmd_summary
        from robustlab.rift.cli import COMMANDS as RIFT_COMMANDS
        commands = {"train": cmd_train, "eval": cmd_eval, "summary": cmd_summary, "demo": cmd_demo,
                    "bench": cmd_bench, **RIFT_COMMANDS}
        return commands[args.command](args)
    except RobustlabError as exc:
        say_error(one_line(exc))
        return 2
    except KeyboardInterrupt:
        kept = INTERRUPTED[args.command]
        if args.command in ("train", "demo") and not (Path(args.out) / "last.safetensors").exists():
            kept = "no epoch had finished, so nothing is saved; the same command starts afresh"
        print(f"robustlab: interrupted ({kept})", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `robustlab summary ... | head`: the reader left; end quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that Python's own flush at exit is quiet too
        return 141
    finally:
        from robustlab import distributed
        distributed.shutdown()


def run_as_module():
    """`python -m robustlab` (or `-m robustlab.cli`, which otherwise ran nothing and exited 0): main()'s exit code."""
    from robustlab.distributed import launched_by_torchrun
    code = main()
    if launched_by_torchrun():
        # DDP keeps gloo's process group and its threads alive past destroy_process_group, until the interpreter
        # finalizes, and a rank whose work was done has died there ("terminate called without an active
        # exception"), failing the whole job. Everything is written by now: leave without finalizing.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)


if __name__ == "__main__":
    run_as_module()
