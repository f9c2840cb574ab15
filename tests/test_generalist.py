"""Generalist (issue 7): the mixing and EMA formulas, the schedules, one step of the three learners,
redistribution at exactly the configured epochs, exact resume, and the CLI end to end.

Everything runs on one CPU thread in well under a minute: toy models for the formulas and single steps,
cnn-small on a few hundred Fashion-MNIST images for the Trainer and the CLI.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import asdict

import pytest
import torch
from torch import nn

from robustlab import checkpoint, load_model
from robustlab.attacks import within_ball
from robustlab.cli import main as cli
from robustlab.errors import RobustlabError
from robustlab.evaluate import accuracy
from robustlab.data.datasets import Splits
from robustlab.models import build_model
from robustlab.training import StepContext, TrainConfig, Trainer, learning_rate, make_method
from robustlab.training.run import validation_attack
from robustlab.training import generalist as G
from robustlab.training.generalist import Generalist, mix_into, mixing_ratio, warmed_up

FMNIST = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def toy(seed=0):
    """A small conv net with BatchNorm, so that buffers are part of every check."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 13 * 13, 10))


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)  # positive, so running_var stays valid
            else:
                t.fill_(seed)
    return model


# -- formulas ------------------------------------------------------------------------------------

def test_mixing_ratio_and_warm_up():
    assert mixing_ratio(0.0, 2 / 3, 0.4) == 1.0
    assert mixing_ratio(2 / 3, 2 / 3, 0.4) == 1.0
    assert mixing_ratio(5 / 6, 2 / 3, 0.4) == pytest.approx(0.7)
    assert mixing_ratio(1.0, 2 / 3, 0.4) == pytest.approx(0.4)
    assert mixing_ratio(0.5, 0.0, 0.0) == pytest.approx(0.5)
    assert mixing_ratio(0.9, 1.0, 0.0) == 1.0  # never moves
    # the reference's warm-up: 1/10 at the first update, γ once (1 + t)/(10 + t) exceeds it
    assert warmed_up(0.999, 0) == pytest.approx(0.1)
    assert warmed_up(0.999, 90) == pytest.approx(91 / 100)
    assert warmed_up(0.999, 10**6) == 0.999


def test_mix_into_averages_parameters_and_batchnorm_buffers():
    g, a, n = randomize(toy(), 1), randomize(toy(), 2), randomize(toy(), 3)
    before = {k: v.clone() for k, v in g.state_dict().items()}
    decay, beta = 0.9, 0.3
    mix_into(g, a, n, decay, beta)
    sa, sn = a.state_dict(), n.state_dict()
    names = set()
    for name, value in g.state_dict().items():
        if value.is_floating_point():
            expected = decay * before[name] + (1 - decay) * (beta * sa[name] + (1 - beta) * sn[name])
            torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-6)
        else:  # BatchNorm's batch counter follows the adversarial learner
            assert torch.equal(value, sa[name])
        names.add(name.split(".")[-1])
    assert {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"} <= names


def test_mix_into_can_take_batchnorm_statistics_from_the_adversarial_learner_only():
    g, a, n = randomize(toy(), 1), randomize(toy(), 2), randomize(toy(), 3)
    before = {k: v.clone() for k, v in g.state_dict().items()}
    decay, beta = 0.9, 0.3
    mix_into(g, a, n, decay, beta, global_bn="adversarial")
    sa, sn = a.state_dict(), n.state_dict()
    for name in ("1.running_mean", "1.running_var"):
        torch.testing.assert_close(g.state_dict()[name], decay * before[name] + (1 - decay) * sa[name])
    for name in ("0.weight", "1.weight", "1.bias", "4.bias"):  # BatchNorm's affine weights are parameters: mixed
        expected = decay * before[name] + (1 - decay) * (beta * sa[name] + (1 - beta) * sn[name])
        torch.testing.assert_close(g.state_dict()[name], expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(RobustlabError, match="unknown global_bn .natural."):
        Generalist(global_bn="natural")


def test_redistribution_epochs_follow_the_reference_and_scale_with_the_run():
    m = Generalist()
    assert m.redistribution_epochs(120) == list(range(74, 120, 5))  # epochs 75, 80, ..., 120 counted from 1
    assert m.redistribution_epochs(5) == [2, 3, 4]
    assert m.redistribution_epochs(10) == [5, 6, 7, 8, 9]
    assert Generalist(redistribute_every=0).redistribution_epochs(120) == []
    assert Generalist(redistribute_from=0.5, redistribute_every=2).redistribution_epochs(8) == [3, 5, 7]


@pytest.mark.parametrize("kwargs", [{"mix_final": 1.5}, {"mix_start": -0.1}, {"global_decay": 1.0},
                                    {"redistribute_every": -1}, {"redistribute_every": 1.5}, {"nat_lr": 0.0},
                                    {"nat_schedule": "sawtooth"}, {"adv_loss": "mart"}, {"beta": 3.0},
                                    {"redistribute_from": 2.0}, {"nat_weight_decay": -1.0}])
def test_bad_options_are_one_line_errors(kwargs):
    with pytest.raises(RobustlabError) as err:
        Generalist(**kwargs)
    assert "\n" not in str(err.value)


# -- one step ------------------------------------------------------------------------------------

@pytest.mark.parametrize("adv_loss", ["pgd-at", "trades"])
def test_one_step_trains_both_learners_and_mixes_them(adv_loss):
    method = make_method("generalist", "fashion-mnist", "linf", adv_loss=adv_loss, steps=3, step_size=0.04,
                         mix_start=0.0, mix_final=0.3, redistribute_every=0)
    model = toy()
    config = TrainConfig(lr=0.05, weight_decay=5e-4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    run = method.init_run_state(model, config)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    for learner in (run["natural"], run["global"]):  # one initialization for all three
        assert all(torch.equal(v, init[k]) for k, v in learner.state_dict().items())
    ctx = StepContext(model, model, optimizer, torch.Generator().manual_seed(0), contextlib.nullcontext,
                      epoch=0, epochs=2, progress=0.5, run=run)  # the last step of the first of two epochs
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))

    adversarial_inputs, natural_inputs = [], []
    model.register_forward_pre_hook(lambda m, inp: adversarial_inputs.append((m.training, inp[0].detach().clone())))
    run["natural"].register_forward_pre_hook(lambda m, inp: natural_inputs.append((m.training, inp[0].detach().clone())))
    model.train()
    method.train_step(ctx, x, y)

    # the adversarial learner attacks itself in eval mode and trains in train mode on inputs in the ball
    assert any(not training for training, _ in adversarial_inputs) and adversarial_inputs[-1][0]
    parts = [part for _, inp in adversarial_inputs for part in inp.split(len(x))]  # TRADES: one clean+adversarial pass
    assert all(within_ball(part, x, "linf", 0.1, tol=1e-5) for part in parts)
    assert any((part - x).abs().amax() > 0.01 for part in parts)
    # the natural learner: one clean pass in train mode
    assert len(natural_inputs) == 1 and natural_inputs[0][0] and torch.equal(natural_inputs[0][1], x)
    assert run["natural_optimizer"].param_groups[0]["lr"] == pytest.approx(learning_rate("one-cycle", 0.05, 0.5))

    # γ warmed up to 1/10 at the first update, β = 1 + (0.3 − 1)·0.5 in epoch 1 of 2
    decay, beta = 0.1, 0.65
    adv, nat = model.state_dict(), run["natural"].state_dict()
    assert not torch.equal(adv["0.weight"], nat["0.weight"])  # two different learners moved
    for name, value in run["global"].state_dict().items():
        if value.is_floating_point():
            expected = decay * init[name] + (1 - decay) * (beta * adv[name] + (1 - beta) * nat[name])
            torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(run["global"].state_dict()["1.running_mean"], init["1.running_mean"])
    assert run["global_updates"] == 1 and method.eval_model(run) is run["global"]


def test_the_last_epoch_mixes_at_the_final_ratio_from_its_first_step():
    """As the reference's adjust_beta(epoch): β is held for an epoch at its 1-based number, so the last epoch mixes
    at mix_final throughout; moved per step, β only reached it at the run's end."""
    method = make_method("generalist", "fashion-mnist", "linf", steps=2, mix_start=0.0, mix_final=0.3,
                         redistribute_every=0)
    model = toy()
    run = method.init_run_state(model, TrainConfig(lr=0.05))
    init = {k: v.clone() for k, v in model.state_dict().items()}
    ctx = StepContext(model, model, torch.optim.SGD(model.parameters(), lr=0.05), torch.Generator().manual_seed(0),
                      contextlib.nullcontext, epoch=1, epochs=2, progress=0.5, run=run)  # the last epoch's first step
    model.train()
    method.train_step(ctx, torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,)))
    adv, nat, mixed = model.state_dict(), run["natural"].state_dict(), run["global"].state_dict()
    expected = 0.1 * init["0.weight"] + 0.9 * (0.3 * adv["0.weight"] + 0.7 * nat["0.weight"])
    torch.testing.assert_close(mixed["0.weight"], expected, rtol=1e-5, atol=1e-6)


def test_the_natural_learner_has_its_own_learning_rate_schedule_and_weight_decay():
    """--nat-lr, --nat-schedule and --nat-weight-decay reach the natural learner's optimizer, not the adversarial's."""
    method = make_method("generalist", "fashion-mnist", "linf", steps=2, mix_start=0.0, redistribute_every=0,
                         nat_lr=0.02, nat_schedule="cosine", nat_weight_decay=1e-3)
    model = toy()
    run = method.init_run_state(model, TrainConfig(lr=0.05, weight_decay=5e-4, schedule="one-cycle"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    ctx = StepContext(model, model, optimizer, torch.Generator().manual_seed(0), contextlib.nullcontext,
                      epoch=0, epochs=4, progress=0.1, run=run)
    model.train()
    method.train_step(ctx, torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,)))
    group = run["natural_optimizer"].param_groups[0]
    assert group["lr"] == pytest.approx(learning_rate("cosine", 0.02, 0.1))
    assert group["lr"] != pytest.approx(learning_rate("one-cycle", 0.02, 0.1))
    assert group["weight_decay"] == 1e-3 and group["momentum"] == 0.9
    assert {id(p) for p in group["params"]} == {id(p) for p in run["natural"].parameters()}
    assert optimizer.param_groups[0]["weight_decay"] == 5e-4  # the adversarial learner's stays its own


@pytest.mark.parametrize("mix_start,trains", [(0.0, True), (2 / 3, False)])
def test_the_natural_learner_trains_before_the_first_redistribution_if_beta_already_mixes_it_in(mix_start, trains):
    """It idles only while β is 1 until the first redistribution (which overwrites it); when β moves earlier, its
    weights reach the global learner from the start and must train."""
    method = make_method("generalist", "fashion-mnist", "linf", steps=2, mix_start=mix_start, mix_final=0.3,
                         redistribute_from=0.5, redistribute_every=1)
    model = toy()
    run = method.init_run_state(model, TrainConfig(lr=0.05))
    assert method.redistribution_epochs(4) == [1, 2, 3]
    init = {k: v.clone() for k, v in run["natural"].state_dict().items()}
    ctx = StepContext(model, model, torch.optim.SGD(model.parameters(), lr=0.05), torch.Generator().manual_seed(0),
                      contextlib.nullcontext, epoch=0, epochs=4, progress=0.1, run=run)  # before the first one
    model.train()
    method.train_step(ctx, torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,)))
    moved = not torch.equal(run["natural"].state_dict()["0.weight"], init["0.weight"])
    assert moved == trains


def test_recalibration_inputs_follow_the_global_learners_statistics():
    """`rift --bn recalibrate` re-estimates a Generalist model's statistics on what they were measured on."""
    assert Generalist.batchnorm_inputs_of({"global_bn": "mix"}) == "clean+adversarial"
    assert Generalist.batchnorm_inputs_of({"global_bn": "own"}) == "adversarial"
    assert Generalist.batchnorm_inputs_of({"global_bn": "adversarial", "adv_loss": "pgd-at"}) == "adversarial"
    assert Generalist.batchnorm_inputs_of({"global_bn": "adversarial", "adv_loss": "trades"}) == \
        "clean+adversarial joint"


@pytest.mark.parametrize("adv_loss", ["pgd-at", "trades"])
def test_own_statistics_come_from_the_global_learners_pass_on_the_adversarial_examples(adv_loss):
    method = make_method("generalist", "fashion-mnist", "linf", adv_loss=adv_loss, steps=3, step_size=0.04,
                         mix_start=0.0, mix_final=0.3, redistribute_every=0, global_bn="own")
    model = randomize(toy(), 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    run = method.init_run_state(model, TrainConfig(lr=0.05))
    ctx = StepContext(model, model, optimizer, torch.Generator().manual_seed(0), contextlib.nullcontext,
                      epoch=0, epochs=2, progress=0.5, run=run)
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    global_model = run["global"]
    before = {k: v.clone() for k, v in global_model.state_dict().items()}
    seen = []
    global_model.register_forward_pre_hook(lambda m, inp: seen.append((m.training, inp[0].detach().clone())))
    model.train()
    result = method.train_step(ctx, x, y)

    # one train-mode pass on this step's adversarial examples, and the global learner is back in eval mode
    assert len(seen) == 1 and seen[0][0] and not global_model.training
    assert torch.equal(seen[0][1], result.x_adv) and not torch.equal(result.x_adv, x)
    # its statistics: BatchNorm's momentum update from the mixed weights' own activations on them
    state = global_model.state_dict()
    with torch.no_grad():
        conv = nn.functional.conv2d(result.x_adv, state["0.weight"], state["0.bias"], stride=2)
    momentum = global_model[1].momentum
    torch.testing.assert_close(state["1.running_mean"],
                               (1 - momentum) * before["1.running_mean"] + momentum * conv.mean((0, 2, 3)),
                               rtol=1e-5, atol=1e-6)
    assert state["1.num_batches_tracked"] == before["1.num_batches_tracked"] + 1
    # the weights are mixed as with the other settings
    adv, nat = model.state_dict(), run["natural"].state_dict()
    expected = 0.1 * before["0.weight"] + 0.9 * (0.65 * adv["0.weight"] + 0.35 * nat["0.weight"])
    torch.testing.assert_close(state["0.weight"], expected, rtol=1e-5, atol=1e-6)


# -- inside the Trainer --------------------------------------------------------------------------

def small_trainer(fmnist, out, epochs, method_kwargs, **config):
    """cnn-small on 128 training images, validated on 200 (20 under PGD), built as `build_trainer` does."""
    info = fmnist.info
    data = Splits(fmnist.train, fmnist.val.subset(200), fmnist.test, info)
    cfg = TrainConfig(**{"epochs": epochs, "batch_size": 64, "train_n": 128, "val_n": 20, **config})
    method = make_method("generalist", "fashion-mnist", "linf", steps=2, step_size=0.05, **method_kwargs)
    torch.manual_seed(0)
    model = build_model("cnn-small", info.input_shape, info.num_classes, info.mean, info.std)
    meta = {"model": {"name": "cnn-small", "kwargs": {}}, "dataset": asdict(info)}
    return Trainer(model, method, data, cfg, out, meta, val_attack=validation_attack(method, "fashion-mnist", "linf"),
                   show_progress=False)


@pytest.mark.parametrize("per_step", [False, True])
def test_redistribution_happens_at_exactly_the_configured_epochs(fmnist, tmp_path, monkeypatch, per_step):
    # 6 epochs, from half of the run every 2 epochs: epochs 3 and 5 counted from 1 (2 and 4 from 0)
    trainer = small_trainer(fmnist, tmp_path, 6, {"redistribute_from": 0.5, "redistribute_every": 2,
                                          "redistribute_per_step": per_step})
    assert trainer.method.redistribution_epochs(6) == [2, 4]
    init = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    epoch, calls = {}, []
    original_step, original_redistribute, original_mix = Generalist.train_step, G.redistribute, G.mix_into

    def step(self, ctx, x, y):
        epoch["now"], epoch["mixed"] = ctx.epoch, False
        if ctx.epoch == 2 and "idle before" not in epoch:  # the natural learner, as the first redistribution epoch begins
            epoch["idle before"] = all(torch.equal(v, init[k]) for k, v in trainer.run_state["natural"].state_dict().items())
        return original_step(self, ctx, x, y)

    def mix(*args, **kwargs):
        original_mix(*args, **kwargs)
        epoch["mixed"] = True

    def spy(global_model, *learners):
        natural = trainer.run_state["natural"]
        untouched = all(torch.equal(v, init[k]) for k, v in natural.state_dict().items())
        original_redistribute(global_model, *learners)
        assert all(torch.equal(v, global_model.state_dict()[k]) for learner in learners
                   for k, v in learner.state_dict().items())
        assert {id(l) for l in learners} == {id(trainer.model), id(natural)}
        calls.append((epoch["now"], untouched, epoch["mixed"]))

    monkeypatch.setattr(Generalist, "train_step", step)
    monkeypatch.setattr(G, "redistribute", spy)
    monkeypatch.setattr(G, "mix_into", mix)
    trainer.fit()
    per_epoch = 2 if per_step else 1  # 128 images in batches of 64
    assert [e for e, _, _ in calls] == [2] * per_epoch + [4] * per_epoch
    # once per epoch before its first step; per step after each step's mix, as the reference (it once came before)
    assert all(after_mix == per_step for _, _, after_mix in calls), calls
    # β stays 1 until 2/3 of the run, after the first redistribution: the natural learner had nothing to do
    assert epoch["idle before"] and calls[0][1] == (not per_step)  # per step, it trains in the step before the copy
    assert not calls[-1][1]


def test_the_global_learner_is_validated_and_exported(fmnist, tmp_path):
    trainer = small_trainer(fmnist, tmp_path, 2, {"mix_start": 0.0, "mix_final": 0.5})
    trainer.fit()
    tensors, meta = checkpoint.load(tmp_path / "last.safetensors")
    glob = trainer.run_state["global"].state_dict()
    assert all(torch.equal(tensors[f"model.{k}"], v) for k, v in glob.items())
    assert all(torch.equal(tensors[f"raw.{k}"], v) for k, v in trainer.model.state_dict().items())
    assert all(torch.equal(tensors[f"run.natural.{k}"], v) for k, v in trainer.run_state["natural"].state_dict().items())
    assert any(k.startswith("run.natural_optimizer.") for k in tensors) and "natural_optimizer" in meta["run_state"]
    assert not any(k.startswith("run.global.") for k in tensors)  # saved once, as "model."
    assert not torch.equal(tensors["model.net.fc2.weight"], tensors["raw.net.fc2.weight"])
    last = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]
    assert accuracy(trainer.run_state["global"], fmnist.val.subset(200), batch_size=500) == last["val_clean"]
    exported = load_model(tmp_path, "last")
    assert all(torch.equal(v, glob[k]) for k, v in exported.state_dict().items())


class _Killed(Exception):
    pass


def test_resume_reproduces_the_uninterrupted_run(fmnist, tmp_path, monkeypatch):
    # β moves from the start, so the natural learner matters; redistribution at epochs 1 and 2 (from 0)
    kwargs = {"mix_start": 0.2, "mix_final": 0.5, "redistribute_from": 0.5, "redistribute_every": 1,
              "nat_lr": 0.03, "global_decay": 0.99}
    whole = small_trainer(fmnist, tmp_path / "whole", 3, kwargs, batch_size=32)
    assert whole.method.redistribution_epochs(3) == [1, 2]
    whole.fit()

    killed = small_trainer(fmnist, tmp_path / "killed", 3, kwargs, batch_size=32)
    original = Generalist.train_step

    def dies_in_the_second_epoch(self, ctx, x, y):
        if ctx.epoch == 1 and ctx.state.get("generalist_started"):  # after its first step (and redistribution)
            raise _Killed
        return original(self, ctx, x, y)

    monkeypatch.setattr(Generalist, "train_step", dies_in_the_second_epoch)
    with pytest.raises(_Killed):
        killed.fit()
    monkeypatch.undo()
    assert checkpoint.read_metadata(tmp_path / "killed" / "last.safetensors")["epoch"] == 0

    resumed = small_trainer(fmnist, tmp_path / "killed", 3, kwargs, batch_size=32)  # a new process, in effect
    assert resumed.resume() and resumed.start_epoch == 1
    resumed.fit()
    a, meta_a = checkpoint.load(tmp_path / "whole" / "last.safetensors")
    b, meta_b = checkpoint.load(tmp_path / "killed" / "last.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("run.natural.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert meta_a["run_state"] == meta_b["run_state"] and meta_a["run_state"]["global_updates"] == 12
    epochs = [json.loads(l)["epoch"] for l in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2]


# -- the command line ----------------------------------------------------------------------------

def test_cli_trains_generalist_end_to_end(fmnist, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["train", "--method", "generalist", "--data-dir", FMNIST, "--train-n", "256", "--epochs", "2",
              "--steps", "2", "--step-size", "0.05", "--val-n", "50", "--threads", "1"]
    assert cli([*common, "--mix-final", "0.5", "--mix-start", "0.25", "--nat-lr", "0.02", "--nat-schedule", "cosine",
                "--redistribute-every", "1", "--redistribute-per-step", "--adv-loss", "trades", "--beta", "3",
                "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())["method"]
    assert config["name"] == "generalist" and config["mix_final"] == 0.5 and config["nat_schedule"] == "cosine"
    assert config["redistribute_per_step"] is True and config["beta"] == 3.0 and config["adv_loss"] == "trades"
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1] and all(0 <= r["val_clean"] <= 1 for r in rows)
    model = load_model(out, "last")
    tensors, _ = checkpoint.load(out / "last.safetensors")
    assert all(torch.equal(v, tensors[f"model.{k}"]) for k, v in model.state_dict().items())

    capsys.readouterr()
    for bad in (["--ema", "0.99"], ["--beta", "3"], ["--mix-final", "1.5"], ["--adv-loss", "mart"]):
        assert cli([*common, *bad, "--out", str(tmp_path / "bad")]) == 2, bad
        err = capsys.readouterr().err
        assert err.startswith("robustlab: error:") and err.count("\n") == 1, err
    assert cli([*common[:2], "pgd-at", *common[3:], "--mix-final", "0.5", "--out", str(tmp_path / "pgd")]) == 2
    assert "--method pgd-at takes no --mix-final" in capsys.readouterr().err  # named by its flag
