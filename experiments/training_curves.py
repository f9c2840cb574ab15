"""Validation curves of several training runs in one figure (robust overfitting, AWP's effect, schedules).

    python experiments/training_curves.py runs/s13-awp30/pgd-at runs/s13-awp30/pgd-at-awp --out docs/figures/awp-30.png

Each run contributes its validation clean (dashed) and robust (solid) accuracy per epoch from its metrics.jsonl,
with the best epoch ringed; `robustlab eval` draws the same plot for one run in its report.
"""
from __future__ import annotations

import sys
from pathlib import Path

from robustlab.checkpoint import read_metadata, read_metrics
from robustlab.cli import OneLineParser
from robustlab.errors import run_script
from robustlab.evaluate.report import plot_training_curves


def main(argv=None):
    p = OneLineParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run directories (each with a metrics.jsonl)")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--title", default="validation during training")
    args = p.parse_args(argv)
    curves, kept = {}, {}
    for run in args.runs:
        metrics = read_metrics(run)
        if not metrics:
            p.error(f"{run} has no metrics.jsonl: pass a training run's directory")
        curves[Path(run).name] = metrics
        if (Path(run) / "best.safetensors").exists():  # the kept epoch, whatever rule chose it (standard: clean)
            kept[Path(run).name] = read_metadata(Path(run) / "best.safetensors")["epoch"]
    plot_training_curves(curves, args.out, args.title, best=kept)
    print(args.out)


if __name__ == "__main__":
    sys.exit(run_script(main))
