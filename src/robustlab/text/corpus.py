"""An offline text-classification corpus: Debian package descriptions labelled by their Section.

No text data set can be downloaded where robustlab is developed, but every Debian machine has a real,
human-written corpus: the package lists. Built as follows (deterministic for a given package list):

1. `apt-cache dumpavail` (run `apt-get update` first on a fresh machine) gives one stanza per package
   version. An example is the Description (its one-line summary, plus the long description when the
   lists carry it), whitespace-normalised; its label is the Section without its archive area
   (`contrib/games` -> `games`).
2. De-duplication on the lower-cased text: a text that occurs under one section is kept once; a text
   that occurs under several sections is dropped as ambiguous.
3. The `top` most frequent sections are kept (default 10); label ids follow the section names'
   alphabetical order.
4. Fixed splits by a hash of the text: sha256 mod 10 = 0 is test, 1 is validation, the rest training.
   A text keeps its split when the package lists change, so rebuilt corpora stay comparable. Within a
   split the rows are ordered by that hash, so the first n of them are a fair sample of all sections.

The result is cached as a TSV (split, section, text), by default `~/.cache/robustlab/debian-packages.tsv`,
with a `.json` beside it recording the counts and the file's sha256. Build or rebuild it with
`python -m robustlab.text.corpus [--out FILE] [--top N]`; `load_text_dataset("debian-packages")`
builds it on first use.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

from robustlab import checkpoint
from robustlab.errors import RobustlabError

CORPUS_FILE = "debian-packages.tsv"
DEFAULT_DIR = "~/.cache/robustlab"
SPLITS = ("train", "val", "test")


def stanzas(text: str):
    """Yield each package stanza of a Debian control-format text as {field: value}; continuation
    lines join the value with newlines."""
    record, key = {}, None
    for line in text.splitlines():
        if not line.strip():
            if record:
                yield record
            record, key = {}, None
        elif line[0] in " \t" and key:
            record[key] += "\n" + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            record[key] = value.strip()
    if record:
        yield record


def description_text(description: str) -> str:
    """Summary and long description as one line ("." lines are paragraph breaks in control files)."""
    return " ".join(w for line in description.splitlines() if line != "." for w in line.split())


def _hash(text: str) -> str:
    return hashlib.sha256(text.lower().encode()).hexdigest()


def split_of(text: str) -> str:
    bucket = int(_hash(text)[:8], 16) % 10
    return "test" if bucket == 0 else "val" if bucket == 1 else "train"


def corpus_rows(package_lists: str, top: int = 10) -> list[tuple[str, str, str]]:
    """(split, section, text) rows from `apt-cache dumpavail` output, in a fixed order that mixes the
    sections (by split, then by the text's hash), so that the first n rows are a fair sample."""
    sections: dict[str, set] = {}
    texts: dict[str, str] = {}
    for st in stanzas(package_lists):
        if "Description" not in st or "Section" not in st:
            continue
        text = description_text(st["Description"])
        key = text.lower()
        if text:
            texts.setdefault(key, text)
            sections.setdefault(key, set()).add(st["Section"].rsplit("/", 1)[-1])
    unique = {key: s.pop() for key, s in sections.items() if len(s) == 1}
    counts = Counter(unique.values())
    keep = {s for s, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]}
    rows = [(split_of(texts[k]), sec, texts[k]) for k, sec in unique.items() if sec in keep]
    return sorted(rows, key=lambda r: (r[0], _hash(r[2])))


def _dumpavail() -> str:
    if shutil.which("apt-cache") is None:
        raise RobustlabError("the Debian corpus is built from `apt-cache dumpavail`, and apt-cache is not installed; "
                             "copy a built debian-packages.tsv into --data-dir instead")
    out = subprocess.run(["apt-cache", "dumpavail"], capture_output=True, text=True).stdout
    if "Package:" not in out:
        raise RobustlabError("`apt-cache dumpavail` listed no packages; run `apt-get update` first")
    return out


def build_corpus(path=None, top: int = 10, package_lists: str | None = None) -> Path:
    """Build the corpus TSV at `path` (default: the user cache), atomically; returns its path."""
    if isinstance(top, bool) or not isinstance(top, int) or top < 2:  # -3 sliced all but three sections away
        raise RobustlabError(f"top must be an integer >= 2 (a classifier needs two sections), got {top!r}")
    path = Path(path or Path(DEFAULT_DIR) / CORPUS_FILE).expanduser()
    rows = corpus_rows(package_lists if package_lists is not None else _dumpavail(), top)
    if not rows:
        raise RobustlabError("the package lists gave no labelled descriptions")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text("split\tsection\ttext\n" + "".join(f"{s}\t{sec}\t{t}\n" for s, sec, t in rows), encoding="utf-8")
    os.replace(tmp, path)
    stats = {"examples": len(rows), "top": top,
             "splits": dict(Counter(r[0] for r in rows)), "sections": dict(sorted(Counter(r[1] for r in rows).items())),
             "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "source": "apt-cache dumpavail"}
    checkpoint.write_json(path.with_suffix(".json"), stats)
    return path


def load_corpus(data_dir=None) -> tuple[dict, tuple]:
    """{split: (texts, labels)} and the class names from the corpus in `data_dir` (or the user cache),
    building it there first if it is missing. A `data_dir` given must exist: a mistyped one was made, and the
    corpus built in it, without a word."""
    folder = Path(data_dir or DEFAULT_DIR).expanduser()
    path = folder if folder.suffix == ".tsv" else folder / CORPUS_FILE
    if data_dir is not None and not path.parent.is_dir():
        raise RobustlabError(f"data folder {path.parent} does not exist; give an existing folder (the corpus is built "
                             f"in it once) or none for the user cache ({DEFAULT_DIR})")
    if not path.exists():
        print(f"building the Debian package-description corpus at {path} (once)", file=sys.stderr)
        build_corpus(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines or lines[0] != "split\tsection\ttext":
        raise RobustlabError(f"{path} is not a robustlab corpus file (expected the header split<TAB>section<TAB>text)")
    rows = []
    for n, line in enumerate(lines[1:], 2):
        row = line.split("\t", 2)
        if line and (len(row) != 3 or row[0] not in SPLITS):  # a truncated or edited copy: not a traceback below
            raise RobustlabError(f"{path}, line {n}: expected split<TAB>section<TAB>text with split one of "
                                 f"{', '.join(SPLITS)}")
        rows += [row] if line else []
    classes = tuple(sorted({r[1] for r in rows}))
    out = {s: ([], []) for s in SPLITS}
    for split, section, text in rows:
        out[split][0].append(text)
        out[split][1].append(classes.index(section))
    return out, classes


def main(argv=None) -> int:
    from robustlab.cli import OneLineParser
    p = OneLineParser(prog="python -m robustlab.text.corpus", description=__doc__.splitlines()[0])
    p.add_argument("--out", help=f"corpus file (default {DEFAULT_DIR}/{CORPUS_FILE})")
    p.add_argument("--top", type=int, default=10, help="keep the N most frequent sections (default 10)")
    args = p.parse_args(argv)
    try:
        path = build_corpus(args.out, args.top)
    except RobustlabError as exc:
        print(f"robustlab: error: {exc}", file=sys.stderr)
        return 2
    print(path.with_suffix(".json").read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
