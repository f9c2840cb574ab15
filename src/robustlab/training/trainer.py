"""The one training loop. A method turns batches into losses; the Trainer does everything else:
batching and augmentation, learning-rate schedule, validation, metrics, checkpoints and resume.

Determinism: the data order, augmentation, attack random starts and torch's global RNG are seeded
from (seed, epoch) at the start of every epoch, so resuming from an epoch checkpoint replays exactly
the epochs an uninterrupted run would have trained, bit for bit on the same device and thread count (another
--threads or --device changes the order of floating-point sums: close, not identical).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Subset
from tqdm.auto import tqdm

from robustlab import checkpoint, distributed
from robustlab.data import ImageSet, Splits, augment_batch
from robustlab.data.augment import AUGMENTATIONS
from robustlab.data.folder import epoch_loader
from robustlab.errors import RobustlabError, check_choice
from robustlab.evaluate.accuracy import accuracy
from robustlab.models import fast_memory_format
from robustlab.progress import progress
from robustlab.training.methods import Method, StepContext
from robustlab.training.schedules import SCHEDULES, learning_rate


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "one-cycle"
    seed: int = 0
    precision: str = "fp32"               # fp32, bf16 or fp16 (the CLI's default "auto" resolves to one of these)
    channels_last: bool = True
    augment: str | None = None            # None: the dataset's default
    val_n: int = 1000                     # validation images for the per-epoch robust check
    train_n: int | None = None            # train on the first n training images (tests, quick runs)
    threads: int | None = None
    ema: float | None = None              # weight-EMA decay (e.g. 0.999); validation and best.safetensors use the EMA
    device: str = "cpu"                   # "cuda": each torchrun rank takes the GPU of its LOCAL_RANK
    sync_bn: bool = False                 # SyncBatchNorm across ranks (CUDA only); else each rank normalizes its part
    workers: int = 2                      # DataLoader processes decoding a streamed training set (folder, npy)
    keep_every: int | None = None         # also keep every N-th epoch's weights as epoch-NNN.safetensors
    extra: dict = field(default_factory=dict)

    def validate(self):
        check_choice("optimizer", self.optimizer, ("sgd", "adam"))
        check_choice("precision", self.precision, ("fp32", "bf16", "fp16"))
        check_choice("schedule", self.schedule, SCHEDULES)  # here, not at the first step: before any folder is made
        if self.augment is not None:
            check_choice("augment", self.augment, AUGMENTATIONS)
        check_choice("device", self.device.split(":")[0], ("cpu", "cuda"))
        if self.precision == "fp16" and self.device == "cpu":
            raise RobustlabError("fp16 autocast needs --device cuda; on a CPU use fp32 (or bf16 where the CPU has bf16 units)")
        if self.sync_bn and self.device == "cpu":
            raise RobustlabError("--sync-bn needs --device cuda: PyTorch's SyncBatchNorm does not run on CPUs")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) <= 0:
                raise RobustlabError(f"{name.replace('_', ' ')} must be > 0, got {getattr(self, name)}")
        if self.batch_size < (processes := distributed.planned_world_size()):
            raise RobustlabError(f"batch size {self.batch_size} is smaller than the {processes} torchrun processes, each "
                                 "of which trains on a share of every batch")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise RobustlabError(f"learning rate must be a finite number > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:  # at 1 or more the step grows without bound
            raise RobustlabError(f"momentum must be from 0 to below 1, got {self.momentum}")
        if self.workers < 0:
            raise RobustlabError(f"workers must be >= 0, got {self.workers}")
        if self.keep_every is not None and self.keep_every <= 0:
            raise RobustlabError(f"keep every must be > 0 epochs, got {self.keep_every}")
        if self.ema is not None and not 0 < self.ema < 1:
            raise RobustlabError(f"ema decay must be in (0, 1), got {self.ema}")


def epoch_seed(seed: int, epoch: int, stream: int) -> int:
    return (seed * 1_000_003 + epoch * 101 + stream) % (2**63)


def epoch_batches(train_set: ImageSet, batch_size: int, seed: int, epoch: int, augment: str):
    """One epoch of (x in [0, 1], y) CPU batches: the order and augmentation depend on (seed, epoch) only,
    so every backend and every resumed run sees the same batches."""
    g = torch.Generator().manual_seed(epoch_seed(seed, epoch, 0))
    order = torch.randperm(len(train_set), generator=g)
    for i in range(math.ceil(len(train_set) / batch_size)):
        idx = order[i * batch_size:(i + 1) * batch_size]
        x = train_set.images[idx].float().div_(255)
        if augment != "none":
            x = augment_batch(x, augment, g)
        yield x, train_set.labels[idx]


def loader_batches(train_set, batch_size: int, seed: int, epoch: int, augment: str, workers: int):
    """`epoch_batches` for a streamed Dataset: this rank's batches of `batch_size` from `epoch_loader`, whose
    sampler shards the data over ranks; each rank augments its own images from its own (seed, epoch) stream."""
    g = torch.Generator().manual_seed(epoch_seed(seed, epoch, 1000 * distributed.rank()))
    for x, y in epoch_loader(train_set, batch_size, seed, epoch, workers=workers):
        x = x.float().div_(255)
        if augment != "none":
            x = augment_batch(x, augment, g)
        yield x, y


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 autocast runs on units made for it: a CUDA GPU that supports bf16, or a CPU with
    AVX-512-BF16 / AMX (elsewhere oneDNN emulates bf16 and is several times slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """"auto" is bf16 where the device has bf16 units and fp32 elsewhere; other values are returned as given."""
    if precision != "auto":
        return precision
    kind = str(device).split(":")[0]  # an unknown device is TrainConfig.validate's to report
    return "bf16" if kind in ("cpu", "cuda") and fast_bf16(torch.device(kind)) else "fp32"


def autocast_for(precision: str, device: torch.device):
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return lambda: torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext


def make_optimizer(config: TrainConfig, params):
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


# Settings a resumed run may change: how it runs, not what it computes.
RESUMABLE_CHANGES = ("threads", "device", "workers", "keep_every")


def _data_and_model(run_meta: dict) -> dict:
    """What a resumed run must share with the run it continues besides its recipe: the model, the data (wherever
    its folder now is) and a text model's vocabulary."""
    dataset = {k: v for k, v in run_meta.get("dataset", {}).items() if k != "data_dir"}
    return {"task": run_meta.get("task"), **{f"model.{k}": v for k, v in run_meta.get("model", {}).items()},
            **{f"dataset.{k}": v for k, v in dataset.items()},
            "vocabulary": f"{len(run_meta['vocab'])} tokens, sha256 "
                          f"{hashlib.sha256(chr(0).join(run_meta['vocab']).encode()).hexdigest()[:12]}"
            if run_meta.get("vocab") else None}


def changed_settings(saved: dict, now: dict, names: dict | None = None) -> list[str]:
    """"key old → new" for each setting that differs (tuples and lists compare alike); `names` renames keys."""
    saved, now = json.loads(json.dumps(saved)), json.loads(json.dumps(now))
    return [f"{(names or {}).get(k, k)} {saved.get(k)!r} → {now.get(k)!r}" for k in sorted(set(saved) | set(now))
            if saved.get(k) != now.get(k)]


def check_resumable(path: Path, meta: dict, backend: str, method: Method, config: TrainConfig, run_meta=None):
    """A resumed run must be the run it continues: the same backend, method, settings, model and data (`run_meta`,
    when given). Changed options would silently mix two recipes (a new learning rate or epoch count also reshapes
    the schedule already half followed), another model fails to load, and other data of the same shape trains on."""
    if (kind := meta.get("kind")) != "training-state":  # e.g. best.safetensors copied over: no optimizer state
        what = "holds model weights only" if kind == "model" else f"is a {kind!r} file" if kind else "has no kind"
        raise RobustlabError(f"--resume: {path} {what}, not a training state (last.safetensors as training writes it)")
    saved_backend = meta.get("backend", "torch")
    if saved_backend != backend:
        raise RobustlabError(f"{path} was trained with the {saved_backend} backend; resume it with --backend "
                             f"{saved_backend}")
    if run_meta is not None and (was := meta.get("task") or "image") != (now := run_meta.get("task") or "image"):
        raise RobustlabError(f"{path} is a{'n' if was == 'image' else ''} {was} run; resume it with --task {was}, or "
                             f"start the {now} run with another --out")
    if meta.get("method", {}).get("name") != method.name:
        raise RobustlabError(f"{path} was trained with method {meta['method']['name']!r}, not {method.name!r}")
    saved = {**{f"method.{k}": v for k, v in meta["method"].items() if k not in method.resumable_changes},
             **{k: v for k, v in meta["config"].items() if k not in RESUMABLE_CHANGES}}
    now = {**{f"method.{k}": v for k, v in {"name": method.name, **method.config()}.items()
              if k not in method.resumable_changes},
           **{k: v for k, v in asdict(config).items() if k not in RESUMABLE_CHANGES}}
    if run_meta is not None:
        saved.update(_data_and_model(meta))
        now.update(_data_and_model(run_meta))
    if changed := changed_settings(saved, now):
        raise RobustlabError(f"--resume: {path} was trained with other settings ({'; '.join(changed)}); "
                             "resume with the original options, or start a new run with another --out")


def check_not_over_a_run(out: Path, start_epoch: int):
    """fit() from the first epoch into a folder that holds a run replaced its checkpoints and appended to its
    metrics without a word, from Python (the CLI refuses it before): `resume()` first continues it."""
    if start_epoch == 0 and (Path(out) / "last.safetensors").exists():
        raise RobustlabError(f"{out} already holds a run (last.safetensors); call resume() before fit() to continue "
                             "it, or choose another folder")


def improves_on(best: dict, val_metrics: dict, method: Method) -> bool:
    """Whether an epoch becomes best.safetensors: its `method.selected_by` figure beats the best so far. Without
    validation images (NaN) nothing ranks the epochs, so the last is kept."""
    key = method.selected_by
    return math.isnan(val_metrics[key]) or val_metrics[key] > best.get(key, -1.0)


def epoch_line(epoch: int, epochs: int, metrics: dict, is_best: bool, *, attacked: bool, val_n: int, val_size: int):
    """The line printed after each epoch, by the PyTorch and the tinygrad Trainer."""
    # without a validation attack, "robust" is the clean accuracy (it still ranks epochs): say only clean
    robust = f" robust {metrics['val_robust']:.2%}" if attacked else ""
    if robust and val_n < val_size:  # clean is on every validation image
        robust += f" (first {val_n})"
    val = f"val clean {metrics['val_clean']:.2%}{robust}{' (best)' if is_best else ''}" if val_size else "no validation"
    return (f"epoch {epoch + 1}/{epochs}: train loss {metrics['train_loss']:.4f} acc {metrics['train_acc']:.2%} | "
            f"{val} | {metrics['elapsed_s']:.0f}s")


class Trainer:
    """Train `model` with `method` on `data`, writing metrics and checkpoints to `out_dir`.

    `run_meta` (model name and kwargs, dataset info) goes into every checkpoint so that
    `robustlab.load_model` can rebuild the model without the code that trained it.
    """

    def __init__(self, model: nn.Module, method: Method, data: Splits, config: TrainConfig, out_dir,
                 run_meta: dict, val_attack=None, device: str | torch.device = "cpu", show_progress=None):
        config.validate()
        self.config, self.method, self.data = config, method, data
        self.device = torch.device(device)
        self.out = Path(out_dir)
        self.run_meta = run_meta
        if config.precision == "fp16" and type(method).train_step is not Method.train_step:
            raise RobustlabError(f"--precision fp16 needs loss scaling, which {method.name} (its own optimizer "
                                 "steps) does not do; use --precision bf16")
        # A set held in memory (an ImageSet, or token ids) is batched here and each rank slices every global batch;
        # a Dataset (folder, npy) streams through DataLoader workers whose sampler gives each rank its own images.
        self.streamed = not hasattr(data.train, "subset")
        self.train_set = data.train
        if config.train_n:
            self.train_set = (Subset(data.train, range(min(config.train_n, len(data.train)))) if self.streamed
                              else data.train.subset(config.train_n))
        processes = distributed.planned_world_size()
        if len(self.train_set) < processes:
            raise RobustlabError(f"{len(self.train_set)} training images for {processes} torchrun processes, each of "
                                 "which trains on a share of every batch")
        if self.streamed and config.batch_size % processes:  # each loads batch_size / processes images per step
            raise RobustlabError(f"a streamed dataset under torchrun needs a batch size that the {processes} processes "
                                 f"divide, got {config.batch_size}")
        self.memory_format = (fast_memory_format(model, self.device) if config.channels_last
                              else torch.contiguous_format)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels
        if config.sync_bn and distributed.active():
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model.to(self.device, memory_format=self.memory_format)
        # Under torchrun the training forward goes through DDP (gradients averaged over ranks during backward,
        # weighted by each rank's share of the batch); attacks use the plain module, whose input gradients need no
        # communication.
        self.train_model, self.share = self.model, distributed.BatchShare()
        if distributed.active():
            self.train_model = DistributedDataParallel(self.model, device_ids=[self.device.index]
                                                       if self.device.type == "cuda" else None)
            self.train_model.register_comm_hook(self.share, distributed.weighted_mean_hook)
        self.optimizer = make_optimizer(config, self.model.parameters())
        self.autocast = autocast_for(config.precision, self.device)
        # fp16 gradients underflow without loss scaling; bf16 needs none
        self.scaler = torch.amp.GradScaler(self.device.type) if config.precision == "fp16" else None
        self.val_attack = val_attack
        self.show_progress = show_progress
        self.augment = config.augment or data.info.augment
        if "dataset" in run_meta:  # the metadata describes the data this run trained on, not the dataset's default
            self.run_meta = {**run_meta, "dataset": {**run_meta["dataset"], "augment": self.augment}}
        self.start_epoch, self.elapsed, self.last_metrics = 0, 0.0, {}
        self.best = {"epoch": None, "val_robust": -1.0}
        self.epochs = method.epochs_for(config.epochs)  # FreeAT: config.epochs / replays (see Method.epochs_for)
        self.ema = WeightEMA(self.model, config.ema) if config.ema else None
        self.run_state = method.init_run_state(self.model, config)  # e.g. Generalist's other learners

    @property
    def eval_model(self) -> nn.Module:
        """The weights that are validated and exported: the method's choice (Generalist's global learner),
        else the EMA when enabled, else the model."""
        own = self.method.eval_model(self.run_state)
        return own if own is not None else self.ema.model if self.ema else self.model

    # -- checkpoints -------------------------------------------------------------------------
    def _metadata(self, epoch: int, metrics: dict, kind: str) -> dict:
        # epochs_total: what the run trains in all, which reports show ("epoch 2 of 2"); FreeAT's config.epochs is
        # the budget it divides by its replays.
        return {**self.run_meta, "kind": kind, "epoch": epoch, "epochs_total": self.epochs, "metrics": metrics,
                "method": {"name": self.method.name, **self.method.config()},
                "config": asdict(self.config), "best": self.best, "elapsed_s": self.elapsed}

    def save(self, epoch: int, metrics: dict, is_best: bool):
        opt_tensors, opt_info = checkpoint.optimizer_tensors(self.optimizer)
        tensors = {**checkpoint.prefixed("model.", self.eval_model.state_dict()),
                   **checkpoint.prefixed("optim.", opt_tensors)}
        if self.eval_model is not self.model:  # "model." holds what load_model should see; the raw weights go beside it
            tensors.update(checkpoint.prefixed("raw.", self.model.state_dict()))
        run_tensors, run_info = run_state_tensors(self.run_state, skip=self.eval_model)
        tensors.update(checkpoint.prefixed("run.", run_tensors))
        meta = self._metadata(epoch, metrics, "training-state")
        meta["optimizer"], meta["run_state"] = opt_info, run_info
        meta["ema_updates"] = self.ema.updates if self.ema else None
        meta["grad_scaler"] = self.scaler.state_dict() if self.scaler else None  # else a resumed fp16 run rescales
        # last.safetensors last: a kill before it repeats the epoch, after it the epoch is done, so every other
        # file of the epoch (best, the kept one) must be written by then
        if is_best:
            checkpoint.save(self.out / "best.safetensors", checkpoint.prefixed("model.", self.eval_model.state_dict()),
                            self._metadata(epoch, metrics, "model"))
        if self.config.keep_every and (epoch + 1) % self.config.keep_every == 0:  # named, like the docs, from 1
            checkpoint.save(self.out / f"epoch-{epoch + 1:03d}.safetensors",
                            checkpoint.prefixed("model.", self.eval_model.state_dict()),
                            self._metadata(epoch, metrics, "model"))
        checkpoint.save(self.out / "last.safetensors", tensors, meta)

    def resume(self) -> bool:
        path = self.out / "last.safetensors"
        if not path.exists():
            return False
        tensors, meta = checkpoint.load(path)
        check_resumable(path, meta, "torch", self.method, self.config, self.run_meta)
        if self.eval_model is not self.model:
            self.model.load_state_dict(checkpoint.unprefixed("raw.", tensors))
            self.eval_model.load_state_dict(checkpoint.unprefixed("model.", tensors))
        else:
            self.model.load_state_dict(checkpoint.unprefixed("model.", tensors))
        if self.ema:
            self.ema.updates = meta["ema_updates"]
        if self.scaler and meta.get("grad_scaler"):
            self.scaler.load_state_dict(meta["grad_scaler"])
        checkpoint.restore_optimizer(self.optimizer, checkpoint.unprefixed("optim.", tensors), meta["optimizer"])
        restore_run_state(self.run_state, checkpoint.unprefixed("run.", tensors), meta.get("run_state", {}))
        self.start_epoch, self.elapsed, self.best = meta["epoch"] + 1, meta["elapsed_s"], meta["best"]
        self.last_metrics = meta["metrics"]
        if meta["metrics"].get("stopped_early"):  # e.g. Fast-AT overfitted: training on would undo the stop
            self.start_epoch = self.epochs
        if distributed.is_main():  # rank 0 alone writes the file, as in fit()
            checkpoint.truncate_metrics(self.out, meta["epoch"], meta["metrics"])
        return True

    # -- loop ----------------------------------------------------------------------------------
    def fit(self) -> dict:
        check_not_over_a_run(self.out, self.start_epoch)
        main = distributed.is_main()  # rank 0 alone writes files and prints; every rank computes the same metrics
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            checkpoint.write_json(self.out / "config.json", {
                **self.run_meta, "method": {"name": self.method.name, **self.method.config()},
                "config": asdict(self.config), "world_size": distributed.world_size()})
        if main and len(self.data.val) == 0 and self.start_epoch < self.epochs:
            tqdm.write("no validation images: nothing ranks the epochs, so best.safetensors is the last epoch's "
                       "(the protocol holds out none from a training set under 10)")
        metrics = self.last_metrics  # a resumed run with nothing left to train reports its last epoch
        for epoch in range(self.start_epoch, self.epochs):
            start = time.perf_counter()
            train_metrics = self.train_epoch(epoch)
            self.elapsed += time.perf_counter() - start
            # DDP broadcasts buffers before each forward, so after the last step each rank holds its own BatchNorm
            # statistics: validate (and save) rank 0's everywhere, and keep a method's other learners in step
            distributed.broadcast_buffers(self.model, self.ema.model if self.ema else None,
                                          *(v for v in self.run_state.values() if isinstance(v, nn.Module)))
            val_metrics = self.validate(epoch)
            metrics = {"epoch": epoch, **train_metrics, **val_metrics, "elapsed_s": round(self.elapsed, 2)}
            is_best = improves_on(self.best, val_metrics, self.method)
            if is_best:
                self.best = {"epoch": epoch, "val_robust": val_metrics["val_robust"], "val_clean": val_metrics["val_clean"]}
            stop = self.method.should_stop(metrics, self.best)  # e.g. Fast-AT's catastrophic-overfitting check
            if stop:
                metrics["stopped_early"] = stop
            if main:
                self.save(epoch, metrics, is_best)
                checkpoint.append_metrics(self.out, metrics)
            distributed.barrier()  # no rank runs ahead of a checkpoint that a resume would start from
            if main:
                tqdm.write(epoch_line(epoch, self.epochs, metrics, is_best, attacked=self.val_attack is not None,
                                      val_n=self.config.val_n, val_size=len(self.data.val)))
            if stop:  # every rank computed it and every rank leaves, or the others would wait in a collective
                if main:
                    tqdm.write(f"early stop after epoch {epoch + 1}: {stop}")
                break
        return metrics

    def rank_batch_size(self) -> int:
        return self.config.batch_size // distributed.world_size()

    def batches(self, epoch: int):
        cfg = self.config
        source = (loader_batches(self.train_set, self.rank_batch_size(), cfg.seed, epoch, self.augment, cfg.workers)
                  if self.streamed else epoch_batches(self.train_set, cfg.batch_size, cfg.seed, epoch, self.augment))
        for x, y in source:
            yield (x.to(self.device, memory_format=self.memory_format, non_blocking=True),
                   y.to(self.device, non_blocking=True))

    def train_epoch(self, epoch: int) -> dict:
        cfg = self.config
        torch.manual_seed(epoch_seed(cfg.seed, epoch, 1 + 1000 * distributed.rank()))  # dropout: a mask per image
        # Each rank draws its own random starts (rank 0's are a one-process run's): DDP therefore matches one
        # process on the full batch in distribution, and bit for bit only for methods without random starts.
        attack_gen = torch.Generator(self.device).manual_seed(epoch_seed(cfg.seed, epoch, 2 + 1000 * distributed.rank()))
        ctx = StepContext(self.train_model, self.model, self.optimizer, attack_gen, self.autocast, epoch=epoch,
                          epochs=self.epochs, run=self.run_state, scaler=self.scaler, share=self.share)
        steps = (math.ceil(math.ceil(len(self.train_set) / distributed.world_size()) / self.rank_batch_size())
                 if self.streamed else math.ceil(len(self.train_set) / cfg.batch_size))
        self.model.train()
        total_loss = total_correct = seen = 0
        show = self.show_progress if distributed.is_main() else False
        bar = progress(self.batches(epoch), show=show, total=steps, unit="batch", leave=False,
                       desc=f"epoch {epoch + 1}/{self.epochs}")
        start = time.perf_counter()
        # Each rank trains on its share of every global batch; streamed batches are that share already.
        part = (lambda n: slice(None)) if self.streamed else distributed.my_slice
        for i, (x, y) in enumerate(bar):
            if not self.streamed and len(y) < distributed.world_size():  # a rank's empty share: NaN loss, NaN weights
                continue
            n = len(y) if not self.streamed else int(distributed.all_sum(torch.tensor([len(y)]))[0])
            x, y = x[part(len(y))], y[part(len(y))]
            self.share.set(len(y), n)
            ctx.progress = (epoch + i / steps) / self.epochs
            lr = learning_rate(cfg.schedule, cfg.lr, ctx.progress)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            result = self.method.train_step(ctx, x, y)
            lr = self.optimizer.param_groups[0]["lr"]  # the rate used: a method may set its own (RiFT's step decay)
            if self.ema:
                self.ema.update(self.model)
            totals = distributed.all_sum(torch.tensor([result.loss.item() * len(y),
                                                       (result.logits.argmax(1) == y).sum().item(), len(y)],
                                                      dtype=torch.float64))
            loss_sum, correct, count = totals.tolist()
            if not math.isfinite(loss_sum):  # every rank sees the same sum, so every rank stops
                bar.close()
                kept = f"{self.out}/last.safetensors holds epoch {epoch}" if epoch else "no epoch was completed"
                raise RobustlabError(
                    f"training diverged: the loss is {loss_sum / count:.4g} at epoch {epoch + 1}, step {i + 1} "
                    f"(precision {cfg.precision}, lr {lr:.4g}); {kept}. Train again with a smaller --lr or --precision fp32")
            total_loss, total_correct, seen = total_loss + loss_sum, total_correct + correct, seen + int(count)
            if i % 10 == 0:
                bar.set_postfix(refresh=False, loss=f"{total_loss / seen:.3f}", acc=f"{total_correct / seen:.1%}",
                                lr=f"{lr:.4f}", img_s=f"{seen / (time.perf_counter() - start):.0f}")
        bar.close()
        return {"train_loss": total_loss / seen, "train_acc": total_correct / seen,
                "train_images_per_s": seen / (time.perf_counter() - start)}

    def validate(self, epoch: int) -> dict:
        val = self.data.val
        if len(val) == 0:
            return {"val_clean": float("nan"), "val_robust": float("nan")}
        model = self.eval_model
        clean = accuracy(model, val, batch_size=500, device=self.device)
        subset = val.subset(min(self.config.val_n, len(val)))
        robust = clean if self.val_attack is None else accuracy(
            model, subset, attack=self.val_attack, batch_size=500, device=self.device, seed=1234)
        return {"val_clean": clean, "val_robust": robust}


def run_state_tensors(run: dict, skip=None) -> tuple[dict, dict]:
    """A method's run state for a checkpoint: the tensors of its modules and optimizers under "NAME.", and
    JSON (optimizer hyper-parameters, plain values). `skip`: a module saved elsewhere (the exported model)."""
    tensors, info = {}, {}
    for name, value in run.items():
        if value is skip:
            continue
        if isinstance(value, nn.Module):
            tensors.update(checkpoint.prefixed(f"{name}.", value.state_dict()))
            info[name] = None
        elif isinstance(value, torch.optim.Optimizer):
            opt_tensors, info[name] = checkpoint.optimizer_tensors(value)
            tensors.update(checkpoint.prefixed(f"{name}.", opt_tensors))
        else:
            info[name] = value
    return tensors, info


def restore_run_state(run: dict, tensors: dict, info: dict):
    """The inverse of `run_state_tensors`, into the state the method built for this run (in place)."""
    for name, value in list(run.items()):
        if name not in info:  # skipped when saved
            continue
        own = checkpoint.unprefixed(f"{name}.", tensors)
        if isinstance(value, nn.Module):
            value.load_state_dict(own)
        elif isinstance(value, torch.optim.Optimizer):
            checkpoint.restore_optimizer(value, own, info[name])
        else:
            run[name] = info[name]


class WeightEMA:
    """Exponential moving average of parameters and buffers (Polyak averaging, as in Rebuffi et al. 2021).

    The decay warms up as min(decay, (1 + t) / (10 + t)) so early averages are not dominated by the
    random initialization.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module):
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for avg, new in zip(self.model.state_dict().values(), model.state_dict().values()):
            if avg.dtype.is_floating_point:
                avg.mul_(d).add_(new.detach(), alpha=1 - d)
            else:
                avg.copy_(new)
