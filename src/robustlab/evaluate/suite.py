"""`robustlab eval --suite standard`: clean, PGD, AutoAttack-standard, sanity checks and OOD accuracy in one
report. Budgets below the protocol's (fewer AutoAttack steps or queries) are marked off-protocol."""
from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import torch

from robustlab import distributed
from robustlab.attacks import autoattack_accuracy, square
from robustlab.evaluate.accuracy import correct_mask, fraction
from robustlab.evaluate.corruptions import ood_accuracy, plot_corruptions
from robustlab.evaluate.sanity import check_autoattack_square, sanity_checks


def plot_per_class(class_names, clean_mask, robust_mask, labels, path, robust_label):
    from matplotlib.figure import Figure

    n = len(class_names)
    clean = [fraction(clean_mask[labels == c]) * 100 for c in range(n)]
    robust = [fraction(robust_mask[labels == c]) * 100 for c in range(n)]
    fig = Figure(figsize=(7, 3.8), dpi=120)
    ax = fig.subplots()
    idx = torch.arange(n).numpy()
    ax.bar(idx - 0.2, clean, 0.4, label="clean")
    ax.bar(idx + 0.2, robust, 0.4, label=robust_label)
    counts = [int((labels == c).sum()) for c in range(n)]  # how many images each bar rests on
    ax.set_xticks(idx, [f"{name} ({k})" for name, k in zip(class_names, counts)], rotation=35, ha="right", fontsize=8)
    ax.set_title(f"Per-class accuracy on {len(labels)} test images (images per class in brackets)", fontsize=10)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def run_suite(model, test, info, *, norm, eps, attack_at, pgd_label, out_dir, aa_steps=100, aa_queries=5000,
              aa_n=None, sanity_n=500, ood=True, cifar_c_dir=None, seed=0, batch_size=500, show=None,
              keep=None) -> tuple[list, dict, dict]:
    """Returns (report rows, extra results, plots) for `write_report`. `attack_at(e)`: the evaluation's attack
    (named `pgd_label`) at ε = e, its step scaled with e; the sanity checks run it at other ε. AutoAttack runs on
    the first `aa_n` test images (default: all). The corruptions are generated, or read from the published
    CIFAR-10/100-C files in `cifar_c_dir`. `keep`: an `AdversarialExamples` for the clean and the attack's
    passes."""
    pgd_attack = attack_at(eps)
    out_dir = Path(out_dir)
    rows, extra, plots, wall = [], {}, {}, {}
    start = time.perf_counter()
    clean_mask = correct_mask(model, test.images, test.labels, batch_size=batch_size, progress="clean", show=show,
                              keep=keep and keep.clean)
    robust_mask = correct_mask(model, test.images, test.labels, attack=pgd_attack, batch_size=batch_size, seed=seed,
                               progress=pgd_label, show=show, keep=keep and keep.adversarial)
    wall["clean+pgd"] = time.perf_counter() - start
    rows += [{"name": "clean", "n": len(test), "accuracy": fraction(clean_mask)},
             {"name": pgd_label, "n": len(test), "accuracy": fraction(robust_mask)}]

    start = time.perf_counter()
    aa_n = min(aa_n or len(test), len(test))
    aa = autoattack_accuracy(model, test, eps, norm, n=aa_n, batch_size=max(1, batch_size // 2), seed=seed,
                             progress=show is not False, state_path=out_dir / "autoattack_state.safetensors",
                             replace_other_state=True,  # the report it belonged to is being rewritten too
                             steps=aa_steps, queries=aa_queries)
    wall["autoattack"] = max(time.perf_counter() - start, sum(aa.seconds.values()))  # resumed: its stages before too
    off = "" if (aa_steps, aa_queries) == (100, 5000) else f" (off-protocol: {aa_steps} steps, {aa_queries} queries)"
    for stage, acc in aa.stage_accuracy.items():
        if stage != "clean":
            rows.append({"name": f"AutoAttack after {stage}{off}", "n": aa_n, "accuracy": acc})
    extra["autoattack"] = {"stage_accuracy": aa.stage_accuracy, "seconds": aa.seconds, "steps": aa_steps,
                           "queries": aa_queries}
    if distributed.is_main():
        plot_per_class(info.class_names, clean_mask, robust_mask, test.labels, out_dir / "per_class.png", pgd_label)
    plots["Per-class accuracy"] = "per_class.png"

    start = time.perf_counter()
    n = min(sanity_n, len(test))
    def at_any_eps(m, x, y, eps, generator=None):  # the sanity checks' calling convention
        return attack_at(eps)(m, x, y, generator=generator)
    checks = sanity_checks(model, test.subset(n).as_float(), test.labels[:n], norm=norm, eps=eps,
                           attacks={pgd_label: at_any_eps},
                           black_box={"Square-1000": partial(square, norm=norm, queries=1000)},
                           progress=show is not False)
    checks.checks.append(check_autoattack_square(aa.broken_by))
    wall["sanity"] = time.perf_counter() - start
    extra["sanity"] = {**checks.to_dict(), "n": n}
    extra["sanity_markdown"] = checks.to_markdown()

    if ood:
        start = time.perf_counter()
        result = ood_accuracy(model, test, progress=show is not False, batch_size=batch_size, cifar_c_dir=cifar_c_dir,
                              cache_dir=Path.home() / ".cache" / "robustlab" / "corruptions")
        wall["ood"] = time.perf_counter() - start
        published = " (the published CIFAR-C files)" if cifar_c_dir is not None else ""
        rows.append({"name": f"OOD mean over {len(result.accuracy)} corruptions × 5 severities{published}",
                     "n": len(test), "accuracy": result.mean})
        extra["ood"] = result.to_dict()
        if distributed.is_main():
            plot_corruptions(result, out_dir / "corruptions.png")
        plots["Accuracy under corruptions"] = "corruptions.png"
    extra["wall_s_by_step"] = {k: round(v, 1) for k, v in wall.items()}
    return rows, extra, plots
