"""Runs as users see them: build everything from names, and load a trained model back."""
from __future__ import annotations

import inspect
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch

from robustlab import checkpoint, distributed
from robustlab.allocator import keep_freed_memory
from robustlab.attacks import pgd
from robustlab.data import DATASETS, LARGE_DATASETS, DatasetInfo, Splits, load_dataset
from robustlab.errors import RobustlabError, check_choice, check_integer, output_dir
from robustlab.models import MODELS, build_model, fast_memory_format
from robustlab.protocol import check_eps, step_for, threat_defaults
from robustlab.training.registry import METHODS
from robustlab.training.trainer import TrainConfig, Trainer


def refuse_text_run(meta: dict):
    if meta.get("task") == "text":
        raise RobustlabError(f"this is a text run ({meta['dataset']['name']}): RiFT, MRC and the image attacks need an "
                             "image run; `robustlab eval` evaluates text runs")


MODEL_META = {"model": ("name",), "dataset": ("input_shape", "num_classes", "mean", "std")}


def check_model_meta(meta: dict, source="the checkpoint") -> dict:
    """`meta` if it describes a model; a file that holds none (an AutoAttack state, RiFT's adversarial set) or lacks
    a field is a one-line error naming `source`."""
    refuse_text_run(meta)
    missing = [f"{part}.{key}" for part, keys in MODEL_META.items() for key in keys
               if not isinstance(meta.get(part), dict) or key not in meta[part]]
    if missing:
        kind = f" (it holds {meta['kind']!r})" if meta.get("kind") else ""
        raise RobustlabError(f"{source} is not a robustlab model checkpoint{kind}: its metadata lacks {', '.join(missing)}")
    return meta


def model_from_meta(meta: dict, source="the checkpoint") -> torch.nn.Module:
    """The model a checkpoint's metadata describes, untrained."""
    info = check_model_meta(meta, source)["dataset"]
    try:
        return build_model(meta["model"]["name"], info["input_shape"], info["num_classes"],
                           info["mean"], info["std"], **meta["model"].get("kwargs", {}))
    except RobustlabError as exc:
        raise RobustlabError(f"{source}: {exc}") from None
    except (TypeError, ValueError) as exc:  # a field of the wrong type: num_classes "ten", mean "x"
        raise RobustlabError(f"{source}: its metadata describes no model that can be built ({exc}); the file is "
                             "damaged") from None


def dataset_meta(data: Splits, data_dir=None, options=None) -> dict:
    """How a checkpoint records its data: the dataset's info, the split (seed 0 and the validation size) and where
    the files were read, with their folder options, so that `run_dataset` reads the same images again."""
    return {**asdict(data.info), "split_seed": 0, "val_size": len(data.val),
            "data_dir": str(Path(data_dir).expanduser().resolve()) if data_dir else None, "options": options or {}}


def resolve_checkpoint(path, which: str | None = None) -> Path:
    """The checkpoint file of a run directory (`which`: best, the default, or last) or the file `path` itself."""
    path = Path(path)
    if which not in (None, "best", "last"):
        raise RobustlabError(f"unknown checkpoint {which!r}; allowed: best, last (a kept epoch: pass its file, "
                             f"RUN/epoch-NNN.safetensors, as RUN)")
    if path.is_dir():
        if (which or "best") == "best":
            for name in ("best.safetensors", "last.safetensors"):
                if (path / name).exists():
                    return path / name
            raise RobustlabError(f"{path} holds no checkpoint (looked for best.safetensors and last.safetensors); "
                                 f"train one with `robustlab train --out {path}`")
        if (path / "last.safetensors").exists():
            return path / "last.safetensors"
        kept = " (a RiFT result keeps best.safetensors only)" if (path / "best.safetensors").exists() else ""
        raise RobustlabError(f"{path} has no last.safetensors{kept}; drop --checkpoint last to evaluate its best")
    if not path.exists():
        raise RobustlabError(f"no run directory or checkpoint at {path}")
    if which is not None:  # it would be ignored: the file is the checkpoint
        raise RobustlabError(f"--checkpoint {which}: {path} is a checkpoint file; pass its run directory to choose "
                             "best or last, or drop --checkpoint")
    return path


def load_model(path, which: str | None = None) -> torch.nn.Module:
    """Rebuild a model from a robustlab checkpoint; returns it in eval mode, on the CPU, in fp32, in the memory layout
    that `robustlab eval` attacks it in (channels_last where that is safe: 1.6× faster PGD on cnn-small here)."""
    file = resolve_checkpoint(path, which)
    tensors, meta = checkpoint.load(file)
    if fields := [k for k in ("model", "dataset", "method", "config", "metrics") if not isinstance(meta.get(k, {}), dict)]:
        # else an AttributeError wherever the field is first read, for `eval` after its attacks had run
        raise RobustlabError(f"{file}: its metadata field{'s' if len(fields) > 1 else ''} {', '.join(fields)} "
                             f"{'are' if len(fields) > 1 else 'is'} not a JSON object; the file is damaged")
    damaged = [k for k, v in tensors.items() if k.startswith("model.") and v.is_floating_point() and not v.isfinite().all()]
    if damaged:  # else every attack "measures" such a model: NaN logits read as class 0, a plausible 6% accuracy
        raise RobustlabError(f"{file}: {', '.join(damaged[:3])}{f' and {len(damaged) - 3} more' if len(damaged) > 3 else ''}"
                             " hold NaN or infinite values (a diverged run or a damaged file)")
    if meta.get("task") == "text":  # a text run carries its vocabulary; its own loader rebuilds both
        from robustlab.text.training import load_text_model
        return load_text_model(file)
    model = model_from_meta(meta, file)
    try:
        model.load_state_dict(checkpoint.unprefixed("model.", tensors))
    except RuntimeError as exc:  # its first line only names the module class; the next says which keys
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = "; ".join(lines[1:]) or lines[0]
        detail = detail if len(detail) <= 300 else detail[:297] + "..."
        raise RobustlabError(f"{file}: weights do not fit model {meta['model']['name']!r} ({detail})") from None
    model.eval().to(memory_format=fast_memory_format(model))
    model.checkpoint_meta = meta
    return model


def run_dataset(meta: dict, data_dir=None) -> Splits:
    """The dataset a run was trained on, split as it was: from `data_dir`, else the directory the run recorded
    (with its folder options: image size, grayscale), else the dataset's usual places."""
    info = meta["dataset"]
    refuse_text_run(meta)
    if data_dir is None and info.get("data_dir") and not Path(info["data_dir"]).exists():  # else "--dataset folder: …"
        raise RobustlabError(f"the run's data folder {info['data_dir']} is gone; point --data-dir at its data")
    data = load_dataset(info["name"], data_dir=data_dir or info.get("data_dir"), val_size=info.get("val_size"),
                        seed=info.get("split_seed", 0), **info.get("options", {}))
    # Other data in the run's format: a folder of other classes was measured without a word, one of more classes
    # failed in the attack's label check, after the clean pass.
    for what in ("class_names", "input_shape"):
        found, trained = list(getattr(data.info, what)), info.get(what)
        if trained is not None and found != list(trained):
            shown = [", ".join(map(str, v[:5])) + (", …" if len(v) > 5 else "") for v in (found, trained)]
            raise RobustlabError(f"the data read has {what.replace('_', ' ')} ({shown[0]}) but the run was trained on "
                                 f"({shown[1]}); point --data-dir at the run's own data")
    return data


THREAT_KEYS = ("eps", "norm", "steps", "step_size")


def method_options(cls) -> list[str]:
    """The keyword options a method class takes (its hyper-parameters)."""
    return [n for n, p in inspect.signature(cls).parameters.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def unknown_options(cls, given) -> list[str]:
    """The options among `given` that method class `cls` does not take; a clean-training method has no threat model,
    so it takes (and ignores) the threat options."""
    return sorted(set(given) - set(method_options(cls)) - (set() if cls.adversarial else set(THREAT_KEYS)))


def make_method(name: str, dataset: str, norm: str, **overrides):
    """A method with the protocol's training threat model for `dataset`, overridable per field.

    Only the fields in the method's `protocol_fields` come from the protocol; the others keep the
    method's own (paper) defaults, e.g. Fast-AT's step 1.25·ε. An option the method does not take is
    an error, except the threat options for clean-training methods (which have none to set).
    """
    check_choice("method", name, METHODS)
    cls = METHODS[name]
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if not cls.adversarial:  # a clean-training method has no threat model to set
        overrides = {k: v for k, v in overrides.items() if k not in THREAT_KEYS}
    if unknown := unknown_options(cls, overrides):
        raise RobustlabError(f"method {name} takes no option {', '.join(unknown)}; its options: "
                             f"{', '.join(method_options(cls))}")
    if not cls.adversarial:
        return cls(**overrides)
    check_eps(overrides.get("eps"), overrides.get("norm", norm), "eps")  # 25 meaning 25/255 trained at ε = 25
    if "steps" in overrides:  # step_for divides by it: 0 was a ZeroDivisionError, "abc" a TypeError
        check_integer("steps", overrides["steps"])
    budget = threat_defaults(dataset, norm).train
    # A changed ε or step count changes the step too (`step_for`): the protocol's 0.025 is for 10 steps at ε = 0.1.
    protocol = {"eps": budget.eps, "norm": norm, "steps": budget.steps,
                "step_size": step_for(budget, overrides.get("eps"), overrides.get("steps"))}
    params = {k: protocol[k] for k in cls.protocol_fields}
    return cls(**{**params, **overrides})


def validation_attack(method, dataset: str, norm: str):
    """The per-epoch robust check: the method's own threat model (or the protocol's), PGD from a random start.

    A method's own PGD (steps and step size) is reused when it has at least 10 steps; one-step and
    YOPO-style methods are checked with PGD-10 of step 2.5·ε/10.
    """
    budget = threat_defaults(dataset, norm).train
    eps = getattr(method, "eps", budget.eps)
    steps = getattr(method, "steps", 0)
    step = getattr(method, "step_size", budget.step_size)
    return partial(pgd, eps=eps, norm=getattr(method, "norm", norm), steps=max(steps, 10),
                   step_size=step if steps >= 10 else 2.5 * eps / 10)


def mark_started(out):
    """A placeholder config.json, written before the run reads its data: a run killed while starting is then one
    that `--resume` starts afresh, as one killed in its first epoch (a folder without it is refused: a mistyped
    --out). The Trainer replaces it with the run's own."""
    out = Path(out)
    if distributed.is_main() and not (out / "config.json").exists():
        output_dir(out)
        checkpoint.write_json(out / "config.json", {"status": "starting"})


def build_trainer(*, dataset: str, model: str, method: str, out, norm: str = "linf", data_dir=None,
                  download: bool = False, config: TrainConfig | None = None, model_kwargs=None,
                  method_kwargs=None, show_progress=None, data_options=None) -> Trainer:
    """data_options: load_dataset's image_size and grayscale (the folder dataset), recorded in the run's metadata
    with data_dir so that `robustlab eval RUN` reads the same data without repeating them."""
    config = config or TrainConfig()
    config.validate()
    device = distributed.init(config.device)  # joins the torchrun group, if launched by torchrun
    # names first: a mistyped one left a run folder behind
    check_choice("dataset", dataset, (*DATASETS, *LARGE_DATASETS))
    check_choice("model", model, MODELS)
    m = make_method(method, dataset, norm, **(method_kwargs or {}))
    mark_started(out)
    data_options = {k: v for k, v in (data_options or {}).items() if v}
    data = load_dataset(dataset, data_dir=data_dir, download=download, seed=0, **data_options)
    if config.threads:
        torch.set_num_threads(config.threads)
    keep_freed_memory()
    torch.manual_seed(config.seed)
    info: DatasetInfo = data.info
    net = build_model(model, info.input_shape, info.num_classes, info.mean, info.std, **(model_kwargs or {}))
    run_meta = {"model": {"name": model, "kwargs": model_kwargs or {}},
                "dataset": dataset_meta(data, data_dir, data_options)}
    return Trainer(net, m, data, config, out, run_meta, val_attack=validation_attack(m, dataset, norm),
                   device=device, show_progress=show_progress)
