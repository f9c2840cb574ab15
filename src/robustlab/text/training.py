"""Text runs through robustlab's one Trainer: the methods as `Method`s, token-id batches, validation by
clean accuracy and embedding-space PGD, checkpoints that carry the vocabulary, and the CLI glue.

`TextTrainer` overrides only the Trainer's batching and validation (image batches and pixel attacks do
not apply to token ids); the loop, schedule, EMA, checkpoints and resume are the Trainer's own.
"""
from __future__ import annotations

import math
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import torch

from robustlab import checkpoint, distributed
from robustlab.errors import RobustlabError, check_choice
from robustlab.evaluate.accuracy import fraction
from robustlab.models import eval_mode
from robustlab.progress import progress as progress_bar
from robustlab.text.adversary import DEFAULTS, EmbeddingAdversary, adversary_options, embedding_pgd
from robustlab.text.data import TEXT_DATASETS, TextSet, Vocab, load_text_dataset
from robustlab.text.models import TEXT_MODELS, build_text_model
from robustlab.training.methods import Method, Standard, StepResult
from robustlab.training.run import mark_started
from robustlab.training.trainer import TrainConfig, Trainer, epoch_seed

TEXT_METHODS = ("standard", *DEFAULTS)
# The embedding-space threat model for validation and the results: L2, ε per sentence (see docs/text.md).
EVAL_EPS, EVAL_STEPS, VAL_STEPS = 0.5, 20, 10


class EmbeddingAT(Method):
    """fgm, pgd, free-at or freelb (`EmbeddingAdversary`) as a Trainer method."""
    protocol_fields = ()

    def __init__(self, method: str, **options):
        self.name = method
        self.options = adversary_options(method, **options)

    def train_step(self, ctx, x, y):
        adversary = EmbeddingAdversary(ctx.module, self.name, generator=ctx.generator, check_labels=False,
                                       **self.options)  # the loader's labels index the classes: no sync per step

        def forward():
            with ctx.autocast():
                return ctx.model(x).float()

        loss, logits = adversary.step(forward, y, ctx.optimizer)
        return StepResult(loss, logits)

    def config(self) -> dict:
        return dict(self.options)


def make_text_method(name: str, **options) -> Method:
    """A text method by name; options left None take the method's defaults. Plain training ignores the
    adversarial options, as `make_method` does for images."""
    check_choice("text method", name, TEXT_METHODS)
    given = {k: v for k, v in options.items() if v is not None}
    return Standard() if name == "standard" else EmbeddingAT(name, **given)


def text_correct_mask(model, data: TextSet, *, attack=None, batch_size: int = 256, device="cpu",
                      forward=None, progress: str | None = None) -> torch.Tensor:
    """Per example: classified correctly, or with `attack(model, forward, y)` (e.g. `embedding_pgd`
    with its budget bound by functools.partial) still correct under it. `forward(model, ids)` gives
    logits (default `model(ids)`). Eval mode; the caller's mode is restored. Under torchrun each rank takes
    every W-th batch and the masks are gathered, as for images (the attack has no random start: exact)."""
    forward = forward or (lambda m, ids: m(ids))
    n = len(data)
    mask = torch.zeros(n, dtype=torch.uint8)
    batches = distributed.my_batches(math.ceil(n / batch_size))
    show = False if progress is None or not distributed.is_main() else None
    with eval_mode(model):
        for b in progress_bar(batches, desc=progress, unit="batch", show=show, leave=False):
            rows = torch.arange(b * batch_size, min((b + 1) * batch_size, n))
            batch = data.select(rows)
            ids, y = batch.ids.to(device), batch.labels.to(device)
            if attack is None:
                with torch.no_grad():
                    right = forward(model, ids).argmax(1) == y
            else:
                right = attack(model, lambda: forward(model, ids), y)
            mask[rows] = right.cpu().to(torch.uint8)
    return distributed.all_max(mask).bool()


def text_accuracy(model, data: TextSet, **kwargs) -> float:
    return fraction(text_correct_mask(model, data, **kwargs))


def pgd_attack(eps: float = EVAL_EPS, steps: int = EVAL_STEPS, norm: str = "l2"):
    """Embedding-space PGD as an `attack` for `text_accuracy`."""
    return partial(embedding_pgd, eps=eps, steps=steps, norm=norm)


class TextTrainer(Trainer):
    """The Trainer on token ids. `val_attack` is a text attack (`pgd_attack`)."""

    def batches(self, epoch: int):
        # The order depends on (seed, epoch) only, as for images; padding is trimmed per batch.
        g = torch.Generator().manual_seed(epoch_seed(self.config.seed, epoch, 0))
        order = torch.randperm(len(self.train_set), generator=g)
        for i in range(0, len(order), self.config.batch_size):
            batch = self.train_set.select(order[i:i + self.config.batch_size])
            yield batch.ids.to(self.device), batch.labels.to(self.device)

    def validate(self, epoch: int) -> dict:
        val = self.data.val
        if len(val) == 0:
            return {"val_clean": float("nan"), "val_robust": float("nan")}
        model = self.eval_model
        clean = text_accuracy(model, val, device=self.device)
        robust = clean if self.val_attack is None else text_accuracy(
            model, val.subset(min(self.config.val_n, len(val))), attack=self.val_attack, device=self.device)
        return {"val_clean": clean, "val_robust": robust}


def build_text_trainer(*, out, dataset: str = "debian-packages", model: str = "transformer", method: str = "freelb",
                       data_dir=None, config: TrainConfig | None = None, model_kwargs=None, method_kwargs=None,
                       max_len: int = 64, val_eps: float = EVAL_EPS, show_progress=None) -> TextTrainer:
    # Token ids are not images: no channels-last layout, no augmentation.
    config = replace(config or TrainConfig(), channels_last=False, augment="none")
    config.validate()
    device = distributed.init(config.device)
    check_choice("text dataset", dataset, TEXT_DATASETS)  # names first: a mistyped one left a run folder behind
    check_choice("text model", model, TEXT_MODELS)
    check_choice("text method", method, TEXT_METHODS)
    m = make_text_method(method, **(method_kwargs or {}))  # its options too: a refused one left a run folder behind
    mark_started(out)
    data = load_text_dataset(dataset, data_dir, max_len=max_len)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    model_kwargs = dict(model_kwargs or {})
    net = build_text_model(model, len(data.vocab), data.info.num_classes, pad_id=data.vocab.pad_id, **model_kwargs)
    run_meta = {"task": "text", "model": {"name": model, "kwargs": model_kwargs},
                "dataset": {**asdict(data.info), "val_size": len(data.val),
                            "data_dir": str(Path(data_dir).expanduser().resolve()) if data_dir else None},
                "vocab": data.vocab.tokens}
    return TextTrainer(net, m, data, config, out, run_meta, val_attack=pgd_attack(val_eps, VAL_STEPS),
                       device=device, show_progress=show_progress)


def load_text_model(path, which: str | None = None) -> torch.nn.Module:
    """A trained text model (eval mode, CPU) with `.vocab` (to encode new text) and `.checkpoint_meta`."""
    from robustlab.training.run import resolve_checkpoint
    file = resolve_checkpoint(path, which)
    tensors, meta = checkpoint.load(file)
    if meta.get("task") != "text":
        raise RobustlabError(f"{file} is not a text run; load it with robustlab.load_model")
    model = build_text_model(meta["model"]["name"], len(meta["vocab"]), meta["dataset"]["num_classes"],
                             **meta["model"].get("kwargs", {}))
    model.load_state_dict(checkpoint.unprefixed("model.", tensors))
    model.eval()
    model.vocab, model.checkpoint_meta = Vocab(meta["vocab"]), meta
    return model


TEXT_OPTIONS = ("eps", "steps", "step_size", "replays", "init_mag", "norm")


def text_trainer_from_args(args, config: TrainConfig) -> TextTrainer:
    """`robustlab train --task text`: the train command's options, with text defaults where the image
    ones do not apply (dataset debian-packages, model transformer, method freelb, norm l2)."""
    if args.backend != "torch":
        raise RobustlabError("--task text runs on the torch backend only")
    from robustlab.cli import METHOD_OPTIONS, check_clean_method_flags, flag
    image_only = {"--width": args.width, "--augment": args.augment not in (None, "none"),
                  "--image-size": args.image_size, "--grayscale": args.grayscale, "--download": args.download,
                  **{flag(k): getattr(args, k) is not None  # e.g. --beta
                     for k in METHOD_OPTIONS if k not in TEXT_OPTIONS}}
    if any(image_only.values()):  # each was once ignored without a word
        raise RobustlabError(f"{', '.join(k for k, v in image_only.items() if v)}: image options; they do not "
                             "apply to --task text")
    method = args.method or "freelb"
    check_choice("text method", method, TEXT_METHODS)
    check_clean_method_flags(method, method != "standard", args)
    options = {k: getattr(args, k, None) for k in TEXT_OPTIONS}
    takes = DEFAULTS.get(method, {})  # standard: none (validation is always L2 PGD at ε = 0.5)
    if unknown := [flag(k) for k, v in options.items() if v is not None and k not in takes]:
        raise RobustlabError(f"--method {method} takes no {', '.join(unknown)}; its options: "
                             f"{', '.join(flag(k) for k in takes) or 'none'}")
    if options["norm"] == "linf" and options["eps"] is None:  # as eval: the default would bound every coordinate
        raise RobustlabError(f"--norm linf needs --eps for a text run: the default ε = {takes['eps']} is an L2 radius "
                             "per sentence")
    return build_text_trainer(out=Path(args.out), dataset=args.dataset or "debian-packages",
                              model=args.model or "transformer", method=method,
                              data_dir=args.data_dir, config=config, method_kwargs=options)
