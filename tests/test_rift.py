"""RiFT (issue 6): MRC leaves the model as it was and respects its constraint, fine-tuning touches only the chosen
module (and BatchNorm statistics), interpolation reproduces its endpoints, and α is chosen without the test set."""
import contextlib
import copy
import dataclasses
import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from robustlab import checkpoint, load_model, provenance
from robustlab.attacks import dlr_loss, first_success, pgd
from robustlab.data import Splits
from robustlab.errors import RobustlabError
from robustlab.evaluate import accuracy
from robustlab.models import classifier_modules, fast_memory_format
from robustlab.rift import (AlphaSearch, MRCConfig, RiftSettings, compute_mrc, finetune, interpolate,
                            module_criticality, recalibrate_bn, rift)
from robustlab.rift import TestSettings as ReportSettings  # not a test class
from robustlab.rift import mrc as mrc_module
from robustlab.rift import pipeline as pipeline_module
from robustlab.rift.finetune import CriticalFinetune
from robustlab.rift.mrc import adversarial_set
from robustlab.rift.pipeline import ALPHA_ATTACKS, alpha_check
from robustlab.training import StepContext, TrainConfig, build_trainer
from robustlab.training.trainer import Trainer
from test_methods import lenet

FMNIST = "/usr/share/datasets/fashion-mnist"
THREAT = {"norm": "linf", "eps": 0.1, "steps": 3, "step_size": 0.04}


@pytest.fixture(scope="module")
def small(fmnist):
    return Splits(fmnist.train.subset(256), fmnist.val.subset(120), fmnist.test.subset(40), fmnist.info)


@pytest.fixture(scope="module")
def tiny_run(fmnist, tmp_path_factory):
    """A residual network with BatchNorm (21 Conv/Linear modules, width 8) after one epoch of PGD-2 on 512 images,
    without augmentation (Fashion-MNIST's default is random crops), as the residual network of docs/results.md."""
    out = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    before = torch.get_num_threads()
    trainer = build_trainer(dataset="fashion-mnist", model="preact-resnet18-small", method="pgd-at", out=out,
                            data_dir=FMNIST, model_kwargs={"width": 8}, show_progress=False,
                            config=TrainConfig(epochs=1, train_n=512, val_n=50, threads=1, augment="none"),
                            method_kwargs={"steps": 2, "step_size": 0.05})
    trainer.fit()
    torch.set_num_threads(before)
    return out


@pytest.fixture(scope="module")
def bn_free_run(tmp_path_factory):
    """cnn-small, which has no BatchNorm layers, after one step."""
    out, before = tmp_path_factory.mktemp("bn-free"), torch.get_num_threads()
    build_trainer(dataset="fashion-mnist", model="cnn-small", method="standard", out=out, data_dir=FMNIST,
                  show_progress=False, config=TrainConfig(epochs=1, train_n=32, val_n=10, threads=1)).fit()
    torch.set_num_threads(before)
    return out


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_mrc_restores_the_model_and_keeps_the_constraint(tiny_run, small, one_thread):
    model = load_model(tiny_run)
    x, y = adversarial_set(model, small.val.subset(96), **THREAT)
    model.train()
    model.net.layer1[0].bn1.eval()  # a mixed mode the caller chose must come back as it was
    model.normalize.requires_grad_(False)
    modes = {n: m.training for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = _snapshot(model)

    name = "net.layer2.0.conv1"
    weight = dict(classifier_modules(model))[name].weight
    w0 = weight.detach().clone()
    ratios = []  # ‖Δ‖/‖θ‖ at every evaluation pass, i.e. after each epoch's projection
    hook = dict(model.named_modules())[name].register_forward_pre_hook(
        lambda m, _: None if torch.is_grad_enabled() else ratios.append(((m.weight - w0).norm() / w0.norm()).item()))
    config = MRCConfig(epochs=3, batch_size=32, eps=0.01)
    result = module_criticality(model, name, x, y, config)
    hook.remove()

    assert _same(model.state_dict(), before)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert ratios and max(ratios) <= config.eps * (1 + 1e-5)
    assert max(ratios) > 0.99 * config.eps  # lr 1 ascent reaches the boundary: the projection was active
    assert result["mrc"] > 0 and result["worst_loss"] == pytest.approx(result["loss"] + result["mrc"])
    assert result["worst_accuracy"] <= result["accuracy"]


def test_mrc_is_the_worst_loss_of_all_epochs_not_the_last(monkeypatch):
    model = lenet()
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    # (loss, accuracy) of the set: before the ascent, then after each of the 3 epochs; the ascent peaks in epoch 2
    evaluations = iter([(1.0, 0.5), (1.2, 0.4), (1.9, 0.25), (1.4, 0.3)])
    monkeypatch.setattr(mrc_module, "_loss_and_accuracy", lambda *a, **k: next(evaluations))
    result = module_criticality(model, "net.conv2", x, y, MRCConfig(epochs=3, batch_size=8))
    assert next(evaluations, None) is None  # one evaluation per epoch, every epoch run
    assert result["worst_loss"] == 1.9 and result["worst_accuracy"] == 0.25
    assert result["mrc"] == pytest.approx(0.9) and result["loss"] == 1.0 and result["accuracy"] == 0.5


def test_an_mrc_ascent_inside_the_ball_is_not_pushed_out_to_its_boundary():
    model = lenet()
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    weight = model.net.fc2.weight
    w0 = weight.detach().clone()
    loss = torch.nn.functional.cross_entropy(model.eval()(x), y)
    (grad,) = torch.autograd.grad(loss, weight)
    seen = []
    model.net.fc2.register_forward_pre_hook(
        lambda m, _: None if torch.is_grad_enabled() else seen.append(m.weight.detach().clone()))
    config = MRCConfig(epochs=1, batch_size=16, lr=1e-3, eps=0.5)  # one full-batch step of lr·g, far inside the ball
    module_criticality(model, "net.fc2", x, y, config)
    after = seen[-1]  # the epoch's evaluation pass
    assert (after - w0).norm() < 0.1 * config.eps * w0.norm()
    # a projection, not a rescaling onto the sphere: the step is kept exactly as the ascent made it
    torch.testing.assert_close(after, w0 + config.lr * grad, atol=1e-7, rtol=1e-5)
    assert torch.equal(weight, w0)


def test_the_least_critical_module_ranks_first_and_ties_keep_the_network_order():
    values = [("net.conv1", 0.5), ("net.conv2", 0.1), ("net.fc1", 0.9), ("net.fc2", 0.1), ("net.fc3", 0.0)]
    mrc = {"modules": {name: {"mrc": value} for name, value in values}}
    # RiFT fine-tunes the module whose weights matter least to robustness
    assert mrc_module.ranked(mrc) == ["net.fc3", "net.conv2", "net.fc2", "net.conv1", "net.fc1"]


def test_mrc_is_cached_and_resumes_after_a_kill(tiny_run, small, tmp_path, one_thread, monkeypatch):
    model = load_model(tiny_run)
    config = MRCConfig(n=48, epochs=1)
    first = compute_mrc(model, small.val, tmp_path, source_sha256="abc", threat=THREAT, config=config, show=False)
    names = [n for n, _ in classifier_modules(model)]
    assert list(first["modules"]) == names and len(names) == 21
    # A run killed after 20 modules: only the last is computed again, and the adversarial set is reused.
    saved = json.loads((tmp_path / "mrc.json").read_text())
    del saved["modules"][names[-1]]
    (tmp_path / "mrc.json").write_text(json.dumps(saved))
    calls = []
    real = mrc_module.module_criticality
    monkeypatch.setattr(mrc_module, "module_criticality", lambda m, n, *a, **k: calls.append(n) or real(m, n, *a, **k))
    monkeypatch.setattr(mrc_module, "adversarial_set", lambda *a, **k: pytest.fail("adversarial set regenerated"))
    again = compute_mrc(model, small.val, tmp_path, source_sha256="abc", threat=THREAT, config=config, show=False)
    assert calls == [names[-1]]
    assert again["modules"][names[0]] == first["modules"][names[0]]
    assert again["modules"][names[-1]]["mrc"] == pytest.approx(first["modules"][names[-1]]["mrc"], abs=1e-6)


@pytest.mark.parametrize("bn", ["update", "keep"])
def test_finetuning_changes_only_the_module_and_batchnorm_statistics(tiny_run, small, tmp_path, one_thread, bn):
    model = load_model(tiny_run)
    before = _snapshot(model)
    meta = {k: model.checkpoint_meta[k] for k in ("model", "dataset")}
    tuned, record = finetune(model, "layer3.1.conv2", small, tmp_path, meta, lr=0.05, epochs=1, train_n=128, bn=bn,
                             show=False)
    after = tuned.state_dict()
    assert _same(model.state_dict(), before)  # the robust model itself is untouched
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert "net.layer3.1.conv2.weight" in changed
    stats = {k for k in changed if "running_" in k or "num_batches_tracked" in k}
    assert changed - stats == {"net.layer3.1.conv2.weight"}
    assert bool(stats) == (bn == "update")
    assert record["best_epoch"] == 0 and 0 < record["val_clean"] <= 1
    # A finished run is resumed, not trained again.
    again, _ = finetune(model, "layer3.1.conv2", small, tmp_path, meta, lr=0.05, epochs=1, train_n=128, bn=bn,
                        show=False)
    assert _same(again.state_dict(), after)
    # ...but never from other weights: the folder would mix two models
    other = load_model(tiny_run / "last.safetensors")
    with torch.no_grad():
        next(other.parameters()).add_(0.01)
    with pytest.raises(RobustlabError, match=r"other settings \(weights started from '\w+' → '\w+'\)"):  # said no more
        finetune(other, "layer3.1.conv2", small, tmp_path, meta, lr=0.05, epochs=1, train_n=128, bn=bn, show=False)
    with pytest.raises(RobustlabError, match=r"other settings \(epochs 1 → 2\)"):
        finetune(model, "layer3.1.conv2", small, tmp_path, meta, lr=0.05, epochs=2, train_n=128, bn=bn, show=False)


def test_the_fine_tuned_endpoint_is_the_best_validation_epoch_not_the_last(tiny_run, small, tmp_path, one_thread,
                                                                           monkeypatch):
    # epoch 0 validates best: a fine-tuning that overfits the clean data must not hand its last epoch to α's search
    monkeypatch.setattr(Trainer, "validate", lambda self, epoch: {"val_clean": 0.9 - 0.3 * epoch,
                                                                  "val_robust": 0.9 - 0.3 * epoch})
    model = load_model(tiny_run)
    meta = {k: model.checkpoint_meta[k] for k in ("model", "dataset")}
    tuned, record = finetune(model, "linear", small, tmp_path, meta, lr=0.05, epochs=2, train_n=64, show=False)
    assert record["best_epoch"] == 0 and record["val_clean"] == pytest.approx(0.9)
    best, last = (checkpoint.unprefixed("model.", checkpoint.load(tmp_path / f"{name}.safetensors")[0])
                  for name in ("best", "last"))
    assert not _same(best, last)
    assert _same({k: v.contiguous() for k, v in tuned.state_dict().items()}, best)


def test_fine_tuning_divides_its_learning_rate_by_ten_from_half_its_epochs():
    model = torch.nn.Linear(3, 2)
    method = CriticalFinetune("x", lr=0.01)
    rates = []
    for epoch in range(10):
        ctx = StepContext(model, model, torch.optim.SGD(model.parameters(), lr=1.0), None, contextlib.nullcontext,
                          epoch=epoch, epochs=10)
        method.train_step(ctx, torch.rand(4, 3), torch.tensor([0, 1, 0, 1]))
        rates.append(ctx.optimizer.param_groups[0]["lr"])
    # the reference's MultiStepLR([epochs // 2], gamma 0.1): epochs 0-4 at lr, 5-9 at lr / 10
    assert rates == pytest.approx([0.01] * 5 + [0.001] * 5)


def test_several_modules_fine_tuned_together_are_the_only_ones_changed(tiny_run, small, tmp_path, one_thread):
    model = load_model(tiny_run)
    before = _snapshot(model)
    meta = {k: model.checkpoint_meta[k] for k in ("model", "dataset")}
    tuned, _ = finetune(model, "layer3.1.conv2, net.linear", small, tmp_path, meta, lr=0.05, epochs=1, train_n=128,
                        bn="keep", show=False)
    after = tuned.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"net.layer3.1.conv2.weight", "net.linear.weight", "net.linear.bias"}
    assert pipeline_module.candidate_id("net.layer3.1.conv2,net.linear", 0.01) == "layer3.1.conv2+linear-lr0.01"


def test_interpolation_reproduces_both_endpoints_exactly(tiny_run, small, one_thread):
    model = load_model(tiny_run)
    robust = _snapshot(model)
    tuned = {k: v + torch.randn_like(v) if v.is_floating_point() else v + 7 for k, v in robust.items()}
    # a tensor the fine-tuning drove to near zero: (1 − α)·a + α·b or a + α·(b − a) at α = 1 rounds it to 0, so only
    # an exact endpoint reproduces it (noise of N(0, 1) on small weights round-trips through either formula)
    tuned["net.linear.bias"] = robust["net.linear.bias"] * 1e-9
    assert _same(interpolate(robust, tuned, 0.0), robust)
    assert _same(interpolate(robust, tuned, 1.0), tuned)
    mid = interpolate(robust, tuned, 0.3)
    k = "net.linear.weight"
    assert torch.allclose(mid[k], 0.7 * robust[k] + 0.3 * tuned[k])
    # a tensor the fine-tuning left alone stays bit for bit (0.8·a + 0.2·a rounds away from a in float32)
    untouched = interpolate(robust, {**tuned, k: robust[k]}, 0.2)[k]
    assert torch.equal(untouched, robust[k]) and not torch.equal(0.8 * robust[k] + 0.2 * robust[k], robust[k])
    x = small.val.subset(16).as_float()
    with torch.no_grad():
        reference = model(x)
        model.load_state_dict(interpolate(robust, tuned, 0.0))
        assert torch.equal(model(x), reference)


def _batchnorms(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def test_recalibration_averages_over_the_images_attacked_against_the_model_as_given(tiny_run, small, one_thread):
    model = load_model(tiny_run)
    model.train()
    model.net.layer1[0].bn2.eval()  # a mixed mode the caller chose must come back as it was
    modes = {n: m.training for n, m in model.named_modules()}
    before = _snapshot(model)
    first = _batchnorms(model)[0]  # layer1.0.bn1: its input, conv1's output, does not depend on any statistics
    first.momentum = 0.3
    seen = []

    def attack(m, x, y, generator):  # records the statistics each batch is attacked against
        seen.append(first.running_mean.clone())
        return (x + 0.05 * torch.randn(x.shape, generator=generator)).clamp(0, 1)

    images = small.train.subset(96)
    recalibrate_bn(model, images, attack, batch_size=32)
    assert len(seen) == 3 and all(torch.equal(s, before["net.layer1.0.bn1.running_mean"]) for s in seen)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("running_" in k or "num_batches_tracked" in k for k in changed)
    assert {n: m.training for n, m in model.named_modules()} == modes and first.momentum == 0.3
    assert all(p.grad is None for p in model.parameters())
    # The plain average of the three batches' means, over the attacked images (the same seeds again).
    model.eval()
    inputs = []
    hook = first.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach()))
    with torch.no_grad():
        for i in range(0, 96, 32):
            x = images.images[i:i + 32].float().div(255)
            model(attack(model, x, None, torch.Generator().manual_seed(i)))
    hook.remove()
    expected = torch.stack([x.mean((0, 2, 3)) for x in inputs]).mean(0)
    assert torch.allclose(first.running_mean, expected, atol=1e-5)
    # clean=True (TRADES, MART): each batch also passes unattacked, so six batches count, three of them attacked.
    seen.clear()
    recalibrate_bn(model, images, attack, clean=True, batch_size=32)
    assert len(seen) == 3 and first.num_batches_tracked.item() == 6
    # joint=True (as they train by default): each clean batch and its attacked copy pass together.
    seen.clear()
    recalibrate_bn(model, images, attack, clean=True, joint=True, batch_size=32)
    assert len(seen) == 3 and first.num_batches_tracked.item() == 3


def test_the_pgd_and_dlr_check_keeps_the_first_success_per_image(tiny_run, small, one_thread):
    model = load_model(tiny_run)
    ce = functools.partial(pgd, eps=0.1, norm="linf", steps=3, step_size=0.04, random_start=False)
    dlr = functools.partial(ce, loss_fn=dlr_loss)
    both = first_success(ce, dlr)
    val = small.val.subset(100)
    acc = {name: accuracy(model, val, attack=a) for name, a in (("ce", ce), ("dlr", dlr), ("both", both))}
    assert acc["both"] <= min(acc["ce"], acc["dlr"])
    assert acc["both"] < max(acc["ce"], acc["dlr"])  # each finds images the other misses on this model
    x, y = val.as_float()[:20], val.labels[:20]
    broken_by_ce = model(ce(model, x, y)).argmax(1) != y
    assert torch.equal(both(model, x, y)[broken_by_ce], ce(model, x, y)[broken_by_ce])
    assert not model.training


def test_each_stricter_alpha_check_finds_at_most_the_robust_accuracy_of_the_last(tiny_run, small, tmp_path,
                                                                                 one_thread):
    model = load_model(tiny_run)
    val = small.val.subset(100)
    weak = functools.partial(pgd, eps=0.05, norm="linf", steps=3, step_size=0.02, random_start=False)
    acc = [accuracy(model, val, attack=alpha_check(name, weak, 0.05, "linf"), seed=0) for name in ALPHA_ATTACKS]
    assert acc[0] > acc[1] > acc[2] > 0  # pgd, pgd+dlr, pgd+dlr+apgd-t: each finds images the last missed

    settings = RiftSettings(module="layer4.1.conv2", lr=0.05, epochs=1, train_n=128, val_n=20, bn="keep",
                            alpha_attack="pgd+dlr+apgd-t", mrc=MRCConfig(n=48, epochs=1, batch_size=24))
    report = rift(tiny_run / "best.safetensors", small, tmp_path, settings, test=None, show=False)
    assert report["candidates"][report["chosen"]]["curve_key"]["alpha_attack"] == "pgd+dlr+apgd-t"
    text = (tmp_path / "rift_report.md").read_text()
    assert "then APGD-T" in text
    assert "(the module given with --module)" in text and "paper's pick" not in text  # --module names the candidate


def test_the_tolerance_is_a_fraction_in_python():
    """The command line's --tolerance is in points, RiftSettings.tolerance a fraction: 10 (points) is refused."""
    RiftSettings(tolerance=1.0).validate()
    with pytest.raises(RobustlabError, match="fraction"):
        RiftSettings(tolerance=10).validate()


def test_alpha_rule_takes_the_best_clean_accuracy_within_the_tolerance():
    curve = {f"{a:.2f}": {"clean": c, "robust": r} for a, c, r in
             [(0.0, 0.80, 0.700), (0.1, 0.81, 0.700), (0.2, 0.83, 0.699), (0.3, 0.85, 0.6985), (0.4, 0.86, 0.650),
              (0.5, 0.86, 0.600)]}
    alphas = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
    search = AlphaSearch(None, None, None, None, range(2000), None, curve=curve)  # memoized: only len(val_robust) is read
    assert search.choose(alphas, tolerance=0.001) == 0.2  # 0.3 costs 0.15 point, more than 0.1
    assert search.choose(alphas, tolerance=0.002) == 0.3
    assert search.choose(alphas, tolerance=0.0) == 0.1


def test_alpha_ties_in_clean_accuracy_go_to_the_smaller_alpha():
    curve = {f"{a:.2f}": {"clean": c, "robust": r} for a, c, r in
             [(0.0, 0.80, 0.700), (0.1, 0.84, 0.700), (0.2, 0.84, 0.700), (0.3, 0.84, 0.6995), (0.4, 0.90, 0.600)]}
    search = AlphaSearch(None, None, None, None, range(2000), None, curve=curve)
    # the least fine-tuned model that is as good: nearer to the robust weights
    assert search.choose((0.0, 0.1, 0.2, 0.3, 0.4), tolerance=0.001) == 0.1
    assert search.choose((0.0, 0.2, 0.1, 0.3, 0.4), tolerance=0.001, full=False) == 0.1


def test_an_alpha_that_costs_exactly_the_tolerance_qualifies_despite_float32_rounding():
    """The width-64 TRADES run's curve (5,000 validation images): 3,977 robust at α = 0, 3,972 (0.1 point less)
    at α = 0.3, stored as float32 accuracies, which put 0.7944 a hair below 0.7954 − 0.001."""
    curve = {"0.00": {"clean": 0.8759999871253967, "robust": 0.7954000234603882},
             "0.20": {"clean": 0.881600022315979, "robust": 0.7950000166893005},
             "0.30": {"clean": 0.8823999762535095, "robust": 0.7943999767303467},
             "0.40": {"clean": 0.8844000101089478, "robust": 0.7922000288963318}}
    search = AlphaSearch(None, None, None, None, range(5000), None, curve=curve)
    assert search.choose((0.0, 0.2, 0.3, 0.4), tolerance=0.001) == 0.3
    assert search.choose((0.0, 0.2, 0.3, 0.4), tolerance=0.0008) == 0.2  # 4 images: 0.3's 5 are too many


class NoTestSet:
    def __getattr__(self, name):
        raise AssertionError(f"the test split was read (.{name})")

    def __len__(self):
        raise AssertionError("the test split was read (len)")


def test_the_test_report_takes_ood_from_published_files_when_named(tiny_run, small, tmp_path, one_thread):
    """ReportSettings.cifar_c_dir: the OOD mean of the files as they are (one holding the clean test images scores
    the clean accuracy), cached under its own name beside the generated suite's."""
    from robustlab.protocol import threat_defaults
    folder = tmp_path / "cifar-c"
    folder.mkdir()
    np.save(folder / "labels.npy", np.tile(small.test.labels.numpy(), 5))
    np.save(folder / "identity.npy", np.concatenate([small.test.images.numpy().transpose(0, 2, 3, 1)] * 5))
    state = pipeline_module.State(tmp_path / "state.json", {"path": "x", "sha256": "0"})
    threat = dataclasses.replace(threat_defaults("fashion-mnist", "linf").eval, steps=1, restarts=1)
    row = pipeline_module.evaluate_test(load_model(tiny_run), small, threat_eval=threat, norm="linf",
                                        settings=ReportSettings(aa=False, cifar_c_dir=str(folder)), state=state,
                                        out=tmp_path, show=False)
    assert row["OOD mean (the published CIFAR-C files)"] == row["clean"] and "OOD mean" not in row


def test_alpha_is_chosen_without_reading_the_test_split(tiny_run, small, tmp_path, one_thread):
    data = Splits(small.train, small.val, NoTestSet(), small.info)
    settings = RiftSettings(auto=2, lrs=(0.01, 0.1), lr=0.01, epochs=1, val_n=60,
                            mrc=MRCConfig(n=48, epochs=1, batch_size=24))
    source = tiny_run / "best.safetensors"
    with pytest.raises(AssertionError, match="test split was read"):  # only the final report reads it...
        rift(source, data, tmp_path, settings, ReportSettings(n=20, aa=False, ood=False), show=False)
    assert (tmp_path / "best.safetensors").exists()  # ...after the checkpoint, so after every choice
    report = rift(source, data, tmp_path, settings, test=None, show=False)  # resumed from the caches
    chosen = report["candidates"][report["chosen"]]
    assert len(report["candidates"]) == 4  # the paper's pick, then 2 modules × 2 learning rates less that one
    floor = chosen["curve"]["0.00"]["robust"] - settings.tolerance
    feasible = [p["clean"] for p in chosen["curve"].values() if p.get("robust", -1) >= floor - 1e-9]
    assert chosen["val_robust"] >= floor - 1e-9 and chosen["val_clean"] == max(feasible)
    model = load_model(tmp_path)
    rift_meta = model.checkpoint_meta["rift"]
    assert rift_meta["module"] == chosen["module"] and rift_meta["alpha"] == chosen["alpha"]
    assert set(rift_meta["mrc"]) == {n for n, _ in classifier_modules(model)}
    assert model.checkpoint_meta["config"]["epochs"] == 1  # the source's training, so reports say "epoch 1 of 1"
    assert (tmp_path / "mrc.png").stat().st_size > 1000 and (tmp_path / "alpha.png").stat().st_size > 1000
    assert "Choice on the validation split" in (tmp_path / "rift_report.md").read_text()
    # fine-tuning kept the source run's augmentation (none), not the dataset's default (crops)
    for run in (tmp_path / "finetune").iterdir():
        assert json.loads((run / "last.json").read_text())["config"]["augment"] == "none"


def test_the_automatic_mode_keeps_the_candidate_with_the_best_validation_clean_accuracy(tiny_run, small, tmp_path,
                                                                                        one_thread, monkeypatch):
    """The pipeline's last choice, between candidates, with MRC, fine-tuning and α's search stood in for."""
    names = [n for n, _ in classifier_modules(load_model(tiny_run))]
    mrc = {"modules": {n: {"mrc": 1.0 + i, "seconds": 0.0} for i, n in enumerate(names)}, "adv_set_seconds": 0.0}
    monkeypatch.setattr(pipeline_module, "compute_mrc", lambda *a, **k: copy.deepcopy(mrc))
    for writer in ("plot_mrc", "plot_alpha", "write_report"):
        monkeypatch.setattr(pipeline_module, writer, lambda *a, **k: None)
    tuning = {}

    def fine_tuned(model, module, data, out, run_meta, *, lr, **options):
        tuning.update(module=module, lr=lr)
        tuned = copy.deepcopy(model)
        with torch.no_grad():
            tuned.net.linear.bias += lr  # endpoints of their own, as fine-tuning makes
        return tuned.eval(), {"best_epoch": 0, "val_clean": 0.5, "train_seconds": 0.0, "fit_seconds_this_process": 0.0}

    # each candidate's clean accuracy at its own α; robust accuracy is the same everywhere, so every α qualifies
    clean = {(names[0], 0.01): 0.60, (names[0], 0.1): 0.70, (names[1], 0.01): 0.80, (names[1], 0.1): 0.75}

    class Search:
        def __init__(self, model, robust, tuned, *args, curve, **kwargs):
            self.robust, self.curve, self.score = robust, curve, clean[tuning["module"], tuning["lr"]]

        def choose(self, alphas, tolerance, full=True):
            self.curve.update({f"{a:.2f}": {"clean": self.score if a else 0.5, "robust": 0.3} for a in alphas})
            return 0.5

        def state(self, alpha):
            return self.robust

    monkeypatch.setattr(pipeline_module, "finetune", fine_tuned)
    monkeypatch.setattr(pipeline_module, "AlphaSearch", Search)
    settings = RiftSettings(auto=2, lrs=(0.01, 0.1), lr=0.01, epochs=1)
    report = rift(tiny_run / "best.safetensors", small, tmp_path, settings, test=None, show=False)
    assert report["paper_pick"] == pipeline_module.candidate_id(names[0], 0.01)  # the lowest MRC
    assert len(report["candidates"]) == 4
    # the paper's pick loses to the candidate that validates cleanest: that one is what best.safetensors holds
    assert report["chosen"] == pipeline_module.candidate_id(names[1], 0.01)
    rift_meta = load_model(tmp_path).checkpoint_meta["rift"]
    assert (rift_meta["module"], rift_meta["lr"], rift_meta["val"]["clean"]) == (names[1], 0.01, 0.80)


def test_recalibrate_mode_measures_and_saves_theta_alpha_with_statistics_of_its_own(tiny_run, small, tmp_path,
                                                                                     one_thread, monkeypatch):
    calls = []
    real = pipeline_module.recalibrate_bn
    monkeypatch.setattr(pipeline_module, "recalibrate_bn", lambda *a, **k: calls.append(1) or real(*a, **k))
    settings = RiftSettings(module="layer4.1.conv2", lr=0.05, epochs=1, train_n=128, val_n=40, bn="recalibrate",
                            recal_n=64, tolerance=1.0, mrc=MRCConfig(n=48, epochs=1, batch_size=24))
    source = tiny_run / "best.safetensors"
    report = rift(source, small, tmp_path, settings, test=None, show=False)
    assert len(calls) == 10  # once per α > 0, although clean and robust accuracy are both measured at each
    alpha = report["rift"]["alpha"]
    assert alpha > 0 and report["rift"]["recal_n"] == 64
    run = next((tmp_path / "finetune").iterdir())
    assert json.loads((run / "last.json").read_text())["method"]["bn"] == "keep"  # statistics fixed while tuning

    robust = load_model(source)
    expected = load_model(source)
    tuned = load_model(run / "best.safetensors")
    expected.load_state_dict(interpolate(robust.state_dict(), tuned.state_dict(), alpha))
    # in RiFT's layout: ten sign steps turn the two layouts' rounding differences into other iterates
    expected = expected.to(memory_format=fast_memory_format(expected, torch.device("cpu")))
    interpolated = _snapshot(expected)
    # the protocol's PGD-10, its last iterates as in training (not the first iterate that fools the model)
    attack = functools.partial(pgd, eps=0.1, norm="linf", steps=10, step_size=0.025, keep_best=False)
    recalibrate_bn(expected, small.train.subset(64), attack)
    saved = load_model(tmp_path).state_dict()
    for k, v in expected.state_dict().items():
        assert torch.allclose(saved[k].float(), v.float(), atol=1e-5), k
        if "running_" in k:
            assert not torch.allclose(v, interpolated[k]), k  # re-estimated, not interpolated


def test_a_new_fine_tuning_is_measured_afresh_along_alpha(tiny_run, small, tmp_path, one_thread):
    """The α curve belongs to one fine-tuned endpoint: after its run is removed and fine-tuned again with other
    settings (as the refusal of a changed fine-tuning advises), the cached curve of the old one was reused."""
    settings = RiftSettings(module="linear", lr=0.05, epochs=1, train_n=128, val_n=40, tolerance=1.0,
                            mrc=MRCConfig(n=48, epochs=1, batch_size=24))  # the classifier: its accuracy moves
    source = tiny_run / "best.safetensors"
    first = rift(source, small, tmp_path, settings, test=None, show=False)
    shutil.rmtree(tmp_path / "finetune")
    report = rift(source, small, tmp_path, dataclasses.replace(settings, epochs=2, batch_size=16), test=None,
                  show=False)
    tuned = load_model(next((tmp_path / "finetune").iterdir()) / "best.safetensors")
    old, new = (r["candidates"][r["chosen"]]["curve"]["1.00"]["clean"] for r in (first, report))
    assert new == accuracy(tuned, small.val.subset(40)) != old  # θ(1) is the new endpoint


def test_an_out_folder_never_holds_two_checkpoints_results(tiny_run, small, tmp_path, one_thread, monkeypatch):
    """A first run killed while fine-tuning had written no rift_state.json, so a second run on another checkpoint
    into the same --out resumed the first one's fine-tuning and interpolated toward it."""
    class Killed(Exception):
        pass

    def killed(*args, **kwargs):
        raise Killed
    monkeypatch.setattr(pipeline_module, "finetune", killed)
    settings = RiftSettings(module="layer4.1.conv2", epochs=1, train_n=64, val_n=40,
                            mrc=MRCConfig(n=48, epochs=1, batch_size=24))
    with pytest.raises(Killed):
        rift(tiny_run / "best.safetensors", small, tmp_path, settings, test=None, show=False)
    with pytest.raises(RobustlabError, match="holds RiFT results for another checkpoint"):
        rift(tiny_run / "last.safetensors", small, tmp_path, settings, test=None, show=False)


@pytest.mark.parametrize("args,words", [
    (["rift", "no/such/run", "--out", "OUT"], ["no/such/run"]),
    (["mrc", "no/such/run"], ["no/such/run"]),
    (["rift", "RUN", "--module", "layer9.conv7", "--out", "OUT"], ["module", "net.linear"]),
    (["rift", "RUN", "--module", "linear,net.layer1.0.conv1,net.linear", "--out", "OUT"], ["module", "twice"]),
    (["rift", "RUN", "--bn", "sometimes", "--out", "OUT"], ["bn", "keep", "recalibrate"]),
    (["rift", "RUN", "--lrs", "0.1,fast", "--out", "OUT"], ["--lrs"]),
    (["rift", "RUN", "--alpha-attack", "apgd", "--out", "OUT"], ["alpha attack", "pgd+dlr"]),
    (["mrc", "RUN", "--mrc-n", "0"], ["mrc-n"]),
    (["rift", "RUN", "--out", "FILE"], ["--out", "cannot make a folder"]),  # a traceback before
    (["rift", "RUN", "--out", "RUN"], ["best.safetensors", "overwrite", "--out"]),  # it overwrote the robust model
    # options the rest of the command switches off were ignored without a word
    (["rift", "RUN", "--out", "OUT", "--no-test", "--n", "50", "--no-aa"], ["--n, --no-aa", "--no-test"]),
    (["rift", "RUN", "--out", "OUT", "--no-aa", "--aa-steps", "10"], ["--aa-steps", "--no-aa"]),
    (["rift", "RUN", "--out", "OUT", "--recal-n", "100"], ["--recal-n", "--bn recalibrate"]),
    (["rift", "RUN", "--out", "OUT", "--no-test", "--cifar-c-dir", "CIFARC"], ["--cifar-c-dir applies", "--no-test"]),
    (["rift", "RUN", "--out", "OUT", "--no-ood", "--cifar-c-dir", "CIFARC"], ["--cifar-c-dir", "--no-ood skips"]),
    # corruption files of other images: refused before the fine-tuning, not at the report after it
    (["rift", "RUN", "--out", "OUT", "--cifar-c-dir", "CIFARC"],
     ["fog in", "holds 4 images of shape (3, 32, 32) per severity; the dataset's are of shape (1, 28, 28)"]),
    (["rift", "RUN", "--out", "OUT", "--lrs", "0.01,0.1"], ["--lrs", "--auto"]),
    (["rift", "BNFREE", "--out", "OUT", "--bn", "keep"], ["--bn keep", "no BatchNorm"]),
    (["mrc", "RUN", "--out", "FILE"], ["--out", "cannot make a folder"]),
    (["rift", "RUN", "--out", "OUT", "--mrc-dir", "FILE"], ["--mrc-dir", "cannot make a folder"]),  # a traceback
    (["rift", "RUN", "--module", "", "--out", "OUT"], ["--module is empty"]),  # took the lowest MRC silently
    # beyond the modules or the data: cut down to them without a word
    (["rift", "RUN", "--out", "OUT", "--auto", "22"], ["--auto 22 is more than the 21 modules", "give at most 21"]),
    (["mrc", "RUN", "--mrc-n", "5001"], ["--mrc-n 5001 is more than the 5000 validation images; give at most 5000"]),
    (["rift", "RUN", "--out", "OUT", "--mrc-n", "5001"], ["--mrc-n 5001 is more than the 5000 validation images"]),
    (["rift", "RUN", "--out", "OUT", "--train-n", "55001"], ["--train-n 55001 is more than the 55000 training images"]),
    (["rift", "RUN", "--out", "OUT", "--val-n", "5001"], ["--val-n 5001 is more than the 5000 validation images"]),
    (["rift", "RUN", "--out", "OUT", "--bn", "recalibrate", "--recal-n", "55001"],
     ["--recal-n 55001 is more than the 55000 training images; give at most 55000"]),
    (["rift", "RUN", "--out", "OUT", "--n", "10001"], ["--n 10001 is more than the 10000 test images"]),
    (["rift", "RUN", "--out", "OUT", "--n", "30", "--aa-n", "31"],
     ["--aa-n 31 is more than the 30 test images of the report (--n 30); give at most 30"]),
])
def test_bad_input_is_one_line_and_status_2(tiny_run, bn_free_run, tmp_path, run_cli, args, words):
    (tmp_path / "file").write_text("")
    (cifar_c := tmp_path / "cifar-c").mkdir()  # 4 colour images per severity
    np.save(cifar_c / "labels.npy", np.zeros(20, dtype=np.int64))
    np.save(cifar_c / "fog.npy", np.zeros((20, 32, 32, 3), dtype=np.uint8))
    stand_ins = {"RUN": tiny_run, "BNFREE": bn_free_run, "OUT": tmp_path / "out", "FILE": tmp_path / "file",
                 "CIFARC": cifar_c}
    result = run_cli(*(stand_ins.get(a, a) for a in args), "--data-dir", FMNIST)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("robustlab: error:"), lines
    assert all(w in lines[0] for w in words), lines[0]
    assert not (tmp_path / "out").exists()  # nothing was started
    assert "rift" not in checkpoint.read_metadata(tiny_run / "best.safetensors")


def test_cli_mrc_then_rift_writes_checkpoint_and_report(tiny_run, tmp_path, run_cli):
    common = ["--mrc-n", "48", "--mrc-epochs", "1", "--threads", "1", "--data-dir", FMNIST]
    result = run_cli("mrc", str(tiny_run), "--json", *common)
    assert result.returncode == 0, result.stderr
    ranking = json.loads(result.stdout)["ranking"]
    assert len(ranking) == 21 and (tiny_run / "mrc" / "mrc.png").exists()
    out = tmp_path / "rift"
    result = run_cli("rift", str(tiny_run), "--out", str(out), "--epochs", "1", "--train-n", "128", "--val-n", "50",
                       "--n", "30", "--aa-steps", "2", "--aa-queries", "10", "--no-ood", *common)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "rift_report.json").read_text())
    assert report["rift"]["module"] == ranking[0]  # the paper's pick; the MRC came from RUN/mrc's cache
    assert set(report["test"]["original"]) >= {"clean", "PGD-50×3", "AutoAttack"}
    meta = checkpoint.read_metadata(out / "best.safetensors")
    assert meta["rift"]["alpha"] == report["rift"]["alpha"] and meta["model"]["kwargs"] == {"width": 8}
    assert meta["epochs_total"] == checkpoint.read_metadata(tiny_run / "best.safetensors")["epochs_total"]
    assert "Test set, before and after" in (out / "rift_report.md").read_text()
    assert report["machine"] == meta["machine"] == provenance.machine() and report["commit"] == provenance.commit()
    # the console names AutoAttack's lowered budget too, as the report does (it printed "AutoAttack 15.00%")
    assert "AutoAttack-standard (30 images, off-protocol: 2 steps, 10 queries)" in result.stdout
    # other AutoAttack settings on the same --out: the run once stopped at its end on the first one's saved state
    again = run_cli("rift", str(tiny_run), "--out", str(out), "--epochs", "1", "--train-n", "128", "--val-n", "50",
                      "--n", "30", "--aa-steps", "3", "--aa-queries", "10", "--no-ood", *common)
    assert again.returncode == 0, again.stderr
    # a training run pointed at the result would overwrite it (it has no last.safetensors to protect it)
    again = run_cli("train", "--data-dir", FMNIST, "--train-n", "64", "--epochs", "1", "--out", str(out))
    assert again.returncode == 2 and "already holds a model" in again.stderr, again.stderr


def _rift_bn(*args):
    script = str(Path(__file__).resolve().parents[1] / "experiments" / "rift_bn.py")
    return subprocess.run([sys.executable, script, *args, "--threads", "1"], capture_output=True, text=True,
                          timeout=600)


def test_rift_bn_script_reads_the_runs_own_data_and_refuses_a_model_without_batchnorm(tiny_run, bn_free_run):
    done = _rift_bn(str(tiny_run), "--n", "64", "--val-n", "32")
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout.splitlines()[-1])
    assert set(figures) == {"original", "BN statistics of clean training images",
                            "BN statistics of PGD-10 training images"}
    # the statistics are the only change, and they change what the model predicts
    assert figures["original"] != figures["BN statistics of clean training images"]
    refused = _rift_bn(str(bn_free_run))
    assert refused.returncode != 0 and "no BatchNorm layer" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def test_criticality_refuses_images_outside_the_box():
    """x·255 gave an MRC of 191 without a word; uint8 images and list labels failed inside torch."""
    from robustlab.rift.mrc import module_criticality
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x, y = torch.rand(6, 1, 2, 2), torch.tensor([0, 1, 2, 0, 1, 2])
    for bad_x, bad_y, words in ((x * 255, y, r"\[0, 1\]"), ((x * 255).byte(), y, "uint8"), (x, [0] * 6, "list")):
        with pytest.raises(RobustlabError, match=words):
            module_criticality(net, "1", bad_x, bad_y, MRCConfig(epochs=1, batch_size=3))


def test_an_evaluated_rift_result_says_it_is_one():
    """Its report and `robustlab summary` named it by its source's method and epoch alone: a plain PGD-AT run."""
    import time
    from robustlab.evaluate.cli import _results
    meta = {"model": {"name": "cnn-small"}, "dataset": {"name": "fashion-mnist"}, "method": {"name": "pgd-at"},
            "epoch": 9, "epochs_total": 10, "rift": {"module": "net.fc1", "alpha": 0.3}}
    run = _results(meta, 0.8, 0.7, 10, "PGD", time.perf_counter(), attack={})["run"]
    assert run["method"] == "pgd-at + RiFT (net.fc1, α 0.3)" and run["epoch"] == 9


def test_the_result_checkpoint_records_the_choice_it_was_made_from(tiny_run, small, tmp_path, one_thread, monkeypatch):
    """best.safetensors' metadata, which `robustlab eval` and `summary` read: the chosen α's validation figures
    (clean and robust under their own names), the original's robust figure at α = 0, the validation images they
    were measured on (--val-n), the source's epoch, and that no automatic mode ran. Modules fine-tuned together
    show the largest of their MRCs; α's curve is measured afresh on other validation images."""
    names = [n for n, _ in classifier_modules(load_model(tiny_run))]
    mrc = {"modules": {n: {"mrc": 1.0 + i, "seconds": 0.0} for i, n in enumerate(names)}, "adv_set_seconds": 0.0}
    monkeypatch.setattr(pipeline_module, "compute_mrc", lambda *a, **k: copy.deepcopy(mrc))
    for writer in ("plot_mrc", "plot_alpha", "write_report"):
        monkeypatch.setattr(pipeline_module, writer, lambda *a, **k: None)
    monkeypatch.setattr(pipeline_module, "finetune", lambda model, *a, **k: (
        copy.deepcopy(model).eval(), {"best_epoch": 0, "val_clean": 0.5, "train_seconds": 0.0}))
    # clean accuracy rises with α, robust accuracy falls from 0.40 at α = 0: the search stand-in picks α = 0.3
    figures = {a: {"clean": 0.70 + a / 10, "robust": 0.40 - a / 10} for a in pipeline_module.ALPHAS}

    curves = []

    class Search:
        def __init__(self, model, robust, tuned, *args, curve, **kwargs):
            self.robust, self.curve = robust, curve
            curves.append(dict(curve))  # what the cache held

        def choose(self, alphas, tolerance, full=True):
            self.curve.update({f"{a:.2f}": figures[a] for a in alphas})
            return 0.3

        def state(self, alpha):
            return self.robust
    monkeypatch.setattr(pipeline_module, "AlphaSearch", Search)
    settings = RiftSettings(module=f"{names[2]},{names[0]}", epochs=1, val_n=30)
    report = rift(tiny_run / "best.safetensors", small, tmp_path, settings, test=None, show=False)
    meta = checkpoint.read_metadata(tmp_path / "best.safetensors")
    assert meta["rift"]["val"] == {"clean": pytest.approx(0.73), "robust": pytest.approx(0.37),
                                   "robust_original": pytest.approx(0.40), "images": 30}
    assert meta["metrics"] == {"val_clean": pytest.approx(0.73), "val_robust": pytest.approx(0.37)}
    assert meta["rift"]["automatic"] is False and report["rift"] == meta["rift"]
    assert meta["rift"]["module"] == f"{names[2]},{names[0]}" and report["candidates"][report["chosen"]]["mrc"] == 3.0
    assert meta["rift"]["mrc"] == {n: r["mrc"] for n, r in mrc["modules"].items()}
    assert meta["epoch"] == checkpoint.read_metadata(tiny_run / "best.safetensors")["epoch"]
    rift(tiny_run / "best.safetensors", small, tmp_path, dataclasses.replace(settings, val_n=60), test=None,
         show=False)
    assert curves[-1] == {} and checkpoint.read_metadata(tmp_path / "best.safetensors")["rift"]["val"]["images"] == 60


def test_test_set_figures_are_cached_per_weights_and_settings_and_the_same_weights_measured_once(tmp_path,
                                                                                                  monkeypatch):
    """A resumed RiFT run measures nothing twice; other test settings (--n, AutoAttack's budget) measure afresh, with
    an AutoAttack state of their own; a model with the weights of another is reported as such."""
    from robustlab.data import ImageSet
    from robustlab.protocol import threat_defaults
    calls = []
    monkeypatch.setattr(pipeline_module, "accuracy", lambda model, data, attack=None, **k: calls.append(
        ("pgd" if attack else "clean", len(data))) or 0.5)

    class Result:
        robust_accuracy = 0.25

    def autoattack_accuracy(model, data, eps, norm, *, n, steps, state_path, **k):
        calls.append(("AutoAttack", n, steps, state_path.name))
        return Result
    monkeypatch.setattr(pipeline_module, "autoattack_accuracy", autoattack_accuracy)
    state = pipeline_module.State(tmp_path / "rift_state.json", {"path": "x.safetensors", "sha256": "0"})
    test = ImageSet(torch.zeros(12, 1, 2, 2, dtype=torch.uint8), torch.zeros(12, dtype=torch.long))
    data = Splits(None, None, test, None)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    budget = threat_defaults("fashion-mnist", "linf")  # its evaluation PGD-50×3

    def measure(models=None, **settings):
        return pipeline_module._test_report(models or {"original": model}, data, budget, "linf",
                                            ReportSettings(ood=False, **settings), state, tmp_path, False, {})
    first = measure(n=8, aa_n=20, aa_steps=2)["original"]
    aa_call = calls[-1]
    assert [c[:2] for c in calls] == [("clean", 8), ("pgd", 8), ("AutoAttack", 20)]
    assert (first["clean"], first["PGD-50×3"], first["AutoAttack"], first["aa_n"]) == (0.5, 0.5, 0.25, 8)
    calls.clear()
    assert measure(n=8, aa_n=20, aa_steps=2)["original"] == first and calls == []  # resumed: all from the cache
    measure(n=8, aa_n=20, aa_steps=3)
    assert [c[0] for c in calls] == ["clean", "pgd", "AutoAttack"]  # another budget: measured afresh...
    assert calls[-1][2] == 3 and calls[-1][3] != aa_call[3]  # ...with an AutoAttack state of its own
    calls.clear()
    twin = copy.deepcopy(model)
    results = measure({"original": model, "rift": twin}, n=8, aa_n=20, aa_steps=3)
    assert calls == [] and results["rift"]["same_weights_as"] == "original"
    assert "same_weights_as" not in results["original"]


def test_the_command_line_hands_rift_its_options_in_rifts_units(tiny_run, tmp_path, run_cli, monkeypatch):
    """--tolerance is in points, RiftSettings.tolerance a fraction; --auto may name every module RiFT can fine-tune
    (21 here); the MRC cache is RUN/mrc, which `robustlab mrc RUN` shares."""
    seen = {}

    class Started(Exception):
        pass

    def rift_stand_in(source, data, out, settings, test, **kwargs):
        seen.update(settings=settings, test=test, **kwargs)
        raise Started
    monkeypatch.setattr(pipeline_module, "rift", rift_stand_in)
    with pytest.raises(Started):
        run_cli("rift", tiny_run, "--out", tmp_path / "out", "--auto", "21", "--tolerance", "0.5", "--momentum", "0.5",
                "--seed", "3", "--test-batch-size", "64", "--data-dir", FMNIST)
    settings = seen["settings"]
    assert settings.tolerance == pytest.approx(0.005) and settings.auto == 21 and settings.momentum == 0.5
    assert settings.seed == settings.mrc.seed == 3
    assert seen["test"].batch_size == 64 and seen["mrc_dir"] == tiny_run / "mrc"


def test_the_report_states_the_change_the_budget_the_epoch_and_the_tolerance_as_people_read_them(tmp_path):
    """rift_report.md from a report's dictionary: RiFT minus the original in points, AutoAttack at the protocol's
    budget named without "off-protocol", the fine-tuned epoch counted from 1, the tolerance in points."""
    from robustlab.rift.report import write_report
    cid = "layer1.0.conv1-lr0.001"
    candidate = {"module": "net.layer1.0.conv1", "lr": 0.001, "mrc": 0.1, "alpha": 0.3, "val_clean": 0.82,
                 "val_robust": 0.4, "finetune": {"best_epoch": 2, "val_clean": 0.81}}
    row = {"weights": "0", "n": 40, "aa_n": 20, "seconds": {}}
    report = {"source": {"path": "run/best.safetensors", "model": {"name": "cnn-small"}, "method": "pgd-at"},
              "dataset": "fashion-mnist", "norm": "linf", "settings": {"module": None, "tolerance": 0.001},
              "test_settings": {"aa_steps": 100, "aa_queries": 5000}, "paper_pick": cid, "chosen": cid,
              "rift": {"module": candidate["module"], "alpha": 0.3, "lr": 0.001, "bn": "update", "automatic": False,
                       "val": {"images": 50, "robust_original": 0.405}},
              "mrc": {"key": {"n": 48, "attack": {"steps": 10}, "mrc": {"eps": 0.1}},
                      "original": {"loss": 1.0, "accuracy": 0.4},
                      "modules": {"net.layer1.0.conv1": {"mrc": 0.1, "worst_accuracy": 0.3, "weights": 72}}},
              "mrc_ranking": ["net.layer1.0.conv1"], "candidates": {cid: candidate}, "alpha_check": "",
              "test": {"original": {**row, "clean": 0.8, "AutoAttack": 0.4},
                       "rift": {**row, "clean": 0.82, "AutoAttack": 0.385}},
              "wall_s": {"MRC": 1.0}}
    write_report(tmp_path, report)
    text = (tmp_path / "rift_report.md").read_text()
    assert "| clean | 80.00% | 82.00% | +2.00 points |" in text
    assert "| AutoAttack-standard (20 images) | 40.00% | 38.50% | -1.50 points |" in text
    assert "≥ the original's − 0.1 point (50 images" in text
    assert f"| `{cid}` (chosen) (the paper's pick) | 0.1000 | 3 (81.00%) | 0.3 | 82.00% | 40.00% |" in text
    assert json.loads((tmp_path / "rift_report.json").read_text())["chosen"] == cid
