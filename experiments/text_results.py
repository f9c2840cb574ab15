"""Issue 8's result: embedding-space adversarial training of the small Transformer on the offline Debian
package-description corpus (docs/text.md): plain training, FGM, PGD-3, FreeAT and FreeLB-3, 3 seeds each.

For every run: clean test accuracy and accuracy under embedding-space PGD-20 (L2, ε = 0.5 per sentence,
step 2.5ε/20, from the clean point, an example counts as broken if any iterate fools the model) of the
last epoch's weights, and the training wall time per epoch (the Trainer's clock: training only, no
validation). Nothing is chosen on the test set: all hyper-parameters are fixed beforehand (each method's
defaults, which share FreeLB's per-example budget ε = 0.6).

Each run goes through the Trainer into OUT/<method>-s<seed>/ (checkpoints every epoch) and writes its
numbers to result.json there; rerunning the script skips finished runs and resumes killed ones. Runs go
to `--jobs` worker processes of one thread each, so wall times are comparable between methods.

    python experiments/text_results.py                      # the table, into OUT/results.md and stdout
    python experiments/text_results.py --seeds 0 --epochs 1 --train-n 2000 --attack-n 200   # a quick look
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from robustlab import checkpoint
from robustlab.cli import OneLineParser, nonnegative, positive
from robustlab.errors import RobustlabError, run_script
from robustlab.provenance import commit, machine

RUNS = [  # (label, method, options): the most expensive first, so that the workers finish together
    ("PGD-3", "pgd", {"steps": 3}),
    ("FreeLB-3", "freelb", {"steps": 3}),
    ("FGM", "fgm", {}),
    ("FreeAT (m = 2)", "free-at", {"replays": 2}),
    ("plain", "standard", {}),
]
ORDER = ["plain", "FGM", "PGD-3", "FreeAT (m = 2)", "FreeLB-3"]


def run_one(label, method, options, seed, args) -> dict:
    import torch
    from robustlab.text.training import EVAL_EPS, EVAL_STEPS, build_text_trainer, pgd_attack, text_accuracy
    from robustlab.training import TrainConfig

    torch.set_num_threads(1)
    out = Path(args.out) / f"{method}-s{seed}" if args.eps is None else Path(args.out) / f"{method}-eps{args.eps:g}-s{seed}"
    done = out / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    config = TrainConfig(epochs=args.epochs, batch_size=64, optimizer="adam", lr=2e-3, weight_decay=0.0,
                         schedule="one-cycle", seed=seed, val_n=500, train_n=args.train_n, threads=1)
    trainer = build_text_trainer(out=out, method=method, data_dir=args.data_dir, config=config,
                                 method_kwargs=options, show_progress=False)
    trainer.resume()
    trainer.fit()
    model = trainer.model.eval()  # the last epoch's weights
    test = trainer.data.test
    start = time.perf_counter()
    clean = text_accuracy(model, test)
    attacked = test.subset(min(args.attack_n, len(test)))
    robust = text_accuracy(model, attacked, attack=pgd_attack(EVAL_EPS, EVAL_STEPS))
    result = {"label": label, "method": method, "options": trainer.method.config(), "seed": seed,
              "epochs": trainer.epochs, "train_examples": len(trainer.train_set), "clean": clean,
              "test_n": len(test), "pgd": robust, "pgd_n": len(attacked), "pgd_eps": EVAL_EPS, "pgd_steps": EVAL_STEPS,
              "train_s": trainer.elapsed, "s_per_epoch": trainer.elapsed / trainer.epochs,
              "eval_s": time.perf_counter() - start}
    checkpoint.write_json(done, result)
    print(f"{label} seed {seed}: clean {clean:.2%}, PGD {robust:.2%}, {result['s_per_epoch']:.0f} s/epoch", flush=True)
    return result


def _budget(method: str, eps: float | None) -> dict:
    if eps is None or method == "standard":
        return {}
    return {"eps": eps, **({"step_size": eps / 3} if method == "pgd" else {})}


def _mean_std(values, scale=100.0, digits=1):
    m = statistics.mean(values) * scale
    s = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def table(results: list[dict]) -> str:
    by_label = {label: [r for r in results if r["label"] == label] for label in ORDER}
    plain = statistics.mean(r["s_per_epoch"] for r in by_label["plain"]) if by_label["plain"] else None
    r0 = results[0]
    lines = [f"| method | options | clean test acc. (%) | PGD-{r0['pgd_steps']} acc., L2 ε = {r0['pgd_eps']:g} (%) "
             f"| s / epoch | × plain |", "|---|---|---|---|---|---|"]
    for label, rows in by_label.items():
        if not rows:
            continue
        secs = statistics.mean(r["s_per_epoch"] for r in rows)
        opts = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in rows[0]["options"].items())
        lines.append(f"| {label} | {opts or '—'} | {_mean_std([r['clean'] for r in rows])} | "
                     f"{_mean_std([r['pgd'] for r in rows])} | {secs:.1f} | {secs / plain if plain else float('nan'):.2f} |")
    seeds = sorted({r["seed"] for r in results})
    lines.append("")
    lines.append(f"Mean ± standard deviation over seeds {', '.join(map(str, seeds))}; {r0['epochs']} epochs on "
                 f"{r0['train_examples']:,} training descriptions; clean accuracy on all {r0['test_n']:,} test "
                 f"descriptions, PGD on the first {r0['pgd_n']:,}.")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = OneLineParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/text-results")
    p.add_argument("--data-dir", help="where debian-packages.tsv is (default: the user cache, built if missing)")
    p.add_argument("--seeds", type=nonnegative(int), nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=positive(int), default=2)
    p.add_argument("--train-n", type=positive(int), help="train on the first N training descriptions (quick looks)")
    p.add_argument("--attack-n", type=positive(int), default=1000, help="test descriptions under PGD")
    p.add_argument("--jobs", type=positive(int), default=2, help="parallel runs, one thread each")
    p.add_argument("--methods", nargs="+", default=[m for _, m, _ in RUNS], choices=[m for _, m, _ in RUNS],
                   help="a subset of: " + ", ".join(m for _, m, _ in RUNS))
    p.add_argument("--eps", type=nonnegative(float), help="one training budget ε for every method instead of their defaults "
                   "(PGD's step then ε/3). This script measures the test set only: do not compare ε values with "
                   "it; choose ε with `robustlab eval RUN --split val` on the runs it trains")
    args = p.parse_args(argv)
    if args.data_dir and not Path(args.data_dir).expanduser().is_dir():  # a mistyped path once got a new corpus
        raise RobustlabError(f"--data-dir {args.data_dir}: no such folder (leave it out to use the user cache)")

    from robustlab.text.data import load_text_dataset
    load_text_dataset("debian-packages", args.data_dir)  # build the corpus once, before the workers start
    start = time.perf_counter()
    runs = [(label, method, {**options, **_budget(method, args.eps)}) for label, method, options in RUNS
            if method in args.methods]
    work = [(label, method, options, seed) for seed in args.seeds for label, method, options in runs]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(run_one, *zip(*work), [args] * len(work)))
    text = (f"{table(results)}\n\nMachine: {machine()}; robustlab commit {commit()}; {args.jobs} runs in parallel, one thread each; "
            f"total wall time {time.perf_counter() - start:.0f} s.\nCommand: python experiments/text_results.py "
            + " ".join(sys.argv[1:]) + "\n")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    checkpoint.write_text(Path(args.out) / "results.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
