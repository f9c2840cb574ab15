"""Checkpoints without pickle: safetensors tensors plus JSON metadata.

The metadata lives inside the safetensors header (so one file is self-contained) and beside it as a
`.json` file for people to read. Both are written to a temporary file and renamed, so a run killed
mid-write leaves the previous checkpoint intact; the twin is written first, so that the checkpoint is the commit.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import platform
import time
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from robustlab import provenance
from robustlab.errors import RobustlabError

FORMAT = "robustlab-checkpoint/1"


def versions() -> dict:
    from robustlab import __version__
    return {"robustlab": __version__, "torch": torch.__version__, "python": platform.python_version()}


_UMASK = os.umask(0o022)  # read once (os.umask can only be read by setting it), then put back
os.umask(_UMASK)


def shareable(path) -> None:
    """Give a file written through a temporary file the mode an ordinary new file gets (mkstemp and safetensors
    make owner-only files)."""
    os.chmod(path, 0o666 & ~_UMASK)


def atomic_write(path: Path, write):
    """`write(tmp)` writes a file beside `path`, which then replaces `path` in one step: a killed process never
    leaves half a file, and a failed write (a full disk) leaves the previous one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        shareable(tmp)
        with open(tmp, "rb") as f:  # on disk before the rename, so that a power cut cannot leave an empty file
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, SafetensorError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
        kept = "; the previous file is kept" if path.exists() else ""
        raise RobustlabError(f"cannot write {path} ({reason}){kept}") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path, text: str) -> None:
    """`text` in `path`, through `atomic_write`: a run killed (or a disk full) while writing leaves the previous
    file, not half of one."""
    atomic_write(Path(path), lambda p: p.write_text(text))


def write_json(path, obj, **dumps_options) -> None:
    """`obj` as indented JSON in `path`, written as `write_text` does."""
    write_text(path, json.dumps(obj, indent=1, **dumps_options) + "\n")


def remove_stale_temporaries(folder, names=None, *, shared: bool = False) -> None:
    """The temporary files of `atomic_write` that a killed process left in `folder` (a SIGKILL skips its cleanup),
    each as large as the file it was to replace: those for the files `names`, else for any file; never this
    process's own.
    shared: other processes may be writing in `folder` now (a cache): a temporary goes only when the process it
    names runs no more on this machine and it is over an hour old (the folder may be on a disk that other
    machines, with their own process ids, write to)."""
    patterns = [f".{glob.escape(name)}.tmp[0-9]*" for name in names] if names else [".*.tmp[0-9]*"]
    own = f".tmp{os.getpid()}"
    for pattern in patterns:
        for stale in Path(folder).glob(pattern):
            if stale.name.endswith(own):
                continue
            if shared:
                try:
                    pid = int(stale.name.rsplit(".tmp", 1)[1])
                    old = time.time() - stale.stat().st_mtime > 3600
                except (ValueError, FileNotFoundError):  # not atomic_write's name; or its writer renamed it meanwhile
                    continue
                if not old or _process_runs(pid):
                    continue
            stale.unlink(missing_ok=True)


def _process_runs(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) would end the process on Windows: keep the file
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # another user's process
        return True
    return True


def save(path, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": FORMAT, "versions": versions(), **provenance.record(), **metadata}
    text = json.dumps(metadata, indent=1, sort_keys=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    # The .json twin first, the checkpoint itself last: a kill between them leaves the previous checkpoint, whose
    # work a resume repeats, writing both again; the other way round a kill after a run's last epoch left a twin
    # one epoch behind its checkpoint for good (the resumed run had nothing left to write)
    write_text(path.with_suffix(".json"), text + "\n")
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata={"robustlab": text}))


def read_metadata(path) -> dict:
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise RobustlabError(f"{path} is not a readable safetensors checkpoint ({str(exc).splitlines()[0]})") from None
    if "robustlab" not in header:
        raise RobustlabError(f"{path} is a safetensors file but not a robustlab checkpoint (no robustlab metadata)")
    try:
        meta = json.loads(header["robustlab"])
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict):
        raise RobustlabError(f"{path}: its robustlab metadata is not a JSON object; the file is damaged")
    if meta.get("format") != FORMAT:
        raise RobustlabError(f"{path} has checkpoint format {meta.get('format')!r}; this robustlab reads {FORMAT}")
    return meta


def load(path) -> tuple[dict[str, torch.Tensor], dict]:
    meta = read_metadata(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise RobustlabError(f"{path} is corrupted ({str(exc).splitlines()[0]})") from None
    return tensors, meta


def prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}{k}": v for k, v in state.items()}


def unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer's state into tensors (for safetensors) and JSON-able hyper-parameters."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in state["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], info: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(info["scalars"].items()):
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})


# -- a run's per-epoch metrics: RUN/metrics.jsonl, one JSON object per epoch -----------------------
def read_metrics(run) -> list[dict]:
    """The rows of RUN/metrics.jsonl; a last line cut short (the run was killed while appending it) is left out,
    and `truncate_metrics` restores it from the checkpoint when the run resumes."""
    path = Path(run) / "metrics.jsonl"
    lines = [l for l in path.read_text().splitlines() if l] if path.exists() else []
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise RobustlabError(f"{path}, line {i + 1}, is not JSON; it was edited or damaged") from None
    return rows


def append_metrics(run, row: dict) -> None:
    with open(Path(run) / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def truncate_metrics(run, last_epoch: int, last_row: dict) -> None:
    """On resume from the checkpoint of `last_epoch`, whose metrics are `last_row`: drop the lines of later epochs
    (the resumed run writes them again) and put back `last_row`, which a kill between the checkpoint and its line
    may have lost or cut short."""
    rows = [r for r in read_metrics(run) if r["epoch"] < last_epoch] + [last_row]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    write_text(Path(run) / "metrics.jsonl", text)  # a kill here loses no history


def weights_digest(model) -> str:
    """A short fingerprint of a model's state: what an AutoAttack state, a RiFT fine-tuning run, α curve or cached
    test result belongs to."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())  # raw bytes: numpy has no bf16
    return h.hexdigest()[:16]
