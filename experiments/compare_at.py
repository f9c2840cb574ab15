"""Issue 5's comparison: every adversarial-training method on the same work.

    python experiments/compare_at.py --out runs/compare --epochs 5 --threads 1
    python experiments/compare_at.py --out runs/compare --methods pgd-at trades   # a worker for some methods
    python experiments/compare_at.py --out runs/compare --table                 # table and plot from what is done

Fashion-MNIST, cnn-small, L∞ ε = 0.1, the protocol's 55k/5k split, SGD one-cycle lr 0.05, batch 128,
seed 0, no augmentation, the same epochs for every method (FreeAT divides them by its replays, as its paper does). Every
method keeps its paper's defaults and the protocol's training attack (PGD-10, step 0.025) where it has
one. The checkpoint kept is the best epoch by validation PGD accuracy; the last epoch's validation
figures are shown beside it, so catastrophic overfitting in the final model would be visible.
Test figures: clean on all 10,000 images, the protocol's PGD-50×3 (step 0.01) on the first `--n`,
AutoAttack-standard on the first `--aa-n` (0 skips it: about 2.7 s per image on a 2-core CPU).

Each method is a run directory OUT/METHOD: a stopped run resumes from its last epoch, a finished one is
only evaluated (and its evaluation is cached in OUT/METHOD/compare.json), so several workers with
disjoint `--methods` can share OUT, and the script can be run again after any interruption.
Wall time is the Trainer's own clock (training alone, validation excluded).
"""
from __future__ import annotations

import json
import sys
import time
from functools import partial
from pathlib import Path

import torch

from robustlab import checkpoint, load_model
from robustlab.checkpoint import read_metrics
from robustlab.attacks import pgd
from robustlab.cli import OneLineParser, nonnegative, positive
from robustlab.data import load_dataset
from robustlab.errors import RobustlabError, output_dir, run_script
from robustlab.evaluate import accuracy
from robustlab.models import fast_memory_format
from robustlab.protocol import threat_defaults
from robustlab.provenance import commit, machine
from robustlab.training import TrainConfig, build_trainer
from robustlab.training.run import make_method
from robustlab.training.trainer import autocast_for, resolve_precision

DATASET = "fashion-mnist"
METHODS = ["pgd-at", "fast-at", "free-at", "yopo", "trades", "mart", "pgd-at-awp", "trades-awp"]
BASELINE = {"fast-at": "pgd-at", "free-at": "pgd-at", "yopo": "pgd-at", "trades": "pgd-at", "mart": "pgd-at",
            "pgd-at-awp": "pgd-at", "trades-awp": "trades"}


def train(method: str, run: Path, args) -> None:
    config = TrainConfig(epochs=args.epochs, batch_size=128, optimizer="sgd", lr=0.05, schedule="one-cycle",
                         seed=args.seed, threads=args.threads, val_n=args.val_n, train_n=args.train_n,
                         augment=args.augment, precision=args.precision)
    trainer = build_trainer(dataset=DATASET, model="cnn-small", method=method, out=run, config=config,
                            method_kwargs=args.options.get(method))
    trainer.resume()  # a no-op for a new run
    if trainer.start_epoch < trainer.epochs:
        trainer.fit()


def finished(run: Path) -> bool:
    """All the epochs the run was started with trained (FreeAT: their share, `epochs_for`), or stopped early
    by the method (Fast-AT's overfitting check)."""
    rows = read_metrics(run)
    if not rows:
        return False
    saved = json.loads((run / "config.json").read_text())
    method = make_method(run.name, DATASET, **{k: v for k, v in saved["method"].items() if k != "name"})
    return len(rows) >= method.epochs_for(saved["config"]["epochs"]) or "stopped_early" in rows[-1]


def evaluate(run: Path, args) -> dict:
    """Clean accuracy on all test images, PGD-50×3 on the first `--n`, AutoAttack on the first `--aa-n`.

    Each measure is cached with the image count it was taken on, and is reused while the run has the same
    epochs: adding AutoAttack to a finished comparison does not repeat its PGD.
    """
    cache = run / "compare.json"
    epochs = len(read_metrics(run))
    cached = json.loads(cache.read_text()) if cache.exists() else {}
    key = cached.get("key", {})
    result = dict(cached.get("result", {})) if key.get("epochs") == epochs else {}
    if key.get("n") != args.n:
        result.pop("pgd", None)
    if args.aa_n and key.get("aa_n") != args.aa_n:
        result.pop("autoattack", None)
    aa_n = args.aa_n or (key.get("aa_n", 0) if "autoattack" in result else 0)
    if "clean" in result and "pgd" in result and ("autoattack" in result or not aa_n):
        return result
    budget = threat_defaults(DATASET, "linf").eval
    test = load_dataset(DATASET).test
    model = load_model(run)
    model = model.to(memory_format=fast_memory_format(model))  # half the time of every pass on this project's CPUs
    start = time.perf_counter()
    if "clean" not in result:
        result["clean"] = accuracy(model, test, batch_size=500)
    if "pgd" not in result:
        attack = partial(pgd, eps=budget.eps, norm="linf", steps=budget.steps, step_size=budget.step_size,
                         restarts=budget.restarts)
        result["pgd"] = accuracy(model, test.subset(args.n), attack=attack, batch_size=500, seed=0,
                                 progress=f"{run.name} PGD", show=True)
    if aa_n and "autoattack" not in result:
        from robustlab.attacks.autoattack import autoattack_accuracy
        result["autoattack"] = autoattack_accuracy(model, test, eps=budget.eps, norm="linf", n=aa_n,
                                                   state_path=run / "autoattack-state.safetensors").robust_accuracy
    result["eval_s"] = round(result.get("eval_s", 0) + time.perf_counter() - start, 1)
    key = {"n": args.n, "aa_n": aa_n, "epochs": epochs}
    checkpoint.write_json(cache, {"key": key, "result": result})
    return result


def step_times(methods, args) -> dict:
    """Seconds per training step of each method on the same batch, measured in one process.

    The runs' own clocks depend on what else the machine was doing while each trained; these do not. A
    run's quiet cost is then (trained epochs) × (batches per epoch) × (seconds per step). The methods take
    turns, one step each, and each keeps its median (bench.median_seconds).
    """
    from robustlab.bench import median_seconds
    from robustlab.models import build_model, fast_memory_format
    from robustlab.training.methods import StepContext

    data = load_dataset(DATASET)
    info = data.info
    x = data.train.images[:128].float().div(255)
    y = data.train.labels[:128]
    batches = -(-(args.train_n or len(data.train)) // 128)
    steps, epochs = {}, {}
    for name in methods:
        torch.manual_seed(0)
        model = build_model("cnn-small", info.input_shape, info.num_classes, info.mean, info.std)
        fmt = fast_memory_format(model)
        model = model.to(memory_format=fmt).train()
        method = make_method(name, DATASET, "linf", **args.options.get(name, {}))
        epochs[name] = method.epochs_for(args.epochs)
        ctx = StepContext(model, model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
                          torch.Generator().manual_seed(0), autocast_for(args.precision, torch.device("cpu")),
                          epoch=epochs[name] - 1, epochs=epochs[name], progress=0.9,  # past any warm-up (AWP)
                          run=method.init_run_state(model, TrainConfig()))
        steps[name] = partial(method.train_step, ctx, x.contiguous(memory_format=fmt), y)
    seconds = median_seconds(steps, iters=args.step_iters)
    times = {}
    for name in methods:
        per_step = seconds[name]
        times[name] = {"s_per_step": per_step, "trained_epochs": epochs[name], "quiet_train_s": per_step * batches * epochs[name]}
        print(f"{name}: {per_step * 1000:.0f} ms per step (median of {args.step_iters}), {epochs[name]} epochs → "
              f"{per_step * batches * epochs[name]:.0f} s", flush=True)
    return times


def row(method: str, run: Path, cached: dict) -> dict:
    """A table row from a run's metrics and its cached test figures (compare.json), with the image counts
    those figures were taken on."""
    rows = read_metrics(run)
    best = max(rows, key=lambda r: r["val_robust"])
    result = cached["result"]
    counts = {"pgd_n": cached["key"]["n"], "aa_n": cached["key"]["aa_n"] if "autoattack" in result else 0}
    return {"method": method, "train_s": rows[-1]["elapsed_s"], "epochs": len(rows),
            "best_epoch": best["epoch"] + 1, "last_val_clean": rows[-1]["val_clean"],
            "last_val_robust": rows[-1]["val_robust"], "stopped_early": rows[-1].get("stopped_early"),
            **counts, **result}


def quiet_cost(row: dict, steps: dict) -> float:
    """Seconds per step × the epochs the run really trained (an early stop trains fewer); batches per epoch
    are the same for every method and cancel in the ratios."""
    return steps[row["method"]]["s_per_step"] * row["epochs"]


def _images(rows: list[dict], key: str) -> tuple[str, bool]:
    """The header's image count for a column, and whether each cell must give its own: the cached figures of
    runs measured with different --n or --aa-n stand side by side."""
    counts = {r[key] for r in rows if r[key]}
    return (f"first {counts.pop()}", False) if len(counts) == 1 else ("first N, per row", True)


def table(rows: list[dict], steps: dict) -> str:
    """`steps`: OUT/step_times.json's times (may be empty): the cost ratios that do not depend on the machine's load.
    The image counts in the header are those the cached figures were taken on, not this call's options."""
    by_name = {r["method"]: r for r in rows}
    pgd_head, pgd_each = _images(rows, "pgd_n")
    with_aa = any(r["aa_n"] for r in rows)
    aa_head, aa_each = _images(rows, "aa_n") if with_aa else ("", False)
    head = ("| method | clean (10,000) | PGD-50×3 ({n}) | {aa}Δ robust vs | training s (run's clock) | "
            "× PGD-AT, run's clock | × PGD-AT, step times | best epoch | last epoch val clean / PGD-10 |"
            ).format(n=pgd_head, aa=f"AutoAttack ({aa_head}) | " if with_aa else "")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        base = by_name.get(BASELINE.get(r["method"], ""))
        ratio = f"{r['train_s'] / by_name['pgd-at']['train_s']:.2f}" if "pgd-at" in by_name else "–"
        quiet = (f"{quiet_cost(r, steps) / quiet_cost(by_name['pgd-at'], steps):.2f}"
                 if r["method"] in steps and "pgd-at" in steps and "pgd-at" in by_name else "–")
        delta = f"{100 * (r['pgd'] - base['pgd']):+.1f} ({base['method']})" if base else "–"
        pgd_cell = f"{r['pgd']:.2%}" + (f" ({r['pgd_n']})" if pgd_each else "")
        aa = ""
        if with_aa:
            aa = (f"{r['autoattack']:.2%}" + (f" ({r['aa_n']})" if aa_each else "") if r["aa_n"] else "–") + " | "
        lines.append(f"| {r['method']} | {r['clean']:.2%} | {pgd_cell} | {aa}{delta} | {r['train_s']:.0f} | {ratio} | "
                     f"{quiet} | {r['best_epoch']}/{r['epochs']} | {r['last_val_clean']:.1%} / {r['last_val_robust']:.1%} |")
    return "\n".join(lines)


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(8, 4.5))
    biggest = max(r["train_s"] for r in rows)
    handles = []
    # A legend rather than labels beside the points: methods often land within a few tenths of a point.
    for r in rows:
        dots = ax.scatter(100 * r["clean"], 100 * r["pgd"], s=40 + 900 * r["train_s"] / biggest, alpha=0.5)
        ax.scatter(100 * r["clean"], 100 * r["pgd"], s=6, color="black")
        handles.append(Line2D([], [], marker="o", ls="", color=dots.get_facecolor()[0], markersize=8,
                              label=f"{r['method']} ({duration(r['train_s'])})"))
    ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False)
    ax.set_xlabel("clean test accuracy (%)")
    images, each = _images(rows, "pgd_n")
    ax.set_ylabel(f"PGD-50×3 test accuracy (%), {'images as in the table' if each else images}")
    ax.set_title("Fashion-MNIST cnn-small, L∞ ε = 0.1 (marker area ∝ training time)")
    ax.grid(alpha=0.3)
    ax.margins(0.2)  # room for the largest markers and their labels
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def parse_options(items: list[str], parser) -> dict[str, dict]:
    """["free-at.replays=4"] → {"free-at": {"replays": 4}}; values are read as JSON where they parse."""
    options: dict[str, dict] = {}
    for item in items:
        target, _, value = item.partition("=")
        method, _, key = target.partition(".")
        if not (value and key and method in METHODS):
            parser.error(f"--option {item!r}: expected METHOD.KEY=VALUE with METHOD one of {', '.join(METHODS)}")
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
        options.setdefault(method, {})[key] = value
    return options


def main(argv=None) -> int:
    p = OneLineParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--epochs", type=positive(int), default=5)
    p.add_argument("--seed", type=nonnegative(int), default=0, help="training seed (the test attacks keep seed 0)")
    p.add_argument("--n", type=positive(int), default=1000, help="test images for PGD-50×3 (clean uses all 10,000)")
    p.add_argument("--aa-n", type=nonnegative(int), default=0, help="test images for AutoAttack-standard (0: skip)")
    p.add_argument("--threads", type=positive(int), help="torch threads per worker")
    p.add_argument("--val-n", type=positive(int), default=1000)
    p.add_argument("--augment", default="none",
                   help="training augmentation (default none: Madry et al.'s MNIST setting, and the protocol's reference "
                        "loops; random crops cost accuracy in 5-epoch runs)")
    p.add_argument("--train-n", type=positive(int), help="train on the first N images (a smoke test, not the result)")
    p.add_argument("--option", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="a method option other than its paper's default, e.g. free-at.replays=4 (repeatable)")
    p.add_argument("--table", action="store_true", help="only gather finished runs into OUT/results.md and the plot")
    p.add_argument("--step-times", action="store_true",
                   help="only time every method's training step back to back (OUT/step_times.json); run it on a quiet machine")
    p.add_argument("--step-iters", type=positive(int), default=10)
    p.add_argument("--precision", default="fp32",
                   help="training precision: fp32 (the earlier tables), bf16, or auto (bf16 where the CPU has bf16 units)")
    args = p.parse_args(argv)
    args.options = parse_options(args.option, p)
    for method, options in args.options.items():  # a value of the wrong type failed deep inside, after other methods ran
        try:
            make_method(method, DATASET, "linf", **options)
        except RobustlabError:
            raise
        except (TypeError, ValueError) as exc:
            raise RobustlabError(f"--option for {method}: {exc}") from None
    args.precision = resolve_precision(args.precision, "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = output_dir(args.out)
    if args.step_times:
        checkpoint.write_json(out / "step_times.json", {
            "times": step_times(args.methods, args), "machine": machine(), "commit": commit(),
            "threads": torch.get_num_threads(), "precision": args.precision})
        return 0
    if not args.table:
        for method in args.methods:
            run = out / method
            if not finished(run):
                train(method, run, args)
            evaluate(run, args)
    rows = []
    for method in METHODS:  # the table holds every finished method, whichever worker ran it
        run = out / method
        if finished(run) and (run / "compare.json").exists():
            rows.append(row(method, run, json.loads((run / "compare.json").read_text())))
    if not rows:
        print("no finished method yet")
        return 0
    steps = json.loads((out / "step_times.json").read_text())["times"] if (out / "step_times.json").exists() else {}
    text = (table(rows, steps) + f"\n\n{machine()}; commit {commit()}; "
            f"command: python experiments/compare_at.py {' '.join(sys.argv[1:] if argv is None else argv)}\n")
    checkpoint.write_text(out / "results.md", text)
    checkpoint.write_json(out / "results.json", rows)
    plot(rows, out / "clean_vs_robust.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
