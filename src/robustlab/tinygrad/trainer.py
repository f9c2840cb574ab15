"""PGD adversarial training (and clean training) of tinygrad models, as robustlab's Trainer does it.

Same options (TrainConfig), same run directory (config.json, metrics.jsonl, best/last checkpoints),
same batches: the data order and augmentation come from the same seeded torch generator as the
PyTorch Trainer's, and the initial weights are the PyTorch twin's for the same seed, so the two
backends can be compared run for run: the MLP's runs differ by float rounding only, cnn-small's also where its
max-pool ties (see `models.maxpool2_nhwc`). What differs is the engine: the attack (PGD, input
gradients only), the forward/backward pass and tinygrad's SGD/Adam step form one TinyJit-captured
function per batch shape, which removes tinygrad's per-step graph work after the first batch.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from robustlab import checkpoint
from robustlab.data import AUGMENTATIONS, DATASETS, Splits, load_dataset
from robustlab.errors import RobustlabError, check_choice
from robustlab.progress import progress
from robustlab.tinygrad.backend import capture_first_call, require, set_threads
from robustlab.training.schedules import learning_rate
from robustlab.training.trainer import (TrainConfig, check_not_over_a_run, check_resumable, epoch_batches,
                                        epoch_line, epoch_seed, improves_on)

require()
from tinygrad import Context, Tensor, nn  # noqa: E402

from robustlab.tinygrad.attacks import pgd, pgd_steps, random_delta  # noqa: E402
from robustlab.tinygrad.checkpoint import backend_meta, model_tensors  # noqa: E402
from robustlab.tinygrad.evaluate import accuracy  # noqa: E402
from robustlab.tinygrad.models import MODELS, TinyModel, build_model  # noqa: E402
from robustlab.tinygrad.torch_twins import build_torch_model  # noqa: E402

METHODS = ("pgd-at", "standard")


def make_optimizer(config: TrainConfig, params: list[Tensor]):
    """tinygrad's SGD (momentum, coupled weight decay: as torch.optim.SGD) or Adam (weight decay added in the
    step, see TrainStep)."""
    if config.optimizer == "adam":
        return nn.optim.Adam(params, lr=config.lr)
    return nn.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def optimizer_state(opt) -> dict[str, Tensor]:
    """The optimizer's state tensors by name (momentum buffers; Adam's moments and β powers)."""
    state = {f"{i}.{name}": t for name in ("b", "m", "v") for i, t in enumerate(getattr(opt, name, []))}
    state.update({name: getattr(opt, name) for name in ("b1_t", "b2_t") if hasattr(opt, name)})
    return state


class TrainStep:
    """One training step of `method` (PGD-AT or clean) for a tinygrad model, captured by TinyJit.

    The attack, the forward/backward pass and the optimizer update form one function, captured
    once per batch shape; the learning rate lives in the optimizer's lr buffer, which set_lr
    overwrites in place so that the captured function reads the new value.
    """

    def __init__(self, model: TinyModel, method, config: TrainConfig):
        if method.name not in METHODS:
            raise RobustlabError(f"the tinygrad backend trains methods {', '.join(METHODS)}, not {method.name!r}")
        self.model, self.method, self.config = model, method, config
        self.params = model.parameters()
        self.optimizer = make_optimizer(config, self.params)
        self._jits: dict[tuple, object] = {}  # a TinyJit per batch shape

    def _step(self, x: Tensor, y: Tensor, delta: Tensor):
        """PGD examples (or x itself), then one optimizer step on their mean cross-entropy.

        Returns (loss, number of correct predictions) on the examples trained on.
        """
        m, cfg = self.method, self.config
        x_train = x
        if m.adversarial:
            with Context(TRAINING=0 if getattr(m, "attack_in_eval", True) else 1):
                start = (x + delta).clip(0, 1) if m.random_start else x
                x_train = pgd_steps(self.model, x, y, start, norm=m.norm, eps=m.eps, steps=m.steps,
                                    step_size=m.step_size, realize_each=False)
        with Context(TRAINING=1):
            logits = self.model(x_train.detach())
            loss = logits.sparse_categorical_crossentropy(y)
            grads = loss.gradient(*self.params)
            if cfg.optimizer == "adam" and cfg.weight_decay:
                # tinygrad's Adam has no weight decay and its AdamW decouples it: add weight_decay·w to the
                # gradient, as torch.optim.Adam does
                grads = [g + cfg.weight_decay * p.detach() for g, p in zip(grads, self.params)]
            for p, g in zip(self.params, grads):
                p.grad = g
            correct = (logits.argmax(1) == y).sum()
            Tensor.realize(loss, correct, *self.optimizer.schedule_step())
        self.optimizer.zero_grad()
        return loss, correct

    def __call__(self, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> tuple[float, int]:
        """One step on a numpy batch; the random start is drawn from `rng`. Returns (loss, correct)."""
        m = self.method
        start_random = m.adversarial and m.random_start
        delta = random_delta(x.shape, m.norm, m.eps, rng) if start_random else np.zeros_like(x)
        if x.shape not in self._jits:
            state = self.model.state_dict_tensors().values()
            self._jits[x.shape] = capture_first_call(self._step, [*state, *optimizer_state(self.optimizer).values(),
                                                                  self.optimizer.lr])
        jit = self._jits[x.shape]
        loss, correct = jit(Tensor(np.ascontiguousarray(x, np.float32)).realize(),
                            Tensor(y.astype(np.int32)).realize(), Tensor(delta).realize())
        return loss.item(), int(correct.item())

    def set_lr(self, lr: float) -> None:
        lr_t = self.optimizer.lr
        lr_t.assign(Tensor([lr], dtype=lr_t.dtype, device=lr_t.device)).realize()


class TinyTrainer:
    """Train a tinygrad `model` with PGD-AT or clean training, writing robustlab's run files to `out_dir`."""

    def __init__(self, model: TinyModel, method, data: Splits, config: TrainConfig, out_dir, run_meta: dict,
                 val_attack: dict | None = None, show_progress=None):
        config.validate()
        if config.precision != "fp32":
            raise RobustlabError(f"the tinygrad backend trains in fp32 only, got precision {config.precision!r}")
        if getattr(config, "ema", None):
            raise RobustlabError("the tinygrad backend keeps no weight EMA; drop --ema")
        self.model, self.method, self.data, self.config = model, method, data, config
        self.out, self.run_meta = Path(out_dir), run_meta
        self.val_attack, self.show_progress = val_attack, show_progress
        self.step = TrainStep(model, method, config)
        self.optimizer = self.step.optimizer
        self.train_set = data.train.subset(config.train_n) if config.train_n else data.train
        self.augment = check_choice("augmentation", config.augment or data.info.augment, AUGMENTATIONS)
        if "dataset" in run_meta:  # the augmentation that ran, as the PyTorch trainer records it
            self.run_meta = {**run_meta, "dataset": {**run_meta["dataset"], "augment": self.augment}}
        self.start_epoch, self.elapsed, self.epochs = 0, 0.0, config.epochs
        self.best, self.last_metrics = {"epoch": None, "val_robust": -1.0}, {}

    # -- epochs --------------------------------------------------------------------------------
    def batches(self, epoch: int):
        """The PyTorch Trainer's batches: same seeded order and augmentation, as numpy arrays."""
        for x, y in epoch_batches(self.train_set, self.config.batch_size, self.config.seed, epoch, self.augment):
            yield x.numpy(), y.numpy()

    def train_epoch(self, epoch: int) -> dict:
        cfg = self.config
        rng = np.random.default_rng(epoch_seed(cfg.seed, epoch, 2))
        steps = math.ceil(len(self.train_set) / cfg.batch_size)
        total_loss = total_correct = seen = 0
        bar = progress(self.batches(epoch), show=self.show_progress, total=steps, unit="batch", leave=False,
                       desc=f"epoch {epoch + 1}/{cfg.epochs}")
        start = time.perf_counter()
        for i, (x, y) in enumerate(bar):
            lr = learning_rate(cfg.schedule, cfg.lr, (epoch + i / steps) / cfg.epochs)
            self.step.set_lr(lr)
            loss, correct = self.step(x, y, rng)
            if not math.isfinite(loss):
                bar.close()
                kept = f"{self.out}/last.safetensors holds epoch {epoch}" if epoch else "no epoch was completed"
                raise RobustlabError(f"training diverged: the loss is {loss:.4g} at epoch {epoch + 1}, step {i + 1} "
                                     f"(lr {lr:.4g}); {kept}. Train again with a smaller --lr")
            total_loss += loss * len(y)
            total_correct += correct
            seen += len(y)
            if i % 10 == 0:
                bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{total_correct / seen:.1%}", lr=f"{lr:.4f}",
                                img_s=f"{seen / (time.perf_counter() - start):.0f}")
        bar.close()
        return {"train_loss": total_loss / seen, "train_acc": total_correct / seen,
                "train_images_per_s": seen / (time.perf_counter() - start)}

    def validate(self) -> dict:
        val = self.data.val
        if len(val) == 0:
            return {"val_clean": float("nan"), "val_robust": float("nan")}
        clean = accuracy(self.model, val, batch_size=500)
        subset = val.subset(min(self.config.val_n, len(val)))
        robust = clean if self.val_attack is None else accuracy(
            self.model, subset, attack=partial(pgd, **self.val_attack), batch_size=500, seed=1234)
        return {"val_clean": clean, "val_robust": robust}

    def fit(self) -> dict:
        check_not_over_a_run(self.out, self.start_epoch)
        self.out.mkdir(parents=True, exist_ok=True)
        checkpoint.write_json(self.out / "config.json", {
            **self.run_meta, "method": {"name": self.method.name, **self.method.config()},
            "config": asdict(self.config)})
        metrics = self.last_metrics  # a resumed run with nothing left to train reports its last epoch
        for epoch in range(self.start_epoch, self.config.epochs):
            start = time.perf_counter()
            train_metrics = self.train_epoch(epoch)
            epoch_s = time.perf_counter() - start
            self.elapsed += epoch_s
            val_metrics = self.validate()
            metrics = {"epoch": epoch, **train_metrics, **val_metrics, "epoch_s": round(epoch_s, 2),
                       "elapsed_s": round(self.elapsed, 2)}
            is_best = improves_on(self.best, val_metrics, self.method)
            if is_best:
                self.best = {"epoch": epoch, "val_robust": val_metrics["val_robust"], "val_clean": val_metrics["val_clean"]}
            stop = self.method.should_stop(metrics, self.best)
            if stop:
                metrics["stopped_early"] = stop
            self.save(epoch, metrics, is_best)
            checkpoint.append_metrics(self.out, metrics)
            tqdm.write(epoch_line(epoch, self.config.epochs, metrics, is_best, attacked=self.val_attack is not None,
                                  val_n=self.config.val_n, val_size=len(self.data.val)))
            if stop:
                tqdm.write(f"early stop after epoch {epoch + 1}: {stop}")
                break
        return metrics

    # -- checkpoints ---------------------------------------------------------------------------
    def _metadata(self, epoch: int, metrics: dict, kind: str) -> dict:
        return {**self.run_meta, "kind": kind, "epoch": epoch, "epochs_total": self.config.epochs, "metrics": metrics,
                "method": {"name": self.method.name, **self.method.config()},
                "config": asdict(self.config), "best": self.best, "elapsed_s": self.elapsed}

    def save(self, epoch: int, metrics: dict, is_best: bool):
        """best.safetensors: the model alone (loads as PyTorch too); last.safetensors: also the optimizer."""
        model = model_tensors(self.model)
        if is_best:
            checkpoint.save(self.out / "best.safetensors", model, self._metadata(epoch, metrics, "model"))
        if self.config.keep_every and (epoch + 1) % self.config.keep_every == 0:  # named, like the docs, from 1
            checkpoint.save(self.out / f"epoch-{epoch + 1:03d}.safetensors", model, self._metadata(epoch, metrics, "model"))
        opt = {f"optim.{k}": torch.from_numpy(v.numpy()) for k, v in optimizer_state(self.optimizer).items()}
        meta = self._metadata(epoch, metrics, "training-state")
        meta["optimizer"] = {"backend": "tinygrad", "name": self.config.optimizer}
        # last: once it is written the epoch is done, so the epoch's other files come first (as the PyTorch Trainer)
        checkpoint.save(self.out / "last.safetensors", {**model, **opt}, meta)

    def resume(self) -> bool:
        """Continue from out/last.safetensors when there is one (a run of this backend, method and settings)."""
        path = self.out / "last.safetensors"
        if not path.exists():
            return False
        tensors, meta = checkpoint.load(path)
        check_resumable(path, meta, "tinygrad", self.method, self.config, self.run_meta)
        self.model.load_state_dict(checkpoint.unprefixed("model.", tensors))
        for key, t in optimizer_state(self.optimizer).items():
            t.realize().assign(Tensor(tensors[f"optim.{key}"].numpy(), dtype=t.dtype, device=t.device)).realize()
        self.start_epoch, self.elapsed, self.best = meta["epoch"] + 1, meta["elapsed_s"], meta["best"]
        self.last_metrics = meta["metrics"]
        if meta["metrics"].get("stopped_early"):  # as the PyTorch Trainer: training on would undo the stop
            self.start_epoch = self.config.epochs
        checkpoint.truncate_metrics(self.out, meta["epoch"], meta["metrics"])
        return True


def build_trainer(*, dataset: str, model: str, method: str, out, norm: str = "linf", data_dir=None,
                  download: bool = False, config: TrainConfig | None = None, model_kwargs=None,
                  method_kwargs=None, show_progress=None) -> TinyTrainer:
    """robustlab.training.build_trainer's signature, for a tinygrad 'mlp' or 'cnn-small'."""
    from robustlab.training.run import dataset_meta, make_method, mark_started, validation_attack

    if method not in METHODS:  # before the data is read
        raise RobustlabError(f"the tinygrad backend trains methods {', '.join(METHODS)}, not {method!r}")
    config = config or TrainConfig()
    config.validate()
    check_choice("dataset", dataset, DATASETS)  # names first: a mistyped one left a run folder behind
    check_choice("tinygrad model", model, MODELS)
    mark_started(out)
    data = load_dataset(dataset, data_dir=data_dir, download=download, seed=0)
    set_threads(config.threads)
    if config.threads:
        torch.set_num_threads(config.threads)
    info = data.info
    net = build_model(model, info.input_shape, info.num_classes, info.mean, info.std, **(model_kwargs or {}))
    torch.manual_seed(config.seed)  # start from the PyTorch path's initial weights for this seed
    twin = build_torch_model(model, info.input_shape, info.num_classes, info.mean, info.std, **(model_kwargs or {}))
    net.load_state_dict(twin.state_dict())
    m = make_method(method, dataset, norm, **(method_kwargs or {}))
    val_attack = validation_attack(m, dataset, norm).keywords  # eps, norm, steps, step_size
    run_meta = {"model": {"name": model, "kwargs": model_kwargs or {}},
                "dataset": dataset_meta(data, data_dir), **backend_meta()}
    return TinyTrainer(net, m, data, config, out, run_meta, val_attack=val_attack, show_progress=show_progress)


def train(*, out, resume: bool = False, **kwargs) -> dict:
    """Build, optionally resume, and fit; returns {"run", "best", "last"} as `robustlab train` prints it.

    Keyword arguments are build_trainer's (dataset, model, method, norm, config, method_kwargs, ...).
    """
    trainer = build_trainer(out=out, **kwargs)
    if resume and not trainer.resume():
        raise RobustlabError(f"resume: {out} holds no last.safetensors to continue from")
    if not resume and (Path(out) / "last.safetensors").exists():
        raise RobustlabError(f"{out} already holds a run; resume it or choose another out directory")
    last = trainer.fit()
    return {"run": str(out), "best": trainer.best, "last": last}
