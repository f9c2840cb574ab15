"""Validation α curves of several RiFT runs in one figure (each run's chosen candidate), to compare recipes.

    python experiments/rift_curves.py runs/s22/rift-trades-lr0.01-cpu runs/s25/rift-trades-layer4.1 \
        --labels "one module" "two modules" --out docs/figures/rift-curves.png --title "…"

Reads only each run's rift_state.json (validation figures); the runs must share their original model, so that the
tolerance line (drawn from the first run's α = 0) applies to all.
"""
import json
import sys
from pathlib import Path

from robustlab.cli import OneLineParser, nonnegative
from robustlab.errors import run_script
from robustlab.rift.report import plot_alpha


def main(argv=None):
    p = OneLineParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="RiFT output directories")
    p.add_argument("--labels", nargs="+", help="one legend label per run (default: the candidate ids)")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--title", default="Validation accuracy of θ(α)")
    p.add_argument("--tolerance", type=nonnegative(float), default=0.1, help="points (0.1, RiFT's default)")
    args = p.parse_args(argv)
    if args.labels and len(args.labels) != len(args.runs):
        p.error(f"--labels needs one label per run ({len(args.runs)}), got {len(args.labels)}")
    entries, sources = {}, set()
    for i, run in enumerate(args.runs):
        path = Path(run) / "rift_state.json"
        if not path.exists():
            p.error(f"{path} does not exist: give RiFT output directories")
        state = json.loads(path.read_text())
        if "chosen" not in state:
            p.error(f"{run} has no chosen candidate yet: its α search did not finish")
        sources.add(state["source"]["sha256"])
        entries[args.labels[i] if args.labels else state["chosen"]] = state["candidates"][state["chosen"]]
    if len(sources) > 1:
        p.error("the runs start from different original models; their tolerance lines differ")
    plot_alpha(entries, args.out, args.title, args.tolerance / 100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(run_script(main))
