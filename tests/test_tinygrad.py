"""robustlab.tinygrad: weight transfer, attacks, PGD adversarial training, checkpoints.

Kept small for a 2-core machine: one batch size (128) for most tinygrad graphs, so that the
kernels tinygrad lowers for one test serve the next, and the MLP wherever the model does not matter.
"""
from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from robustlab.attacks import fgsm as torch_fgsm
from robustlab.attacks import pgd as torch_pgd
from robustlab.attacks.threat import within_ball
from robustlab.errors import RobustlabError

pytest.importorskip("tinygrad")
try:
    from robustlab.tinygrad.backend import require
    require()
except RobustlabError as exc:  # e.g. no clang for the CPU device
    pytest.skip(str(exc), allow_module_level=True)

from tinygrad import Context, Tensor  # noqa: E402
from tinygrad.helpers import TRAINING  # noqa: E402

import robustlab  # noqa: E402
from robustlab import tinygrad as tg  # noqa: E402
from robustlab.data import DATASETS, Splits  # noqa: E402
from robustlab.tinygrad.evaluate import predict  # noqa: E402
from robustlab.tinygrad.trainer import TinyTrainer  # noqa: E402
from robustlab.training import TrainConfig  # noqa: E402
from robustlab.training.run import make_method  # noqa: E402

INFO = DATASETS["fashion-mnist"]
N = 128


def twins(name, seed=0):
    """A PyTorch twin with seeded weights and its tinygrad copy."""
    torch.manual_seed(seed)
    torch_model = tg.build_torch_model(name, INFO.input_shape, INFO.num_classes, INFO.mean, INFO.std).eval()
    return torch_model, tg.from_torch(torch_model)


@pytest.fixture(scope="module")
def batch(test_batch):
    x, y = test_batch
    return x[:N].numpy(), y[:N].numpy()


@pytest.fixture(scope="module")
def mlp_pair():
    return twins("mlp")


# -- setup errors --------------------------------------------------------------------------------
def test_missing_tinygrad_or_clang_is_one_line(monkeypatch):
    import sys
    from robustlab.tinygrad import backend
    monkeypatch.setitem(sys.modules, "tinygrad", None)
    with pytest.raises(RobustlabError, match=r"tinygrad is not installed; pip install 'robustlab\[tinygrad\]'"):
        backend.require()
    monkeypatch.undo()
    if backend.require().Device.DEFAULT == "CPU":
        monkeypatch.setattr(backend.shutil, "which", lambda name: None)
        with pytest.raises(RobustlabError, match="apt-get install -y clang"):
            backend.require()


# -- weight transfer -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mlp", "cnn-small"])
def test_same_weights_give_same_logits(name, batch):
    x, _ = batch
    torch_model, tiny = twins(name)
    expected = torch_model(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(tiny(Tensor(x)).numpy(), expected, atol=1e-4, rtol=0)
    # the other direction: tinygrad's own initialization, carried over to PyTorch
    native = tg.build_model(name, INFO.input_shape, INFO.num_classes, INFO.mean, INFO.std)
    np.testing.assert_allclose(native.to_torch()(torch.from_numpy(x)).detach().numpy(), native(Tensor(x)).numpy(),
                               atol=1e-4, rtol=0)


def test_state_dict_names_match_robustlab():
    torch_model, tiny = twins("cnn-small")
    reference = robustlab.models.build_model("cnn-small", INFO.input_shape, INFO.num_classes, INFO.mean, INFO.std)
    assert list(tiny.state_dict()) == list(reference.state_dict()) == list(torch_model.state_dict())
    assert len(tiny.parameters()) == 8  # normalization buffers are not trained


def test_an_mlp_of_another_width_transfers_both_ways_with_its_normalization(batch):
    x = batch[0][:4]
    torch.manual_seed(0)
    torch_model = tg.build_torch_model("mlp", INFO.input_shape, INFO.num_classes, INFO.mean, INFO.std, hidden=32).eval()
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(tg.from_torch(torch_model)(Tensor(x)).numpy(), expected, atol=1e-5)
    native = tg.build_model("mlp", hidden=32)  # mean 0 and std 1 until a state dict brings Fashion-MNIST's
    native.load_state_dict(torch_model.state_dict())
    assert native.mean == pytest.approx(INFO.mean) and native.std == pytest.approx(INFO.std)  # what its metadata says
    with torch.no_grad():
        np.testing.assert_allclose(native.to_torch()(torch.from_numpy(x)).numpy(), expected, atol=1e-5)


def test_a_cnn_for_images_that_are_not_square_transfers_by_its_metadata():
    """The state dict alone gives a square shape; a checkpoint's metadata says the real one (here 28 high, 20 wide)."""
    torch.manual_seed(0)
    torch_model = tg.build_torch_model("cnn-small", (1, 28, 20), 10, INFO.mean, INFO.std).eval()
    torch_model.checkpoint_meta = {"dataset": {"input_shape": [1, 28, 20]}}
    x = np.random.default_rng(0).random((2, 1, 28, 20), dtype=np.float32)
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(tg.from_torch(torch_model)(Tensor(x)).numpy(), expected, atol=1e-4)


def test_mlp_takes_flat_inputs(batch, mlp_pair):
    x, _ = batch
    _, tiny = mlp_pair
    np.testing.assert_allclose(tiny(Tensor(x.reshape(N, 784))).numpy(), tiny(Tensor(x)).numpy(), atol=1e-6)
    with pytest.raises(RobustlabError, match="expects inputs of shape"):
        tiny(Tensor(x[:, :, :20]))


def test_bad_weights_are_refused():
    _, tiny = twins("mlp")
    state = tiny.state_dict()
    state["net.fc1.weight"] = state["net.fc1.weight"][:64]
    with pytest.raises(RobustlabError, match="net.fc1.weight"):
        tiny.load_state_dict(state)
    with pytest.raises(RobustlabError, match="missing"):
        tiny.load_state_dict({})
    with pytest.raises(RobustlabError, match="unknown tinygrad model"):
        tg.build_model("resnet18")


# -- attacks -----------------------------------------------------------------------------------
class Recorder:
    """Wraps a model and keeps every input it is called on: the attack's iterates."""

    def __init__(self, model):
        self.model, self.seen = model, []

    def __call__(self, x):
        self.seen.append(x.numpy())
        return self.model(x)


@pytest.mark.parametrize("norm,eps,step", [("linf", 0.1, 0.04), ("l2", 1.5, 0.6)])
def test_every_iterate_stays_in_the_ball(norm, eps, step, batch, mlp_pair):
    x, y = batch
    _, tiny = mlp_pair
    recorder = Recorder(tiny)
    tg.pgd(recorder, x, y, eps=eps, norm=norm, steps=4, step_size=step, seed=3, jit=False)
    assert len(recorder.seen) == 6  # the clean images, four gradient steps and the check of the last iterate
    for iterate in recorder.seen:
        assert within_ball(torch.from_numpy(iterate), torch.from_numpy(x), norm, eps, tol=1e-5)
    eager = tg.pgd(tiny, x, y, eps=eps, norm=norm, steps=4, step_size=step, restarts=2, seed=3, jit=False)
    jitted = tg.pgd(tiny, x, y, eps=eps, norm=norm, steps=4, step_size=step, restarts=2, seed=3)
    np.testing.assert_allclose(jitted, eager, atol=1e-6)  # TinyJit replays the same computation
    assert within_ball(torch.from_numpy(jitted), torch.from_numpy(x), norm, eps, tol=1e-5)


def test_attack_touches_no_gradients_or_mode(batch, mlp_pair):
    x, y = batch
    _, tiny = mlp_pair
    before = tiny.state_dict()
    tiny.net.fc2.bias.grad = marker = Tensor.ones(10).contiguous().realize()
    with Context(TRAINING=1):
        tg.pgd(tiny, x, y, eps=0.1, steps=3)
        assert TRAINING.value == 1
    assert TRAINING.value == 0
    assert tiny.net.fc2.bias.grad is marker and tiny.net.fc1.weight.grad is None
    np.testing.assert_array_equal(marker.numpy(), 1.0)
    after = tiny.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    tiny.net.fc2.bias.grad = None


def test_input_kinds_and_errors(batch, mlp_pair):
    x, y = batch
    _, tiny = mlp_pair
    as_tensor = tg.fgsm(tiny, Tensor(x), Tensor(y.astype(np.int32)), 0.1)
    as_array = tg.fgsm(tiny, torch.from_numpy(x), y, 0.1)  # anything numpy can read
    assert isinstance(as_tensor, Tensor) and isinstance(as_array, np.ndarray)
    np.testing.assert_allclose(as_tensor.numpy(), as_array, atol=1e-6)
    with pytest.raises(RobustlabError, match="divide uint8"):
        tg.pgd(tiny, (x * 255).astype(np.uint8), y, eps=0.1)
    with pytest.raises(RobustlabError, match=r"\[0, 1\]"):
        tg.pgd(tiny, x * 255, y, eps=0.1)
    with pytest.raises(RobustlabError, match="unknown norm"):
        tg.pgd(tiny, x, y, eps=0.1, norm="l3")
    with pytest.raises(RobustlabError, match="eps must be"):
        tg.pgd(tiny, x, y, eps=-1)
    with pytest.raises(RobustlabError, match="eps must be a finite"):
        tg.pgd(tiny, x, y, eps=float("nan"))
    with pytest.raises(RobustlabError, match="labels"):
        tg.pgd(tiny, x, y[:5], eps=0.1)
    # each of these ran: float labels truncated, classes beyond the outputs scored 0, NaN passed the box check
    with pytest.raises(RobustlabError, match="integer class indices >= 0, got dtype float"):
        tg.pgd(tiny, x, y + 0.7, eps=0.1)
    with pytest.raises(RobustlabError, match="integer class indices >= 0"):
        tg.pgd(tiny, x, y - 10, eps=0.1)
    with pytest.raises(RobustlabError, match="y holds class 19 but the model has 10 outputs"):
        tg.pgd(tiny, x, np.where(np.arange(len(y)) == 3, 19, y), eps=0.1, steps=1)
    nan = x.copy()
    nan[0, 0, 0, 0] = np.nan
    with pytest.raises(RobustlabError, match=r"NaN values; it must hold images in \[0, 1\]"):
        tg.pgd(tiny, nan, y, eps=0.1)
    for steps in (2.5, "3"):  # TypeErrors from range() and from "3" < 1
        with pytest.raises(RobustlabError, match="steps must be an integer >= 1"):
            tg.pgd(tiny, x, y, eps=0.1, steps=steps)


def test_attack_runs_batchnorm_and_dropout_in_eval_mode(batch):
    """The MLP has neither, so the TRAINING=0 the attacks set was untested: a model with both, attacked from
    inside TRAINING=1, must give the same images twice (no dropout) and keep its running statistics."""
    from tinygrad import nn as tnn

    class NoisyNet:
        def __init__(self):
            Tensor.manual_seed(0)
            self.bn, self.fc = tnn.BatchNorm(1), tnn.Linear(784, 10)

        def __call__(self, x):
            return self.fc(self.bn(x).flatten(1).dropout(0.5))

    x, y = batch
    net = NoisyNet()
    mean, var = net.bn.running_mean.numpy().copy(), net.bn.running_var.numpy().copy()
    with Context(TRAINING=1):
        first = tg.pgd(net, x, y, eps=0.1, steps=3, random_start=False)
        second = tg.pgd(net, x, y, eps=0.1, steps=3, random_start=False)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(net.bn.running_mean.numpy(), mean)
    np.testing.assert_array_equal(net.bn.running_var.numpy(), var)
    with Context(TRAINING=1):  # the check itself can fail: in train mode dropout changes the outputs
        assert not np.array_equal(net(Tensor(x)).numpy(), net(Tensor(x)).numpy())


def test_fgsm_agrees_with_pytorch(batch, mlp_pair):
    """No randomness: the two frameworks should give the same adversarial images (up to sign ties)."""
    x, y = batch
    torch_model, tiny = mlp_pair
    expected = torch_fgsm(torch_model, torch.from_numpy(x), torch.from_numpy(y), eps=0.1).numpy()
    got = tg.fgsm(tiny, x, y, 0.1)
    assert np.mean(np.isclose(got, expected, atol=1e-5)) > 0.999


def test_a_three_channel_model_transfers(batch):
    """from_torch built every model with one channel's normalization and refused CIFAR-shaped ones."""
    torch.manual_seed(0)
    for name in ("cnn-small", "mlp"):
        torch_model = tg.build_torch_model(name, (3, 32, 32), 10, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)).eval()
        x = np.random.default_rng(0).random((4, 3, 32, 32), dtype=np.float32)
        with torch.no_grad():
            expected = torch_model(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(tg.from_torch(torch_model)(Tensor(x)).numpy(), expected, atol=1e-4)


def test_pgd_agrees_with_pytorch_on_a_robust_model(robust_model, test_batch):
    """The same trained model and seed: robust accuracy within one point (200 images, PGD-10)."""
    x, y = test_batch[0][:200], test_batch[1][:200]
    tiny = tg.from_torch(robust_model)
    budget = dict(eps=0.1, steps=10, step_size=0.025)
    torch_adv = torch_pgd(robust_model, x, y, **budget, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch_acc = (robust_model(torch_adv).argmax(1) == y).float().mean().item()
    tiny_adv = tg.pgd(tiny, x.numpy(), y.numpy(), **budget, seed=0)
    tiny_acc = float((predict(tiny, tiny_adv) == y.numpy()).mean())
    clean = float((predict(tiny, x.numpy()) == y.numpy()).mean())
    assert within_ball(torch.from_numpy(tiny_adv), x, "linf", 0.1)
    assert tiny_acc < clean - 0.05  # the attack works
    assert abs(tiny_acc - torch_acc) <= 0.01 + 1e-9, (tiny_acc, torch_acc)


# -- training and checkpoints -------------------------------------------------------------------
def small_splits(fmnist, n_train=1024, n_val=128) -> Splits:
    return Splits(fmnist.train.subset(n_train), fmnist.val.subset(n_val), fmnist.test, fmnist.info)


def tiny_trainer(fmnist, tmp_path, method, model="mlp", epochs=4, **config):
    m = make_method(method, "fashion-mnist", "linf")
    cfg = TrainConfig(epochs=epochs, batch_size=N, lr=0.1, val_n=N, augment="none", **config)
    _, net = twins(model)
    meta = {"model": {"name": model, "kwargs": {}}, "dataset": {**asdict(INFO), "split_seed": 0},
            "backend": "tinygrad"}
    attack = {"eps": 0.1, "norm": "linf", "steps": 10, "step_size": 0.025}
    return TinyTrainer(net, m, small_splits(fmnist), cfg, tmp_path / method, meta, val_attack=attack,
                                show_progress=False)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_training_steps_match_pytorch(optimizer, batch):
    """Two clean steps with weight decay: tinygrad's optimizers update the weights as torch.optim does."""
    from robustlab.tinygrad.trainer import TrainStep
    from robustlab.training.methods import Standard, StepContext
    from robustlab.training.trainer import make_optimizer

    x, y = batch
    config = TrainConfig(optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 0.01, weight_decay=5e-4)
    torch_model, tiny = twins("mlp")
    torch_model.train()
    ctx = StepContext(torch_model, torch_model, make_optimizer(config, torch_model.parameters()), None,
                      contextlib.nullcontext)
    step = TrainStep(tiny, Standard(), config)
    for _ in range(2):
        Standard().train_step(ctx, torch.from_numpy(x), torch.from_numpy(y))
        step(x, y, np.random.default_rng(0))
    for key, value in tiny.state_dict().items():  # Adam divides by √v: float noise where v ≈ 0 grows to ~2e-5
        np.testing.assert_allclose(value, torch_model.state_dict()[key].numpy(), atol=1e-4, err_msg=key)


def test_a_pgd_at_step_starts_its_attack_at_a_random_point_of_the_ball(batch, monkeypatch):
    """The attack starts at clip(x + δ), δ the step generator's first draw: with the PGD steps themselves taken out,
    one step trains on that start, as the PyTorch twin trained on it does (not on x)."""
    from robustlab.tinygrad import trainer as module
    from robustlab.tinygrad.attacks import random_delta
    from robustlab.training.methods import Standard, StepContext
    from robustlab.training.trainer import make_optimizer

    monkeypatch.setattr(module, "pgd_steps", lambda model, x, y, start, **kwargs: start)
    x, y = batch
    config = TrainConfig(lr=0.05, weight_decay=0.0)
    torch_model, tiny = twins("mlp")
    method = make_method("pgd-at", "fashion-mnist", "linf")
    module.TrainStep(tiny, method, config)(x, y, np.random.default_rng(0))
    start = np.clip(x + random_delta(x.shape, "linf", method.eps, np.random.default_rng(0)), 0, 1).astype(np.float32)
    ctx = StepContext(torch_model.train(), torch_model, make_optimizer(config, torch_model.parameters()), None,
                      contextlib.nullcontext)
    Standard().train_step(ctx, torch.from_numpy(start), torch.from_numpy(y))
    for key, value in tiny.state_dict().items():
        np.testing.assert_allclose(value, torch_model.state_dict()[key].numpy(), atol=1e-5, err_msg=key)


class StepRecorder:
    """Stands in for a TrainStep in `train_epoch`: keeps each batch's size, the learning rates set and the first random
    draw of each step; its loss is the batch's size and half the batch is right."""

    def __init__(self):
        self.sizes, self.lrs, self.draws = [], [], []

    def set_lr(self, lr):
        self.lrs.append(lr)

    def __call__(self, x, y, rng):
        self.sizes.append(len(y))
        self.draws.append(rng.random())
        return float(len(y)), len(y) // 2


def test_an_epoch_averages_per_image_over_train_n_and_moves_the_lr_every_step(fmnist, tmp_path):
    trainer = tiny_trainer(fmnist, tmp_path, "standard", epochs=2, train_n=200, schedule="cosine")
    trainer.step = steps = StepRecorder()
    metrics = trainer.train_epoch(0)
    assert steps.sizes == [128, 72]  # train_n's 200 images in batches of 128
    assert metrics["train_loss"] == pytest.approx((128 * 128 + 72 * 72) / 200)  # per image, not per batch
    assert metrics["train_acc"] == pytest.approx((64 + 36) / 200)
    trainer.train_epoch(1)
    # cosine from lr 0.1 over 2 epochs of 2 steps: progress 0, 1/4, 1/2, 3/4
    assert steps.lrs == pytest.approx([0.05 * (1 + math.cos(math.pi * k / 4)) for k in range(4)])
    assert steps.draws[0] != steps.draws[2]  # each epoch draws its own random starts


def test_validation_is_clean_on_every_image_and_attacked_on_val_n(fmnist, tmp_path, monkeypatch):
    from robustlab.tinygrad import trainer as module
    trainer = tiny_trainer(fmnist, tmp_path, "pgd-at")
    trainer.config = replace(trainer.config, val_n=32)
    calls = []

    def accuracy(model, data, attack=None, **kwargs):
        calls.append((len(data), attack.keywords if attack else None))
        return 0.25 if attack else 0.75
    monkeypatch.setattr(module, "accuracy", accuracy)
    assert trainer.validate() == {"val_clean": 0.75, "val_robust": 0.25}
    assert calls == [(128, None), (32, trainer.val_attack)]


def test_every_kth_epoch_is_named_from_one_and_a_resume_keeps_the_best_epoch(fmnist, tmp_path):
    from robustlab import checkpoint
    trainer = tiny_trainer(fmnist, tmp_path, "standard", epochs=3, keep_every=2)
    trainer.best = {"epoch": 0, "val_robust": 0.4, "val_clean": 0.5}
    for epoch, robust in enumerate([0.4, 0.2]):  # the second epoch is worse: not the best
        metrics = {"epoch": epoch, "val_robust": robust, "val_clean": 0.5}
        trainer.save(epoch, metrics, is_best=epoch == 0)
        checkpoint.append_metrics(trainer.out, metrics)
    assert [p.name for p in trainer.out.glob("epoch-*.safetensors")] == ["epoch-002.safetensors"]
    again = tiny_trainer(fmnist, tmp_path, "standard", epochs=3, keep_every=2)
    assert again.resume() and again.start_epoch == 2
    assert again.best == trainer.best  # a worse third epoch must not replace best.safetensors


@pytest.fixture(scope="module")
def trained_mlps(fmnist, tmp_path_factory):
    """PGD-AT and clean MLPs, 4 epochs on 1,024 images (the same batches and initial weights)."""
    out = tmp_path_factory.mktemp("tiny")
    runs = {}
    for method in ("pgd-at", "standard"):
        trainer = tiny_trainer(fmnist, out, method)
        trainer.fit()
        runs[method] = trainer
    return runs


def test_pgd_at_lowers_loss_and_beats_clean_training(trained_mlps, batch):
    x, y = batch
    at = trained_mlps["pgd-at"]
    losses = [json.loads(line)["train_loss"] for line in (at.out / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]
    robust = {}
    for name, trainer in trained_mlps.items():
        adv = tg.pgd(trainer.model, x, y, eps=0.1, steps=10, step_size=0.025, seed=0)
        robust[name] = float((predict(trainer.model, adv) == y).mean())
    assert robust["pgd-at"] > robust["standard"] + 0.1, robust  # measured: 44% against 18%


def test_training_run_files_and_reload(trained_mlps, batch):
    x, _ = batch
    trainer = trained_mlps["pgd-at"]
    assert {p.name for p in trainer.out.iterdir()} >= {"best.safetensors", "last.safetensors", "metrics.jsonl",
                                                        "config.json", "best.json"}
    reloaded = tg.load_model(trainer.out, "last")
    np.testing.assert_allclose(reloaded(Tensor(x)).numpy(), trainer.model(Tensor(x)).numpy(), atol=1e-6)
    assert reloaded.checkpoint_meta["backend"] == "tinygrad"
    assert reloaded.checkpoint_meta["epochs_total"] == trainer.config.epochs  # what reports read, as PyTorch runs'
    # and as a PyTorch model, so that `robustlab eval` reads a tinygrad MLP run (it once knew no model 'mlp')
    from robustlab import load_model as load_torch_model
    torch_model = load_torch_model(trainer.out, "last")
    with torch.no_grad():
        np.testing.assert_allclose(torch_model(torch.from_numpy(x)).numpy(), trainer.model(Tensor(x)).numpy(), atol=1e-5)


def test_every_kth_epoch_is_kept_and_torchrun_is_refused(fmnist, tmp_path, monkeypatch):
    tiny_trainer(fmnist, tmp_path, "standard", epochs=2, train_n=128, keep_every=1).fit()
    assert {p.name for p in (tmp_path / "standard").glob("epoch-*.safetensors")} == {"epoch-001.safetensors",
                                                                                      "epoch-002.safetensors"}
    from robustlab.cli import main
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets them: every rank would train the whole run
    assert main(["train", "--backend", "tinygrad", "--data-dir", "/usr/share/datasets/fashion-mnist", "--out", str(tmp_path / "ddp")]) == 2


def test_resume_continues_where_it_stopped(fmnist, tmp_path):
    first = tiny_trainer(fmnist, tmp_path, "standard", epochs=2)
    train_epoch = first.train_epoch

    def killed_in_the_second_epoch(epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return train_epoch(epoch)
    first.train_epoch = killed_in_the_second_epoch
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    again = tiny_trainer(fmnist, tmp_path, "standard", epochs=2)
    assert again.resume() and again.start_epoch == 1
    np.testing.assert_array_equal(again.optimizer.b[0].numpy(), first.optimizer.b[0].numpy())
    again.fit()
    assert len((tmp_path / "standard" / "metrics.jsonl").read_text().splitlines()) == 2
    uninterrupted = tiny_trainer(fmnist, tmp_path / "full", "standard", epochs=2)
    uninterrupted.fit()
    for key, value in uninterrupted.model.state_dict().items():
        np.testing.assert_allclose(again.model.state_dict()[key], value, atol=1e-6, err_msg=key)
    # another recipe is refused, as by the PyTorch trainer: more epochs would also reshape the schedule followed
    with pytest.raises(RobustlabError, match="other settings.*epochs 2 → 3"):
        tiny_trainer(fmnist, tmp_path, "standard", epochs=3).resume()


def test_a_method_stop_is_recorded_and_kept_on_resume(fmnist, tmp_path, monkeypatch):
    """As in the PyTorch Trainer: the epoch that stops says why in its metrics, and a resumed run trains no further."""
    from robustlab.training.methods import Standard
    monkeypatch.setattr(Standard, "should_stop", lambda self, metrics, best: "enough" if metrics["epoch"] == 0 else None)
    last = tiny_trainer(fmnist, tmp_path, "standard", epochs=3, train_n=256).fit()
    assert last["epoch"] == 0 and last["stopped_early"] == "enough"
    again = tiny_trainer(fmnist, tmp_path, "standard", epochs=3, train_n=256)
    assert again.resume() and again.fit()["stopped_early"] == "enough"  # nothing trained: the stopped epoch's metrics
    assert len((tmp_path / "standard" / "metrics.jsonl").read_text().splitlines()) == 1


def test_tinygrad_cnn_loads_as_pytorch_cnn_small(tmp_path, batch):
    """A tinygrad run's checkpoint is read by robustlab.load_model as the PyTorch cnn-small."""
    x, _ = batch
    trainer = tg.build_trainer(dataset="fashion-mnist", model="cnn-small", method="pgd-at", out=tmp_path,
                               config=TrainConfig(seed=3), show_progress=False)
    torch.manual_seed(3)  # the run starts from the PyTorch path's initial weights for its seed
    reference = robustlab.models.build_model("cnn-small", INFO.input_shape, INFO.num_classes, INFO.mean, INFO.std)
    for key, value in trainer.model.state_dict().items():
        np.testing.assert_array_equal(value, reference.state_dict()[key].numpy())
    trainer.save(0, {"val_robust": 0.0}, is_best=True)
    torch_model = robustlab.load_model(tmp_path)
    np.testing.assert_allclose(torch_model(torch.from_numpy(x)).detach().numpy(), trainer.model(Tensor(x)).numpy(),
                               atol=1e-4)
    assert torch_model.checkpoint_meta["backend"] == "tinygrad"
    tg.save_model(trainer.model, tmp_path / "alone.safetensors", dataset="fashion-mnist")
    back = tg.load_model(tmp_path / "alone.safetensors")
    assert back.name == "cnn-small" and back.checkpoint_meta["dataset"]["name"] == "fashion-mnist"
    plain = tg.build_model("cnn-small")  # mean 0, std 1: the metadata said Fashion-MNIST's
    tg.save_model(plain, tmp_path / "plain.safetensors", dataset="fashion-mnist")
    saved = robustlab.checkpoint.read_metadata(tmp_path / "plain.safetensors")["dataset"]
    assert (saved["name"], saved["mean"], saved["std"]) == ("fashion-mnist", [0.0], [1.0])


def test_a_run_records_the_folder_it_read(fmnist, tmp_path):
    """As PyTorch runs do, so that `robustlab eval RUN` reads the same files without `--data-dir`."""
    from conftest import FMNIST
    from robustlab.training.run import run_dataset

    folder = tmp_path / "elsewhere"
    folder.mkdir()
    for path in Path(FMNIST).glob("*-ubyte.gz"):
        (folder / path.name).symlink_to(path)
    trainer = tg.build_trainer(dataset="fashion-mnist", model="mlp", method="standard", out=tmp_path / "run",
                               data_dir=folder, show_progress=False)
    trainer.save(0, {"val_robust": 0.0}, is_best=True)
    meta = tg.load_model(tmp_path / "run").checkpoint_meta
    assert meta["dataset"]["data_dir"] == str(folder.resolve()) and meta["dataset"]["val_size"] == len(fmnist.val)
    assert torch.equal(run_dataset(meta).test.labels, fmnist.test.labels)


def test_cli_resume_divergence_and_device(fmnist, tmp_path, capsys):
    """--resume crashed (TinyTrainer had no `epochs`), a NaN loss trained on to NaN weights and exit 0, and
    --device cuda trained on the CPU without a word."""
    from robustlab.cli import main
    base = ["train", "--backend", "tinygrad", "--model", "mlp", "--method", "standard", "--data-dir",
            "/usr/share/datasets/fashion-mnist", "--train-n", "512", "--val-n", "20", "--epochs", "1", "--threads", "1"]
    assert main(base + ["--out", str(tmp_path / "run")]) == 0
    assert main(base + ["--out", str(tmp_path / "run"), "--resume"]) == 0
    assert main(base + ["--out", str(tmp_path / "cuda"), "--device", "cuda"]) == 2
    assert "runs where tinygrad's DEV variable says" in capsys.readouterr().err
    assert main(base[:-4] + ["--epochs", "2", "--lr", "1e4", "--schedule", "constant", "--out", str(tmp_path / "nan")]) == 2
    assert "robustlab: error: training diverged: the loss is nan" in capsys.readouterr().err


def test_unsupported_options_are_refused(fmnist, tmp_path):
    with pytest.raises(RobustlabError, match="trains methods"):
        tiny_trainer(fmnist, tmp_path, "trades")
    with pytest.raises(RobustlabError, match="fp32"):
        tiny_trainer(fmnist, tmp_path, "standard", precision="bf16")
    with pytest.raises(RobustlabError, match="no option"):
        tg.build_model("cnn-small", width=2)


def test_an_image_the_model_gets_wrong_is_never_counted_robust():
    """As for PyTorch's pgd: a model wrong exactly at the clean image and right everywhere around it (flat: no
    gradient) came back from the random start classified right."""
    x = np.random.default_rng(0).uniform(0.25, 0.75, (4, 1, 6, 6)).astype(np.float32)
    y = np.ones(4, dtype=np.int32)

    class WrongOnlyAtTheCentre:
        def __init__(self):
            self.centres = Tensor(x[:2])

        def __call__(self, inputs):
            at = ((inputs.unsqueeze(1) - self.centres.unsqueeze(0)).abs().flatten(2).max(2) < 1e-7).any(1).float()
            zero = at.zeros_like()
            return 5 * Tensor.stack(at, 1 - at, zero, zero, dim=1) + 0 * inputs.flatten(1).sum(1, keepdim=True)

    model = WrongOnlyAtTheCentre()
    for restarts in (1, 2):
        x_adv = tg.pgd(model, x, y, eps=0.1, steps=2, restarts=restarts, jit=False)
        np.testing.assert_array_equal(x_adv[:2], x[:2])
        assert predict(model, x_adv).tolist() == [0, 0, 1, 1]
    shift = lambda m, x, y, seed=0: np.clip(x + 0.05, 0, 1)
    assert tg.correct_mask(model, x, y, attack=shift).tolist() == [False, False, True, True]


def test_a_model_returning_more_than_logits_is_one_clear_error(batch, mlp_pair):
    x, y = batch
    _, tiny = mlp_pair
    pair = lambda inputs: (tiny(inputs), inputs)
    for run in (lambda: tg.pgd(pair, x[:4], y[:4], eps=0.1, steps=1, jit=False),
                lambda: tg.correct_mask(pair, x[:4], y[:4])):
        with pytest.raises(RobustlabError, match="returns a tuple; attacks need logits alone"):
            run()


class HalfSpace:
    """Two classes of 1×6×6 images; class 1 wins beyond the boundary <w, x − centre> = threshold. Small shapes that
    tinygrad lowers in a moment, shared by the tests below."""

    def __init__(self, threshold=1.0, seed=0):
        rng = np.random.default_rng(seed)
        self.w = rng.standard_normal(36).astype(np.float32)
        self.centre = rng.uniform(0.3, 0.7, (1, 1, 6, 6)).astype(np.float32)  # steps below 0.3 stay in the box
        self.threshold = threshold

    def __call__(self, inputs):
        score = (inputs.flatten(1) - Tensor(self.centre.reshape(1, -1))).dot(Tensor(self.w)) - self.threshold
        return Tensor.stack(score.zeros_like(), score, dim=1)

    def batch(self, n=16):
        return np.repeat(self.centre, n, 0), np.zeros(n, dtype=np.int32)


def test_pgd_default_step_is_madrys():
    """step_size defaults to 2.5·ε/steps (Madry et al.), as in robustlab.attacks.pgd."""
    model = HalfSpace()
    x, y = model.batch()
    recorder = Recorder(model)
    tg.pgd(recorder, x, y, eps=0.1, steps=4, random_start=False, jit=False)
    np.testing.assert_array_equal(recorder.seen[1], x)  # after the clean check: x, then x after one step
    np.testing.assert_allclose(np.abs(recorder.seen[2] - recorder.seen[1]), 2.5 * 0.1 / 4, rtol=1e-5)


def test_restarts_after_the_first_start_at_random():
    """With random_start=False only the first run starts at x; a later one starting there too would repeat it."""
    model = HalfSpace(threshold=100.0)  # out of reach: nothing breaks
    x, y = model.batch()
    recorder = Recorder(model)
    tg.pgd(recorder, x, y, eps=0.01, steps=1, random_start=False, restarts=2, jit=False)
    assert len(recorder.seen) == 5  # the clean check; per run, its start and the check of its last iterate
    np.testing.assert_array_equal(recorder.seen[1], x)
    assert 0.005 < np.abs(recorder.seen[3] - x).max() <= 0.01 + 1e-6


def test_a_restart_keeps_what_the_last_iterate_of_an_earlier_run_broke():
    """A run's final iterate is checked too: an example only it breaks must not go to the next restart, whose last
    iterate need not break it. Here the first run's single step of ε/2 from x just crosses the boundary, and a run
    from a random start mostly ends short of it."""
    eps = 0.1
    model = HalfSpace()
    model.threshold = 0.999 * eps / 2 * float(np.abs(model.w).sum())
    x, y = model.batch()
    x_adv = tg.pgd(model, x, y, eps=eps, steps=1, step_size=eps / 2, random_start=False, restarts=2, jit=False)
    assert (predict(model, x_adv) == 1).all()
    later = tg.pgd(model, x, y, eps=eps, steps=1, step_size=eps / 2, seed=1, jit=False)  # a random start alone
    assert (predict(model, later) == 0).any()
