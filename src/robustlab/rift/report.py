"""RiFT's plots and its before/after report (rift_report.md and rift_report.json, beside `robustlab eval`'s own)."""
from __future__ import annotations

from pathlib import Path

from robustlab import checkpoint
from robustlab.evaluate.report import measured_on
from robustlab.rift.finetune import ALPHAS


def plot_alpha(entries: dict, path, title: str, tolerance: float):
    """Validation clean (left) and robust (right) accuracy of θ(α), a line per candidate, its chosen α circled."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=120)
    axes = fig.subplots(1, 2)
    for i, (cid, entry) in enumerate(entries.items()):
        colour = f"C{i % 10}"
        for ax, what in zip(axes, ("clean", "robust")):
            points = [(a, entry["curve"][f"{a:.2f}"][what]) for a in ALPHAS
                      if what in entry["curve"].get(f"{a:.2f}", {})]
            if points:
                # The automatic mode measures robust accuracy only where it can change the choice: a line through
                # two points would pass for a measured curve.
                whole = len(points) == len(ALPHAS)
                ax.plot([a for a, _ in points], [100 * v for _, v in points], marker="." if whole else "o",
                        ls="-" if whole else "", color=colour,
                        label=f"{cid} (α = {entry['alpha']:.1f})" + ("" if whole else ", measured at the points"))
            chosen = entry["curve"][f"{entry['alpha']:.2f}"]
            if what in chosen:
                ax.scatter([entry["alpha"]], [100 * chosen[what]], s=90, facecolors="none", edgecolors=colour)
    first = next(iter(entries.values()))["curve"]["0.00"]
    if "robust" in first:
        axes[1].axhline(100 * (first["robust"] - tolerance), color="grey", ls="--", lw=1,
                        label=f"original − {100 * tolerance:g} point")
    for ax, what in zip(axes, ("clean", "robust (fixed-seed PGD)")):
        ax.set_xlabel("α (0: robust model, 1: fine-tuned)")
        ax.set_ylabel(f"validation {what} accuracy (%)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def metric_label(metric: str, row: dict, test_settings: dict) -> str:
    """A test metric's name as reports print it: AutoAttack with its image count and, when lowered, its budget."""
    if metric != "AutoAttack":
        return metric
    off = "" if (test_settings["aa_steps"], test_settings["aa_queries"]) == (100, 5000) else \
        f", off-protocol: {test_settings['aa_steps']} steps, {test_settings['aa_queries']} queries"
    return f"AutoAttack-standard ({row['aa_n']} images{off})"


def _pct(value) -> str:
    return "—" if value is None else f"{100 * value:.2f}%"


def write_report(out: Path, report: dict):
    checkpoint.write_json(out / "rift_report.json", report, default=str)
    src, rift, cands = report["source"], report["rift"], report["candidates"]
    chosen, paper = report["chosen"], report["paper_pick"]
    given = report["settings"].get("module")
    first = f"the module{'s' * (',' in given)} given with --module" if given else "the paper's pick"
    tuned = rift["module"].split(",")
    tuned = f"module{'s' * (len(tuned) > 1)} " + ", ".join(f"`{m}`" for m in tuned)
    kwargs = f" {src['model']['kwargs']}" if src["model"].get("kwargs") else ""
    key, original = report["mrc"]["key"], report["mrc"]["original"]
    recal = f", re-estimated on {rift['recal_n']} training images ({rift['recal_inputs']})" if "recal_n" in rift else ""
    lines = [f"# RiFT of `{src['path']}`", "",
             f"- model `{src['model']['name']}`{kwargs}, trained with `{src['method']}`; "
             f"dataset `{report['dataset']}`, threat {report['norm']}",
             f"- fine-tuned {tuned} (lr {rift['lr']:g}, BatchNorm statistics: {rift['bn']}{recal}), "
             f"α = {rift['alpha']:.1f}; the checkpoint is `best.safetensors` (`robustlab eval {out}` reads it)",
             f"- {first}{'' if given else ' (lowest MRC)'}: `{paper}`"
             + (f"; automatic mode chose `{chosen}`" if rift["automatic"] else ""), ""]
    if report["test"]:
        names = list(report["test"])
        base = report["test"]["original"]
        metrics = [k for k in base if k not in ("weights", "n", "aa_n", "seconds", "same_weights_as")]
        lines += ["## Test set, before and after", "",
                  "| | " + " | ".join(names) + " | RiFT − original |", "|---" * (len(names) + 2) + "|"]
        for metric in metrics:
            delta = report["test"]["rift"][metric] - base[metric]
            label = metric_label(metric, base, report["test_settings"])
            lines.append(f"| {label} | " + " | ".join(_pct(report["test"][n][metric]) for n in names)
                         + f" | {100 * delta:+.2f} points |")
        same = [f"{n} has the same weights as {r['same_weights_as']}" for n, r in report["test"].items()
                if r.get("same_weights_as")]
        lines += ["", f"{base['n']} test images. The test set was read only after every choice was made."
                  + "".join(f" {s.capitalize()}." for s in same), ""]
    lines += ["## Choice on the validation split", "",
              f"α maximizes validation clean accuracy subject to validation robust accuracy ≥ the original's − "
              f"{100 * report['settings']['tolerance']:g} point ({rift['val']['images']} images, fixed-seed "
              f"PGD-{key['attack']['steps']}{report['alpha_check']}). "
              f"Original: {_pct(rift['val']['robust_original'])} robust.", "",
              "| candidate | MRC | fine-tuned epoch (val clean) | α | val clean | val robust |",
              "|---|---|---|---|---|---|"]
    for cid, e in cands.items():
        tag = " (chosen)" if cid == chosen else ""
        tag += f" ({first})" if cid == paper else ""
        lines.append(f"| `{cid}`{tag} | {e['mrc']:.4f} | {e['finetune']['best_epoch'] + 1} "
                     f"({_pct(e['finetune']['val_clean'])}) | {e['alpha']:.1f} | {_pct(e['val_clean'])} | "
                     f"{_pct(e['val_robust'])} |")
    if any("," in e["module"] for e in cands.values()):
        lines += ["", "A candidate of several modules shows the largest of their MRCs."]
    if rift["automatic"]:
        gain = cands[chosen]["val_clean"] - cands[paper]["val_clean"]
        verdict = (f"beats {first} by {100 * gain:.2f} points of validation clean accuracy" if gain > 0
                   else f"is {first}: no other candidate did better on validation")
        lines += ["", f"Automatic mode ({len(cands)} candidates): `{chosen}` {verdict}."]
    modules = report["mrc"]["modules"]
    lines += ["", "## Module robust criticality", "",
              f"{key['n']} validation images attacked once (PGD-{key['attack']['steps']}); original adversarial "
              f"loss {original['loss']:.4f}, accuracy {_pct(original['accuracy'])}; "
              f"‖Δ‖₂ ≤ {key['mrc']['eps']:g}·‖θ‖₂.", "",
              "| module | MRC | robust accuracy at the worst Δ | weights |", "|---|---|---|---|"]
    for name in report["mrc_ranking"]:
        r = modules[name]
        lines.append(f"| `{name}` | {r['mrc']:.4f} | {_pct(r['worst_accuracy'])} | {r['weights']} |")
    lines += ["", "![MRC per module](mrc.png)", "", "## Validation accuracy versus α", "",
              "![α curves](alpha.png)", "", "## Wall time", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {step} | {seconds:.1f} |" for step, seconds in report["wall_s"].items()]
    lines += ["", measured_on(report, sum(report["wall_s"].values()))]
    if report.get("command"):
        lines += ["", "Command:", "", f"    {report['command']}"]
    checkpoint.write_text(out / "rift_report.md", "\n".join(lines) + "\n")
