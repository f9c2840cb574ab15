"""Clean/robust trade-off curves: Generalist with its final mixing ratio β swept, against TRADES with its
β swept, and the PGD-AT point (issue 7). Writes tradeoff.json and tradeoff.png in --out.

    python experiments/generalist_tradeoff.py --epochs 10 --generalist '{"mix_start": 0.4, ...}' \\
        --split test --eval-n 10000 --eval-steps 50 --eval-restarts 3
    ... --shard 0/2 & ... --shard 1/2; ...     # two one-thread processes, then once more without --shard

The Generalist configuration comes from `generalist_search.py` (chosen on validation data); the swept values
are fixed here in advance, so the figure may be measured on the test set without choosing anything on it.
Every run trains with the same epochs, attack, learning rate and schedule; runs and evaluations are cached,
so an interrupted sweep continues where it stopped.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from generalist_search import evaluate, shard_arg, train  # noqa: E402

from robustlab import checkpoint, load_model  # noqa: E402
from robustlab.cli import OneLineParser, nonnegative, positive  # noqa: E402
from robustlab.data import load_dataset  # noqa: E402
from robustlab.errors import run_script  # noqa: E402
from robustlab.models import fast_memory_format  # noqa: E402


def dominance(generalist: list[dict], trades: list[dict], key: str = "robust") -> list[dict]:
    """For each TRADES point: the Generalist curve's robust accuracy at the same clean accuracy (linear between
    neighbouring points), or, outside the curve's clean range, whether one Generalist point is at least as good
    on both."""
    pts = sorted((r["clean"], r[key]) for r in generalist)
    cleans, robusts = np.array([c for c, _ in pts]), np.array([r for _, r in pts])
    out = []
    for t in trades:
        if cleans[0] <= t["clean"] <= cleans[-1]:
            gap = float(np.interp(t["clean"], cleans, robusts) - t[key])
            out.append({"name": t["name"], "robust_gap_at_same_clean": 100 * gap, "dominated": gap >= 0})
        else:
            out.append({"name": t["name"], "robust_gap_at_same_clean": None,
                        "dominated": any(c >= t["clean"] and r >= t[key] for c, r in pts)})
    return out


def plot(rows: list[dict], path: Path, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    key = "autoattack" if all("autoattack" in r for r in rows) else "robust"  # AutoAttack when measured
    fig, ax = plt.subplots(figsize=(5.5, 4.0), dpi=120)
    for method, marker in (("generalist", "o"), ("trades", "s"), ("pgd-at", "*")):
        pts = sorted((100 * r["clean"], 100 * r[key], r["label"]) for r in rows if r["method"] == method)
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, markersize=9 if marker == "*" else 5,
                label={"generalist": "Generalist (β final swept)", "trades": "TRADES (β swept)",
                       "pgd-at": "PGD-AT"}[method])
        for c, r, label in pts:
            ax.annotate(label, (c, r), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.set_xlabel("clean accuracy (%)")
    ax.set_ylabel(f"robust accuracy (%, {'AutoAttack' if key == 'autoattack' else 'PGD'})")
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    p = OneLineParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/generalist-tradeoff")
    p.add_argument("--generalist", default="{}", help="JSON of Generalist options (mix_final is swept)")
    p.add_argument("--mix-finals", type=nonnegative(float), nargs="+", default=[0.2, 0.4, 0.6, 0.8, 1.0])
    p.add_argument("--trades-betas", type=nonnegative(float), nargs="+", default=[0.5, 1.0, 2.0, 4.0, 6.0, 8.0])
    p.add_argument("--split", default="test", choices=("val", "test"))
    p.add_argument("--checkpoint", default="best", choices=("best", "last"),
                   help="which checkpoint of each run to evaluate: best (by the Trainer's validation PGD) or last; "
                        "β's final value acts in the last epochs, which a best-epoch choice can pass over")
    p.add_argument("--autoattack-n", type=nonnegative(int), default=0, help="also AutoAttack-standard on the first N images")
    p.add_argument("--model", default="cnn-small")
    p.add_argument("--epochs", type=positive(int), default=10)
    p.add_argument("--train-n", type=positive(int))
    p.add_argument("--steps", type=positive(int), default=10)
    p.add_argument("--step-size", type=nonnegative(float), default=0.025)
    p.add_argument("--lr", type=positive(float), default=0.05)
    p.add_argument("--schedule", default="one-cycle")
    p.add_argument("--augment", default=None)
    p.add_argument("--val-n", type=positive(int), default=500)
    p.add_argument("--eval-n", type=positive(int), default=10000)
    p.add_argument("--eval-steps", type=positive(int), default=50)
    p.add_argument("--eval-restarts", type=positive(int), default=3)
    p.add_argument("--threads", type=positive(int), default=2)
    p.add_argument("--precision", default="auto", help="training precision: auto (bf16 where the CPU has bf16 units), fp32, bf16")
    p.add_argument("--seed", type=nonnegative(int), default=0)
    p.add_argument("--shard", type=shard_arg, default=(0, 1),
                   help="I/N: train and evaluate every N-th run from the I-th (0-based; shard 0 has PGD-AT), so that "
                        "N one-thread processes share a sweep; then run without --shard for the figure")
    p.add_argument("--data-dir")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    splits = load_dataset("fashion-mnist", data_dir=args.data_dir)
    data = splits.test if args.split == "test" else splits.val
    base = json.loads(args.generalist)

    runs = [("pgd-at", "pgd-at", {}, "PGD-AT")]
    runs += [(f"generalist-mf{m:g}", "generalist", {**base, "mix_final": m}, f"{m:g}") for m in args.mix_finals]
    runs += [(f"trades-b{b:g}", "trades", {"beta": b}, f"{b:g}") for b in args.trades_betas]
    cache_path = root / "evaluations.jsonl"
    cache = {}
    if cache_path.exists():
        cache = {r["name"]: r for r in map(json.loads, cache_path.read_text().splitlines()) if r}
    shard, shards = args.shard
    rows = []
    for name, method, kwargs, label in runs[shard::shards]:
        if name not in cache:
            print(f"[{name}] {method} {json.dumps(kwargs)}", file=sys.stderr)
            wall = train(root / name, method, kwargs, args)
            row = {"name": name, "method": method, "kwargs": kwargs, "label": label, "train_s": round(wall, 1),
                   **evaluate(root / name, args, data, prefix="", which=args.checkpoint)}
            if args.autoattack_n:
                from robustlab.attacks.autoattack import autoattack_accuracy
                model = load_model(root / name, args.checkpoint)
                model = model.to(memory_format=fast_memory_format(model))
                row["autoattack"] = autoattack_accuracy(model, data, eps=0.1, n=args.autoattack_n,
                                                        state_path=root / name / "aa_state.json").robust_accuracy
            with open(cache_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            cache[name] = row
        rows.append(cache[name])
    if shards > 1:
        return 0

    gen = [r for r in rows if r["method"] == "generalist"]
    trades = [r for r in rows if r["method"] == "trades"]
    key = "autoattack" if args.autoattack_n else "robust"
    measured = (f"{args.checkpoint} checkpoints; clean on {len(data)}, "
                f"PGD-{args.eval_steps}x{args.eval_restarts} on {min(args.eval_n, len(data))}"
                + (f", AutoAttack on {min(args.autoattack_n, len(data))}" if args.autoattack_n else ""))
    summary = {"split": args.split, "eval": measured, "args": vars(args), "rows": rows,
               "dominance": dominance(gen, trades, key) if gen and trades else []}
    checkpoint.write_json(root / "tradeoff.json", summary)
    title = f"{args.model}, Fashion-MNIST, {args.epochs} epochs\n{args.split}: {summary['eval']}"
    plot(rows, root / "tradeoff.png", title)
    for r in rows:
        print(f"{r['name']:22s} clean {100 * r['clean']:6.2f}%  robust {100 * r['robust']:6.2f}%  train {r['train_s']:.0f}s"
              + (f"  AA {100 * r['autoattack']:.2f}%" if "autoattack" in r else ""))
    for d in summary["dominance"]:
        print(d)
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
