"""The tinygrad result table of docs/results.md: Fashion-MNIST MLP and cnn-small after PGD-AT in tinygrad, beside PyTorch.

    python -m robustlab.tinygrad.results --epochs 5 --out runs/tinygrad-results

For each model, both backends train with the same options (the protocol's PGD-10 step 0.025,
ε = 0.1, SGD one-cycle lr 0.05, batch 128, the 55k/5k split, seed 0), the same batches and the same
initial weights; each best-on-validation checkpoint is then evaluated on the test set, clean and
under the protocol's PGD (PGD-50×3, step 0.01, for Fashion-MNIST), by its own backend. Wall time
per epoch is training alone (validation excluded), as the Trainer's elapsed_s counts it.
Writes OUT/results.json and OUT/results.md. Run it again after an interruption: finished runs are
only evaluated, a stopped one resumes from its last epoch.
"""
from __future__ import annotations

import sys
import time
from functools import partial
from pathlib import Path

from robustlab import checkpoint
from robustlab.data import load_dataset
from robustlab.protocol import threat_defaults
from robustlab.provenance import commit, machine
from robustlab.training import TrainConfig

DATASET = "fashion-mnist"


def train_tinygrad(model: str, config: TrainConfig, out: Path) -> dict:
    from robustlab.tinygrad.trainer import build_trainer
    trainer = build_trainer(dataset=DATASET, model=model, method="pgd-at", out=out, config=config)
    trainer.resume()  # continues a run that was stopped (a no-op for a new one)
    trainer.fit()
    return _epochs(out)


def train_torch(model: str, config: TrainConfig, out: Path) -> dict:
    from robustlab.training.run import build_trainer
    trainer = build_trainer(dataset=DATASET, model=model, method="pgd-at", out=out, config=config)
    trainer.resume()
    trainer.fit()
    return _epochs(out)


def _epochs(out: Path) -> dict:
    rows = checkpoint.read_metrics(out)
    times, last = [], 0.0
    for r in rows:
        times.append(r.get("epoch_s", r["elapsed_s"] - last))
        last = r["elapsed_s"]
    return {"epochs": len(rows), "epoch_s": [round(t, 1) for t in times], "train_s": round(rows[-1]["elapsed_s"], 1),
            "val": [{"clean": r["val_clean"], "robust": r["val_robust"]} for r in rows]}


def evaluate(backend: str, out: Path, n: int | None, seed: int = 0) -> dict:
    """Clean and protocol-PGD accuracy of OUT/best.safetensors on the first n test images."""
    budget = threat_defaults(DATASET, "linf").eval
    test = load_dataset(DATASET).test
    test = test.subset(n) if n else test
    attack = dict(eps=budget.eps, norm="linf", steps=budget.steps, step_size=budget.step_size, restarts=budget.restarts)
    start = time.perf_counter()
    if backend == "tinygrad":
        from robustlab.tinygrad import accuracy, load_model, pgd
        model = load_model(out)
        clean = accuracy(model, test)
        robust = accuracy(model, test, attack=partial(pgd, **attack), seed=seed, progress="PGD", show=True)
    else:
        from robustlab.attacks import pgd
        from robustlab.evaluate import accuracy
        from robustlab.training.run import load_model
        model = load_model(out, "best")
        clean = accuracy(model, test, batch_size=500)
        robust = accuracy(model, test, attack=partial(pgd, **attack), batch_size=500, seed=seed, progress="PGD", show=True)
    label = f"PGD-{budget.steps}×{budget.restarts} step {budget.step_size:g}"
    return {"clean": clean, "robust": robust, "attack": label, "n": len(test), "eval_s": round(time.perf_counter() - start, 1)}


def main(argv=None) -> int:
    from robustlab.cli import OneLineParser
    p = OneLineParser(prog="python -m robustlab.tinygrad.results", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--models", nargs="+", default=["mlp", "cnn-small"])
    p.add_argument("--backends", nargs="+", default=["tinygrad", "torch"])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--n", type=int, help="test images to evaluate (default: all 10,000)")
    p.add_argument("--threads", type=int, help="CPU threads for both frameworks (default: theirs)")
    p.add_argument("--train-n", type=int, help="train on the first N training images (a quick check, not the result)")
    p.add_argument("--val-n", type=int, default=1000, help="validation images for the per-epoch PGD check")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = dict(epochs=args.epochs, batch_size=128, optimizer="sgd", lr=0.05, schedule="one-cycle", seed=0,
                  threads=args.threads, train_n=args.train_n, val_n=args.val_n)
    rows = []
    for model in args.models:
        for backend in args.backends:
            run = out / f"{backend}-{model}"
            done = len(checkpoint.read_metrics(run)) >= args.epochs
            if not done:  # trains, or resumes a run that was stopped; a finished run is only evaluated
                (train_tinygrad if backend == "tinygrad" else train_torch)(model, TrainConfig(**config), run)
            row = {"model": model, "backend": backend, **_epochs(run), **evaluate(backend, run, args.n)}
            rows.append(row)
            checkpoint.write_json(out / "results.json", {
                "rows": rows, "config": config, "machine": machine(), "commit": commit(),
                "command": "python -m robustlab.tinygrad.results " + " ".join(sys.argv[1:])})
    lines = ["| model | backend | clean | " + (rows[0]["attack"] if rows else "PGD") +
             " | s / epoch (train; later epochs) | first epoch s (with tinygrad's kernel compile) | epochs |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        later = r["epoch_s"][1:] or r["epoch_s"]
        lines.append(f"| {r['model']} | {r['backend']} | {r['clean']:.2%} | {r['robust']:.2%} | "
                     f"{sum(later) / len(later):.0f} | {r['epoch_s'][0]:.0f} | {r['epochs']} |")
    text = "\n".join(lines) + f"\n\n{rows[0]['n'] if rows else 0} test images; {machine()}\n"
    checkpoint.write_text(out / "results.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
