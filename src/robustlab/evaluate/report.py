"""report.md / report.json for a run, with plots people would rather look at than read."""
from __future__ import annotations

import math
from pathlib import Path

from robustlab import checkpoint

# Figures are drawn with matplotlib.figure.Figure, imported where they are drawn, not pyplot: no global backend or
# figure state, so that robustlab leaves a notebook's own plotting alone (pyplot with matplotlib.use("Agg") at
# import switched it off), and commands pay for matplotlib only where they draw.


def plot_accuracy_vs_eps(curves: dict[str, list[tuple[float, float]]], path, title: str, norm: str,
                         scale: str = "pixel scale"):
    """One line per attack: accuracy (%) against ε (in `scale`: text attacks measure it in the embedding's)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.8), dpi=120)
    ax = fig.subplots()
    for name, points in curves.items():
        eps, acc = zip(*sorted(points))
        ax.plot(eps, [100 * a for a in acc], marker="o", label=name)
    ax.set_xlabel(f"ε ({'L∞' if norm == 'linf' else 'L2'}, {scale})")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def plot_training_curves(runs: dict[str, list[dict]], path, title: str, best: dict[str, int] | None = None):
    """Validation clean (dashed) and robust (solid) accuracy per epoch, one colour per run, the kept epoch ringed
    (`best`: run name → 0-based epoch, e.g. the checkpoint's own record; else the highest validation robust
    accuracy, the Trainer's rule for adversarial methods): robust overfitting shows as a robust line that peaks and
    falls while training goes on."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6.5, 4), dpi=120)
    ax = fig.subplots()
    last = 1
    for i, (name, metrics) in enumerate(runs.items()):
        rows = [m for m in metrics if math.isfinite(m.get("val_robust", math.nan))]  # NaN: no validation split
        if not rows:
            continue
        colour = f"C{i}"
        epochs = [m["epoch"] + 1 for m in rows]
        robust = [100 * m["val_robust"] for m in rows]
        ax.plot(epochs, robust, color=colour, marker=".", label=f"{name}: robust")
        if all("val_clean" in m for m in rows):  # markers on both: a one-epoch run is a point, not a line
            ax.plot(epochs, [100 * m["val_clean"] for m in rows], color=colour, ls="--", marker=".",
                    label=f"{name}: clean")
        kept = [j for j, m in enumerate(rows) if m["epoch"] == (best or {}).get(name)]
        j = kept[0] if kept else max(range(len(rows)), key=lambda k: robust[k])  # the first maximum, as kept
        ax.plot(epochs[j], robust[j], "o", ms=11, mfc="none", color=colour,
                label="kept checkpoint (best.safetensors)" if i == 0 else None)
        last = max(last, epochs[-1])
    ax.set_xlabel("epoch")
    ax.set_xlim(0.5, last + 0.5)  # a single epoch once spread 0.95–1.05 over the axis
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("validation accuracy (%)")
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def plot_adversarial_examples(x, x_adv, y, pred, class_names, path, title: str):
    """Clean test images (top row), their adversarial versions (middle) captioned with the model's prediction,
    red where it is wrong, and the perturbation (bottom), mid-grey at zero and scaled so the largest |δ| of each
    image reaches black or white. x, x_adv: N×C×H×W in [0, 1]; y, pred: N labels."""
    from matplotlib.figure import Figure

    n = len(x)
    fig = Figure(figsize=(1.25 * n, 4.4), dpi=120)
    axes = fig.subplots(3, n, squeeze=False)
    delta = x_adv - x
    scale = delta.flatten(1).abs().amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
    for i in range(n):
        shown = (x[i], x_adv[i], 0.5 + delta[i] / (2 * scale[i]))
        for row, image in enumerate(shown):
            ax = axes[row, i]
            image = image.float().cpu()  # as numpy: matplotlib's conversion of a tensor is deprecated under numpy 2
            if image.shape[0] == 1:
                ax.imshow(image[0].numpy(), cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
            ax.set_xticks([]), ax.set_yticks([])
        axes[0, i].set_title(class_names[int(y[i])], fontsize=7)
        wrong = int(pred[i]) != int(y[i])
        axes[1, i].set_title(class_names[int(pred[i])], fontsize=7, color="red" if wrong else "green")
    for row, name in enumerate(("clean: label", "adversarial:\nprediction", "perturbation")):
        axes[row, 0].set_ylabel(name, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


def measured_on(report: dict, seconds: float) -> str:
    """The report line that says where and at which commit it was measured, and how long it took."""
    return (f"Measured on {report.get('machine', 'an unrecorded machine')}, robustlab commit "
            f"{report.get('commit', 'unknown')}, in {seconds:.0f} s.")


def write_report(out_dir, results: dict, plots: dict[str, str], run_name: str):
    """Write OUT/report.json (everything) and OUT/report.md (a readable summary with the plots, which lie
    in OUT); OUT is the run's directory unless `robustlab eval --out` names another."""
    out_dir = Path(out_dir)
    checkpoint.write_json(out_dir / "report.json", {k: v for k, v in results.items() if k != "sanity_markdown"},
                          default=str)
    lines = [f"# Evaluation of `{run_name}`", ""]
    meta = results.get("run", {})
    if meta:
        epoch = "" if meta.get("epoch") is None else f", epoch {meta['epoch'] + 1}"  # files count from 0, people from 1
        epoch += f" of {meta['epochs']}" if epoch and meta.get("epochs") else ""
        method = f", method: `{meta['method']}`" if meta.get("method") else ""  # none for a model of one's own
        lines.append(f"- model: `{meta.get('model')}`, dataset: `{meta.get('dataset')}`{method}{epoch}")
        if meta.get("stopped_early"):
            lines.append(f"- training stopped early {meta['stopped_early']}")
        lines.append("")
    lines += [f"| evaluation | {results.get('unit', 'images')} | accuracy |", "|---|---|---|"]
    for row in results["rows"]:
        lines.append(f"| {row['name']} | {row['n']} | {100 * row['accuracy']:.2f}% |")
    lines.append("")
    if results.get("sanity_markdown"):
        on = results.get("sanity", {}).get("n")
        lines += ["## Gradient-masking sanity checks", "",
                  *([f"On the first {on} of the evaluated images; `autoattack_square` on AutoAttack's.", ""] if on else []),
                  results["sanity_markdown"], ""]
    if results.get("wall_s_by_step"):
        lines += ["Wall time (s): " + ", ".join(f"{k} {v}" for k, v in results["wall_s_by_step"].items()), ""]
    lines += [measured_on(results, results["wall_s"]), ""]
    if results.get("command"):
        lines += ["Command:", "", f"    {results['command']}", ""]
    for title, file in plots.items():
        lines += [f"## {title}", "", f"![{title}]({file})", ""]
    checkpoint.write_text(out_dir / "report.md", "\n".join(lines))
