"""`robustlab summary RUN...`: the evaluation reports of several runs side by side, as a table and a plot.

Each RUN is a run directory or an evaluation folder holding `report.json` (what `robustlab eval` writes), or the
file itself. Figures are copied from the reports, never recomputed; the table says when the reports measured
different things (another attack, another number of images), since their figures then do not compare.
"""
from __future__ import annotations

import json
from pathlib import Path

from robustlab.errors import RobustlabError, output_dir


def read_report(where) -> tuple[str, dict, Path]:
    """(a name for the row, the report, its folder) of a run directory, an evaluation folder or a report.json file."""
    path = Path(where)
    file = path if path.is_file() else path / "report.json"
    if not file.is_file():
        raise RobustlabError(f"no report.json in {where}; write one with `robustlab eval {where}`")
    try:
        report = json.loads(file.read_text())
    except ValueError:
        report = None
    if (not isinstance(report, dict) or not {"rows", "label", "clean", "robust", "n"} <= report.keys()
            or not all(isinstance(report[k], (int, float)) for k in ("clean", "robust", "n"))
            or not isinstance(report.get("run", {}), dict) or not isinstance(report["rows"], list)
            or not all(isinstance(r, dict) and {"name", "accuracy"} <= r.keys() for r in report["rows"])):
        raise RobustlabError(f"{file} is not a robustlab evaluation report")
    folder = file.parent
    name = f"{folder.parent.name}/{folder.name}" if folder.name.startswith("eval-") else folder.name
    return name, report, folder


def training_seconds(folder: Path) -> float | None:
    """The run's training time from its metrics.jsonl, in the report's folder or, for RUN/eval-NAME, above it
    (reports written before they recorded it themselves)."""
    from robustlab.checkpoint import read_metrics
    for run in (folder, folder.parent):
        if metrics := read_metrics(run):
            return metrics[-1].get("elapsed_s")
    return None


def summarize(name: str, report: dict, folder: Path) -> dict:
    """One row: the run, clean accuracy, the report's attack, AutoAttack's final stage and the OOD mean when there,
    and the run's training time."""
    rows = report["rows"]
    autoattack = [r for r in rows if r["name"].startswith("AutoAttack after")]
    ood = next((r for r in rows if r["name"].startswith("OOD mean")), None)
    run = report.get("run", {})
    return {"name": name, "dataset": run.get("dataset"), "model": run.get("model"), "method": run.get("method"),
            "epoch": None if run.get("epoch") is None else f"{run['epoch'] + 1}/{run.get('epochs')}",
            "n": report["n"], "clean": report["clean"], "attack": report["label"], "robust": report["robust"],
            "autoattack": autoattack[-1]["accuracy"] if autoattack else None,
            "autoattack_n": autoattack[-1].get("n") if autoattack else None,
            "autoattack_stage": autoattack[-1]["name"] if autoattack else None,
            "ood": ood["accuracy"] if ood else None, "ood_set": ood["name"] if ood else None,
            "train_s": run["train_s"] if "train_s" in run else training_seconds(folder),
            "sanity": report.get("sanity", {}).get("verdict"),
            "sanity_not_run": sum(c.get("ran") is False for c in report.get("sanity", {}).get("checks", []))}


def suspicious(row: dict) -> bool:
    """Whether the report's gradient-masking checks failed (reports of `--suite none` ran none)."""
    return bool(row["sanity"]) and row["sanity"].startswith("suspicious")


def _percent(value) -> str:
    return "–" if value is None or value != value else f"{100 * value:.2f}"  # (NaN != NaN)


def table(rows: list[dict]) -> str:
    """A markdown table, then a line for each way in which the reports are not alike."""
    lines = ["| run | model | method | epoch | images | clean | attack | AutoAttack | OOD mean | masking checks "
             "| training |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        aa = _percent(r["autoattack"]) + (f" ({r['autoattack_n']})" if r["autoattack_n"] not in (None, r["n"]) else "")
        seconds = r["train_s"]
        train = "–" if seconds is None else f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
        checks = "–" if not r["sanity"] else "**suspicious**" if suspicious(r) else "pass"
        checks += f", {r['sanity_not_run']} not run" if r["sanity"] and r.get("sanity_not_run") else ""
        lines.append(f"| {r['name']} | {r['model'] or '–'} | {r['method'] or '–'} | {r['epoch'] or '–'} | {r['n']} | "
                     f"{_percent(r['clean'])} | {_percent(r['robust'])} | {aa} | {_percent(r['ood'])} | {checks} | "
                     f"{train} |")
    attacks = sorted({r["attack"] for r in rows})
    lines.append("")
    if flagged := [r for r in rows if suspicious(r)]:
        lines.append("gradient masking suspected, so their robust figures may overstate robustness: " + "; ".join(
            f"{r['name']} ({r['sanity']})" for r in flagged))
    if len({r.get("dataset") for r in rows}) > 1:
        lines.append("the reports are of different datasets, so their figures do not compare: " + "; ".join(
            f"{r['name']}: {r.get('dataset')}" for r in rows))
    lines.append(f"attack: {attacks[0]}" if len(attacks) == 1 else
                 "the reports ran different attacks, so that column does not compare: " + "; ".join(
                     f"{r['name']}: {r['attack']}" for r in rows))
    if len({r["ood_set"] for r in rows if r.get("ood_set")}) > 1:  # generated against published, say
        lines.append("the reports' OOD means are over different corruption sets, so that column does not compare: "
                     + "; ".join(f"{r['name']}: {r['ood_set']}" for r in rows if r.get("ood_set")))
    if len({r["n"] for r in rows}) > 1 or len({r["autoattack_n"] for r in rows if r["autoattack_n"]}) > 1:
        lines.append("the reports measured different numbers of images: compare with their sampling error in mind")
    stages = {r["autoattack_stage"] for r in rows if r["autoattack_stage"]}
    if any("off-protocol" in s for s in stages):
        lines.append("AutoAttack ran with a lowered budget (off-protocol) in some reports")
    return "\n".join(lines)


def plot(rows: list[dict], path) -> str:
    """Clean against robust accuracy, one point per run: AutoAttack where every report has it, else the attack of
    the reports. Returns the robust measure plotted."""
    from matplotlib.figure import Figure  # not pyplot: see evaluate/report.py

    key = "autoattack" if all(r["autoattack"] is not None for r in rows) else "robust"
    measure = "AutoAttack" if key == "autoattack" else (rows[0]["attack"] if len({r["attack"] for r in rows}) == 1
                                                      else "each report's attack")
    if key == "autoattack" and any(r["autoattack_n"] != r["n"] for r in rows):  # clean on more images than AutoAttack
        counts = sorted({r["autoattack_n"] for r in rows})
        measure += f" on the first {counts[0]} images" if len(counts) == 1 else " on fewer images than clean"
    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.subplots()
    # A legend rather than labels beside the points: runs often land within a few tenths of a point.
    for r in rows:
        flagged = suspicious(r)
        ax.scatter(100 * r["clean"], 100 * r[key], s=50, marker="x" if flagged else "o",
                   label=r["name"] + (" (masking suspected)" if flagged else ""))
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False)
    ax.set_xlabel("clean accuracy (%)")
    ax.set_ylabel(f"robust accuracy (%), {measure}")
    ax.set_title(f"{len(rows)} runs, clean against robust accuracy")
    ax.grid(alpha=0.3)
    ax.margins(0.15)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    return measure


def distinct_names(rows: list[dict], folders: list[Path]) -> list[dict]:
    """Rows whose names collide (runs/standard beside runs/pgd/standard) are named by more of their folder's path."""
    for depth in range(2, 6):
        names = [r["name"] for r in rows]
        clash = {n for n in names if names.count(n) > 1}
        if not clash:
            break
        for r, folder in zip(rows, folders):
            if r["name"] in clash:
                r["name"] = "/".join(folder.resolve().parts[-depth:])
    return rows


def cmd_summary(args) -> int:
    reports = [read_report(where) for where in args.runs]
    rows = distinct_names([summarize(*r) for r in reports], [folder for _, _, folder in reports])
    measure = None
    if args.plot is not None and not Path(args.plot).suffix:  # matplotlib wrote FILE.png; "plot: FILE" was said
        raise RobustlabError(f"--plot {args.plot!r} names no file with a format; give one such as summary.png, .pdf or "
                             ".svg")
    if args.plot:
        output_dir(Path(args.plot).parent, "--plot")  # a file on the path said only "--plot a/b.png: File exists"
        try:
            measure = plot(rows, args.plot)
        except (OSError, ValueError) as exc:  # no folder can be made there; a format matplotlib does not write
            raise RobustlabError(f"--plot {args.plot}: {getattr(exc, 'strerror', None) or exc}") from None
    if args.json:
        print(json.dumps(rows))
        return 0
    print(table(rows))
    if measure:
        print(f"plot: {args.plot} (robust accuracy: {measure})")
    return 0


def add_parser(sub):
    s = sub.add_parser("summary", help="several runs' evaluation reports side by side: a table and a plot")
    s.add_argument("runs", nargs="+", metavar="RUN",
                   help="run directory or evaluation folder holding report.json (from robustlab eval), or the file")
    s.add_argument("--plot", metavar="FILE", help="also draw clean against robust accuracy to FILE (.png, .pdf, .svg)")
    s.add_argument("--json", action="store_true", help="print the rows as JSON instead of the table")
