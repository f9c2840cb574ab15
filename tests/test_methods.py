"""The adversarial-training family (issue 5): Fast-AT, FreeAT, YOPO, TRADES, MART, AWP.

Mechanics are checked on single steps (ε-balls, pass counts, AWP's weight restore, hooks of the
Trainer); learning is checked by fine-tuning one normally trained LeNet on 512 Fashion-MNIST images
for two epochs with each method. Everything runs on one CPU thread within about a minute.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import pickle
from dataclasses import asdict
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from robustlab import load_model
from robustlab.attacks import perturb, pgd, within_ball
from robustlab.data.datasets import Splits
from robustlab.errors import RobustlabError
from robustlab.evaluate.accuracy import accuracy
from robustlab.models import build_model
from robustlab.training import METHODS, Standard, StepContext, StepResult, TrainConfig, Trainer, make_method
from robustlab.training.awp import PGDATAWP, TRADESAWP, perturbed_weights
from robustlab.training.fast_at import FastAT
from robustlab.training.free_at import FreeAT
from robustlab.training.run import validation_attack
from robustlab.training.trades import TRADES, kl_to_target
from robustlab.training.yopo import YOPO, is_affine_up_to, recorded_output

FAMILY = ("fast-at", "free-at", "yopo", "trades", "mart", "pgd-at-awp", "trades-awp")
EPS = {"linf": 0.1, "l2": 1.5}  # the protocol's Fashion-MNIST budgets


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def lenet(seed=0, shape=(1, 28, 28)):
    torch.manual_seed(seed)
    return build_model("lenet", shape, 10, [0.286] * shape[0], [0.353] * shape[0])


def context(model, lr=0.05, momentum=0.9, seed=0, epoch=0, epochs=1):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    return StepContext(model, model, opt, torch.Generator().manual_seed(seed), contextlib.nullcontext,
                       epoch=epoch, epochs=epochs)


@pytest.fixture(scope="module")
def batch(fmnist):
    return fmnist.train.subset(64).as_float(), fmnist.train.labels[:64]


@contextlib.contextmanager
def counting(module, forward=True, backward=True):
    """Count forward and backward passes through `module`."""
    counts = {"forward": 0, "backward": 0}
    handles = []
    if forward:
        handles.append(module.register_forward_hook(lambda *a: counts.__setitem__("forward", counts["forward"] + 1)))
    if backward:
        handles.append(module.register_full_backward_hook(lambda *a: counts.__setitem__("backward", counts["backward"] + 1)))
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


# -- construction -------------------------------------------------------------------------------

def test_registry_names_and_protocol_defaults():
    assert set(FAMILY) <= set(METHODS)
    for norm, eps in EPS.items():
        for name in FAMILY:
            m = make_method(name, "fashion-mnist", norm)
            assert (m.eps, m.norm) == (eps, norm)
            json.dumps(m.config())  # goes into checkpoint metadata
            pickle.dumps(m)         # hyper-parameters only: can be shipped to DDP workers
        assert make_method("fast-at", "fashion-mnist", norm).step_size == pytest.approx(1.25 * eps)
        assert make_method("free-at", "fashion-mnist", norm).step_size == pytest.approx(eps)
    assert make_method("fast-at", "fashion-mnist", "linf", step_size=0.1).step_size == 0.1
    assert make_method("fast-at", "fashion-mnist", "linf", eps=0.2).step_size == pytest.approx(0.25)
    yopo = make_method("yopo", "fashion-mnist", "linf", outer=3, inner=2)
    assert (yopo.outer, yopo.inner, yopo.step_size) == (3, 2, 0.025)
    assert make_method("trades", "fashion-mnist", "linf").beta == 6.0
    assert make_method("mart", "fashion-mnist", "linf", beta=5.0).beta == 5.0
    assert make_method("pgd-at-awp", "fashion-mnist", "linf").awp_gamma == 0.01
    assert make_method("trades-awp", "fashion-mnist", "linf").awp_gamma == 0.005
    assert make_method("free-at", "fashion-mnist", "linf", replays=4).replays == 4
    assert make_method("standard", "fashion-mnist", "linf", eps=0.3).config() == {}


@pytest.mark.parametrize("name, option", [("fast-at", {"steps": 5}), ("trades", {"replays": 2}),
                                          ("yopo", {"beta": 6.0})])
def test_unknown_option_is_a_one_line_error(name, option):
    with pytest.raises(RobustlabError) as err:
        make_method(name, "fashion-mnist", "linf", **option)
    assert "\n" not in str(err.value) and next(iter(option)) in str(err.value)


@pytest.mark.parametrize("kwargs", [{"replays": 0}, {"replays": 1.5}])
def test_free_at_rejects_bad_replays(kwargs):
    with pytest.raises(RobustlabError):
        FreeAT(**kwargs)


def test_bad_hyper_parameters_are_errors():
    for build in (lambda: YOPO(outer=0), lambda: FastAT(co_drop=1.5), lambda: FastAT(co_ratio=0),
                  lambda: TRADESAWP(awp_warmup=2),
                  lambda: PGDATAWP(awp_gamma=-1), lambda: make_method("trades", "fashion-mnist", "linf", beta=-1),
                  lambda: PGDATAWP(awp_gamma=float("nan")),  # nan fails `< 0` as well as `>= 0`
                  lambda: make_method("trades", "fashion-mnist", "linf", beta=float("nan"))):
        with pytest.raises(RobustlabError):
            build()


def test_one_step_methods_are_validated_with_pgd10():
    for name in ("fast-at", "free-at", "yopo"):
        attack = validation_attack(make_method(name, "fashion-mnist", "linf"), "fashion-mnist", "linf")
        assert (attack.keywords["steps"], attack.keywords["step_size"]) == (10, pytest.approx(0.025))


# -- every input a model sees during a step lies in the threat model -----------------------------

@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("name", FAMILY)
def test_examples_stay_inside_the_ball(name, norm, batch):
    x, y = batch
    model = lenet()
    method = make_method(name, "fashion-mnist", norm)
    before = pickle.dumps(method)
    seen = []
    model.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].detach().clone()))
    ctx = context(model, epoch=1, epochs=2)
    for xb, yb in ((x[:32], y[:32]), (x[32:], y[32:])):  # two batches: FreeAT carries δ over
        seen.clear()
        method.train_step(ctx, xb, yb)
        assert seen, "the model saw no input"
        seen[:] = [part for inputs in seen for part in inputs.split(len(xb))]  # a joint clean+adversarial pass
        for inputs in seen:
            assert within_ball(inputs, xb, norm, EPS[norm], tol=1e-5)
        assert any((inputs - xb).abs().amax() > EPS[norm] / 10 for inputs in seen), "no perturbation at all"
    assert pickle.dumps(method) == before, "a method must keep no per-run state on itself (ctx.state is for that)"


@pytest.mark.parametrize("name", ["standard", "pgd-at", *FAMILY])
def test_batchnorm_inputs_names_what_the_model_sees_in_train_mode(name, batch):
    """RiFT's --bn recalibrate re-estimates a model's statistics on the kind of input its method declares."""
    x, y = batch
    model = lenet()
    method = make_method(name, "fashion-mnist", "linf")
    ctx = context(model, epoch=1, epochs=2)
    method.train_step(ctx, x[:32], y[:32])  # FreeAT's first replay starts from δ = 0: look at a later batch
    xb, kinds = x[32:], set()

    def kind(inputs):
        if torch.equal(inputs, xb):
            return "clean"
        return "joint" if len(inputs) == 2 * len(xb) and torch.equal(inputs[:len(xb)], xb) else "adversarial"

    model.register_forward_pre_hook(lambda m, inputs: kinds.add(kind(inputs[0])) if m.training else None)
    method.train_step(ctx, xb, y[32:])
    declared = method.batchnorm_inputs_of(method.config())
    assert kinds == ({"joint"} if declared.endswith(" joint") else set(declared.split("+")))


def test_free_at_resets_delta_when_the_batch_size_changes(batch):
    x, y = batch
    model, method = lenet(), FreeAT(replays=2)
    ctx = context(model)
    method.train_step(ctx, x, y)
    assert ctx.state["free_at_delta"].abs().amax() > 0
    seen = []
    model.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].detach().clone()))
    method.train_step(ctx, x[:16], y[:16])
    assert torch.equal(seen[0], x[:16])  # a fresh, zero δ


def test_free_at_carries_the_last_replays_delta_on_to_the_next_minibatch(batch):
    x, y = batch
    model, method = lenet(), FreeAT(replays=2)
    ctx = context(model)
    method.train_step(ctx, x[:32], y[:32])
    carried = ctx.state["free_at_delta"].clone()
    assert carried.abs().amax() > 0.05
    seen = []
    model.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].detach().clone()))
    method.train_step(ctx, x[32:], y[32:])
    # "free" means the ascent goes on across minibatches: the next batch starts from the whole δ the last
    # replay reached (clipped only to keep x + δ an image), not from zero or a shrunken copy
    torch.testing.assert_close(seen[0], (x[32:] + carried).clamp(0, 1), atol=1e-6, rtol=0)


# -- pass counts --------------------------------------------------------------------------------

def test_free_at_does_one_backward_per_replay(batch):
    x, y = batch
    model, method = lenet(), FreeAT(replays=4)
    ctx = context(model)
    steps = []
    step = ctx.optimizer.step
    ctx.optimizer.step = lambda *a, **k: (steps.append(1), step(*a, **k))[1]
    seen = []
    model.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].detach().clone()))
    with counting(model.net.fc3) as last, counting(model.net.conv1) as first:
        method.train_step(ctx, x, y)
    # each replay: one forward and one backward through the whole network (first layer included,
    # which carries the input gradient), and one optimizer step
    assert last == first == {"forward": 4, "backward": 4}
    assert len(steps) == 4
    assert all(not torch.equal(a, b) for a, b in zip(seen, seen[1:])), "δ must move between replays"


@pytest.mark.parametrize("outer, inner, first_layer_grad", [(5, 3, "full"), (2, 4, "full"), (3, 2, "hamiltonian")])
def test_yopo_propagates_through_the_network_only_m_times(outer, inner, first_layer_grad, batch):
    x, y = batch
    model, method = lenet(), YOPO(outer=outer, inner=inner, first_layer_grad=first_layer_grad)
    ctx = context(model)
    steps = []
    step = ctx.optimizer.step
    ctx.optimizer.step = lambda *a, **k: (steps.append(1), step(*a, **k))[1]
    with counting(model.net.fc3) as last, counting(model.net.conv2) as middle, counting(model.net.conv1, backward=False) as first:
        method.train_step(ctx, x, y)
    assert last == middle == {"forward": outer, "backward": outer}
    # LeNet is affine up to conv1, so the full backward's input gradient serves all n inner steps; the
    # paper's first-layer gradient costs one more pass through conv1 per outer step
    assert first["forward"] == outer * (2 if first_layer_grad == "hamiltonian" else 1)
    assert len(steps) == 1
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.net.conv1.parameters())


def test_yopo_inner_steps_reuse_the_gradient_exactly_when_the_first_layer_is_affine(batch):
    x, y = batch
    model, method = lenet(), YOPO(outer=1, inner=4)
    assert is_affine_up_to(model, "net.conv1")
    assert not is_affine_up_to(model, "net.conv2")  # conv1, a max-pool and a ReLU come first
    resnet = build_model("preact-resnet18", (3, 32, 32), 10, [0.5] * 3, [0.25] * 3, width=4)
    assert not is_affine_up_to(resnet, "net.conv1")  # its forward is not a plain Sequential: not assumed
    eta = method._threat.random_start(x, None) - x
    leaf = eta.clone().requires_grad_(True)
    with recorded_output(model.net.conv1) as record:
        F.cross_entropy(model(x + leaf), y).backward()
    args = (context(model), model.net.conv1, x, eta, leaf.grad, record["output"].grad)
    reused, recomputed = method._inner_steps(*args, affine=True), method._inner_steps(*args, affine=False)
    assert torch.equal(reused, recomputed)
    assert (reused - eta).abs().max() > 0.05  # the steps moved η


def test_yopo_parameter_gradient_is_the_mean_over_its_outer_steps(batch):
    x, y = batch
    m = 3
    model, method = lenet(), YOPO(outer=m, inner=2)
    ctx = context(model)
    ctx.optimizer.step = lambda *a, **k: None  # θ stays where the m passes saw it, to redo their gradients by hand
    seen = []
    hook = model.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].detach().clone()))
    method.train_step(ctx, x, y)
    hook.remove()
    assert len(seen) == m and not torch.equal(seen[0], seen[-1])
    params = list(model.parameters())
    by_hand = [torch.zeros_like(p) for p in params]
    for x_adv in seen:
        for total, g in zip(by_hand, torch.autograd.grad(F.cross_entropy(model(x_adv), y), params)):
            total += g / m
    # one step on the mean of the m full gradients: neither their sum (an m-fold learning rate) nor the last one alone
    for p, g in zip(params, by_hand):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-5)


def test_yopo_hamiltonian_first_layer_gradient_is_the_co_state_times_the_first_layers_jacobian(batch):
    x, y = batch
    m = 2
    model, method = lenet(), YOPO(outer=m, inner=3, first_layer_grad="hamiltonian")
    conv1 = model.net.conv1
    ctx = context(model)
    ctx.optimizer.step = lambda *a, **k: None
    inputs, conv1_inputs = [], []
    hooks = [model.register_forward_pre_hook(lambda module, i: inputs.append(i[0].detach().clone())),
             conv1.register_forward_pre_hook(lambda module, i: conv1_inputs.append(i[0].detach().clone()))]
    method.train_step(ctx, x, y)
    for h in hooks:
        h.remove()
    # per outer step: the full pass, then f0 alone at the η the inner steps reached
    assert len(inputs) == len(conv1_inputs) == 2 * m
    # that η is where the next outer step starts
    assert all(torch.equal(conv1_inputs[2 * j + 1], conv1_inputs[2 * j + 2]) for j in range(m - 1))
    params = list(conv1.parameters())
    by_hand = [torch.zeros_like(p) for p in params]
    for j in range(m):
        with recorded_output(conv1) as record:
            loss = F.cross_entropy(model(inputs[2 * j]), y) / m
        (costate,) = torch.autograd.grad(loss, record["output"])
        # Algorithm 1: ∂H/∂θ0 with H = <p, f0(x + η)>, p fixed from the full pass, η after the inner ascent
        grads = torch.autograd.grad(conv1(conv1_inputs[2 * j + 1]), params, grad_outputs=costate)
        for total, g in zip(by_hand, grads):
            total += g
    for p, g in zip(params, by_hand):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-5)


def test_yopo_decays_the_weights_as_the_reference_code(batch):
    """The reference sums the m outer gradients and runs SGD (weight decay 5e-4) with the learning rate over m: the
    decay term is lr·wd/m·θ. YOPO averages the gradients instead, so it must divide the decay by m for its step."""
    x, y = batch
    lr, wd, m = 0.05, 5e-4, 5
    steps = {}
    for decay in (wd, 0.0):
        model = lenet()
        ctx = StepContext(model, model, torch.optim.SGD(model.parameters(), lr=lr, weight_decay=decay),
                          torch.Generator().manual_seed(0), contextlib.nullcontext)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        YOPO(outer=m, inner=2).train_step(ctx, x, y)
        assert ctx.optimizer.param_groups[0]["weight_decay"] == decay  # restored
        steps[decay] = {n: p.detach() for n, p in model.named_parameters()}
    for name, theta in before.items():
        torch.testing.assert_close(steps[wd][name], steps[0.0][name] - lr * wd / m * theta, atol=1e-7, rtol=1e-5)


def test_yopo_works_on_a_resnet_and_names_a_missing_layer():
    model = build_model("preact-resnet18", (3, 32, 32), 10, [0.5] * 3, [0.25] * 3, width=4)
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    with counting(model.net.linear) as last, counting(model.net.conv1, backward=False) as first:
        YOPO(eps=8 / 255, step_size=2 / 255, outer=2, inner=3).train_step(context(model), x, y)
    assert last == {"forward": 2, "backward": 2}
    assert first["forward"] == 2 * 3  # not known to be affine: inner steps 2 and 3 recompute ∇η H through conv1
    with pytest.raises(RobustlabError, match="conv0"):
        YOPO(first_layer="net.conv0").train_step(context(model), x, y)


# -- AWP ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [PGDATAWP, TRADESAWP])
def test_awp_removes_its_weight_perturbation(cls, batch):
    """After a step the weights are w − lr·∇L(w + v): the gradient at the perturbed weights, applied to
    the unperturbed ones, with nothing of v left behind."""
    x, y = batch
    method, lr = cls(awp_warmup=0.0), 0.1
    model = lenet()
    reference = copy.deepcopy(model)
    method.train_step(context(model, lr=lr, momentum=0.0, seed=3), x, y)

    ref_ctx = context(reference, seed=3)
    x_adv = method.adversarial_examples(ref_ctx, x, y)
    v = method.weight_perturbation(ref_ctx, x, x_adv, y)
    weights = dict(reference.named_parameters())
    assert set(v) == {n for n, _ in perturbed_weights(reference)} and "net.fc3.weight" in v
    for name, delta in v.items():  # layer-wise, relative to the layer's norm
        assert delta.norm().item() == pytest.approx(method.awp_gamma * weights[name].detach().norm().item(), rel=1e-4)
    originals = {n: p.detach().clone() for n, p in weights.items()}
    with torch.no_grad():
        for name, delta in v.items():
            weights[name].add_(delta)
    grads = torch.autograd.grad(method.objective(reference, x, x_adv, y).loss, list(weights.values()))
    for (name, p), g in zip(model.named_parameters(), grads):
        expected = originals[name] - lr * g
        torch.testing.assert_close(p.detach(), expected, atol=1e-6, rtol=1e-5)
        if name in v:
            assert (p.detach() - (expected + v[name])).abs().amax() > 1e-4  # v really was removed


@pytest.mark.parametrize("cls", [PGDATAWP, TRADESAWP])
def test_awp_with_zero_learning_rate_leaves_the_weights_exactly_as_they_were(cls, batch):
    x, y = batch
    model = lenet()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cls(awp_warmup=0.0).train_step(context(model, lr=0.0), x, y)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_awp_warmup_is_a_fraction_of_the_epochs():
    method = TRADESAWP()  # 0.045: the reference's 200 epochs, numbered from 1, perturb from epoch 10 on
    assert not method.awp_active(context(lenet(), epoch=8, epochs=200))  # the 9th: the last warm-up epoch
    assert method.awp_active(context(lenet(), epoch=9, epochs=200))
    assert not method.awp_active(context(lenet(), epoch=0, epochs=10))
    assert method.awp_active(context(lenet(), epoch=1, epochs=10))
    assert PGDATAWP().awp_active(context(lenet(), epoch=0, epochs=10))
    assert not PGDATAWP(awp_gamma=0.0).awp_active(context(lenet(), epoch=5, epochs=10))


# -- Trainer hooks ------------------------------------------------------------------------------

def test_fast_at_steps_from_the_unclipped_start_so_black_pixels_keep_their_noise(batch):
    """On pixels at 0 (MNIST's background) a start clipped to [0, 1] turns the FGSM step of 1.25ε into plain FGSM's
    corners 0 and ε; stepping from the unclipped start, as the paper's δ, leaves values in between."""
    y = batch[1][:32]
    x, eps = torch.zeros(32, 1, 28, 28), 0.1
    between = {}
    for clip_start in (True, False):
        x_adv = FastAT(eps=eps, clip_start=clip_start).adversarial_examples(context(lenet()), x, y)
        assert within_ball(x_adv, x, "linf", eps)
        between[clip_start] = ((x_adv > 1e-6) & (x_adv < eps - 1e-6)).float().mean().item()
    assert between[True] == 0.0
    assert between[False] > 0.1  # about half of the pixels step up, and 3/8 of those from below -ε/4


def test_fast_at_flags_catastrophic_overfitting():
    method = FastAT()
    best = {"epoch": 2, "val_robust": 0.45}
    assert method.should_stop({"epoch": 3, "train_acc": 0.5, "val_robust": 0.40}, best) is None
    reason = method.should_stop({"epoch": 3, "train_acc": 0.5, "val_robust": 0.05}, best)
    assert "catastrophic overfitting" in reason and "below its best" in reason and "\n" not in reason
    assert method.should_stop({"epoch": 3, "train_acc": 0.5, "val_robust": float("nan")}, best) is None
    unchecked = FastAT(co_drop=None, co_ratio=None)
    assert unchecked.should_stop({"epoch": 3, "train_acc": 0.9, "val_robust": 0.0}, best) is None


def test_fast_at_flags_a_run_that_is_never_robust():
    """The clipped-start MNIST runs (results.md) were at 0.1-0.2% validation PGD accuracy after their first epoch, with
    34-38% on their own FGSM examples, and never recovered: no best epoch to fall from, yet overfitted."""
    method = FastAT()
    first = {"epoch": 0, "train_acc": 0.3445, "val_robust": 0.001}
    reason = method.should_stop(first, {"epoch": 0, "val_robust": 0.001})
    assert "catastrophic overfitting" in reason and "FGSM examples (34.4%)" in reason and "epoch 1 (0.1%)" in reason
    healthy = {"epoch": 0, "train_acc": 0.4066, "val_robust": 0.141}  # the unclipped run's first epoch
    assert method.should_stop(healthy, {"epoch": 0, "val_robust": 0.141}) is None
    assert FastAT(co_ratio=None).should_stop(first, {"epoch": 0, "val_robust": 0.001}) is None
    # without a validation attack the Trainer ranks epochs by clean accuracy, far above a tenth of anything
    clean = {"epoch": 0, "train_acc": 0.9, "val_robust": 0.8}
    assert method.should_stop(clean, {"epoch": 0, "val_robust": 0.8}) is None


def test_fast_at_runs_resume_with_other_stop_thresholds(tmp_path):
    """co_drop and co_ratio decide when to stop, not what an epoch computes: a run may resume with new ones (or from
    before co_ratio existed), while its recipe stays fixed."""
    from robustlab.training.trainer import TrainConfig, check_resumable
    config = TrainConfig()
    saved = FastAT()
    meta = {"kind": "training-state", "method": {"name": saved.name, **saved.config()}, "config": asdict(config)}
    del meta["method"]["co_ratio"]
    check_resumable(tmp_path / "last.safetensors", meta, "torch", FastAT(co_drop=0.5, co_ratio=0.2), config)
    with pytest.raises(RobustlabError, match="method.step_size"):
        check_resumable(tmp_path / "last.safetensors", meta, "torch", FastAT(step_size=0.1), config)


class _StopAfterSecondEpoch(Standard):
    def should_stop(self, metrics, best):
        return "enough" if metrics["epoch"] == 1 else None


def _trainer(fmnist, method, out, n=512, **config):
    data = Splits(fmnist.train.subset(n), fmnist.val.subset(200), fmnist.test, fmnist.info)
    cfg = TrainConfig(**{"batch_size": 64, "val_n": 100, **config})
    return Trainer(lenet(), method, data, cfg, out, {"model": {"name": "lenet", "kwargs": {}}, "dataset": asdict(fmnist.info)},
                   val_attack=validation_attack(method, "fashion-mnist", "linf"), show_progress=False)


def test_trainer_stops_when_the_method_says_so(fmnist, tmp_path):
    trainer = _trainer(fmnist, _StopAfterSecondEpoch(), tmp_path, n=128, epochs=5)
    last = trainer.fit()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and last["stopped_early"] == "enough"
    assert (tmp_path / "best.safetensors").exists()


class _RankedByRobustness(Standard):
    selected_by = "val_robust"  # as every adversarial method (Method's default)


class _Killed(Exception):
    pass


def test_the_best_epoch_is_ranked_by_the_methods_figure_across_a_resume(fmnist, tmp_path, monkeypatch):
    assert METHODS["pgd-at"].selected_by == "val_robust"
    figures = [(0.9, 0.1), (0.5, 0.4), (0.6, 0.3)]  # (clean, robust) by epoch: the two figures rank them differently
    monkeypatch.setattr(Trainer, "validate", lambda self, epoch: dict(zip(("val_clean", "val_robust"), figures[epoch])))
    train_epoch = Trainer.train_epoch

    def killed_in_the_third_epoch(self, epoch):
        if epoch == 2:
            raise _Killed
        return train_epoch(self, epoch)

    monkeypatch.setattr(Trainer, "train_epoch", killed_in_the_third_epoch)
    with pytest.raises(_Killed):
        _trainer(fmnist, _RankedByRobustness(), tmp_path, n=64, epochs=3).fit()
    monkeypatch.setattr(Trainer, "train_epoch", train_epoch)
    resumed = _trainer(fmnist, _RankedByRobustness(), tmp_path, n=64, epochs=3)
    assert resumed.resume()
    resumed.fit()
    # epoch 1 stays the best: the resumed run must know what it has to beat, or epoch 2 (robust 0.3) replaces it
    assert json.loads((tmp_path / "best.json").read_text())["epoch"] == 1
    assert json.loads((tmp_path / "last.json").read_text())["best"]["epoch"] == 1
    assert load_model(tmp_path).checkpoint_meta["epoch"] == 1  # a run folder stands for its best epoch (eval, rift)


class _LossIsTheBatchSize(Standard):
    def train_step(self, ctx, x, y):
        logits = torch.zeros(len(y), 10)
        logits[:, 0] = 1.0  # every image called class 0
        return StepResult(torch.tensor(float(len(y))), logits)


def test_train_loss_and_accuracy_are_means_over_images_not_over_batches(fmnist, tmp_path):
    trainer = _trainer(fmnist, _LossIsTheBatchSize(), tmp_path, n=100, epochs=1, val_n=10)  # batches of 64, 36
    metrics = trainer.fit()
    assert metrics["train_loss"] == pytest.approx((64 * 64 + 36 * 36) / 100)
    labels = fmnist.train.subset(100).labels
    assert metrics["train_acc"] == pytest.approx((labels == 0).float().mean().item())


def test_resuming_a_stopped_run_says_so_and_reports_its_last_epoch(fmnist, tmp_path, capsys):
    """It said "resuming after epoch 5" for a run stopped after epoch 2, and printed "last": {}."""
    from robustlab.cli import fit
    _trainer(fmnist, _StopAfterSecondEpoch(), tmp_path, n=128, epochs=5).fit()
    again = _trainer(fmnist, _StopAfterSecondEpoch(), tmp_path, n=128, epochs=5)
    fit(again, tmp_path, resume=True)
    out, err = capsys.readouterr()
    assert "stopped early after epoch 2 (enough); nothing to train" in err
    assert json.loads(out.splitlines()[-1])["last"]["epoch"] == 1


def test_a_run_without_validation_images_keeps_its_last_epoch_as_the_best(fmnist, tmp_path, capsys):
    """Nothing ranks the epochs, and NaN never beat the best so far: no best.safetensors was written, and `robustlab
    train` printed NaN, which is not JSON."""
    data = Splits(fmnist.train.subset(128), fmnist.val.subset(0), fmnist.test, fmnist.info)
    trainer = Trainer(lenet(), Standard(), data, TrainConfig(epochs=2, batch_size=64), tmp_path,
                      {"model": {"name": "lenet", "kwargs": {}}, "dataset": asdict(fmnist.info)}, show_progress=False)
    from robustlab.cli import fit
    fit(trainer, tmp_path, resume=False)  # trains, then prints the summary line
    assert json.loads((tmp_path / "best.json").read_text())["epoch"] == 1
    out = capsys.readouterr().out.splitlines()
    assert json.loads(out[-1])["best"]["val_robust"] is None
    assert out[0].startswith("no validation images") and "| no validation |" in out[1]  # they said nothing, then nan%


class _DivergesInSecondEpoch(Standard):
    def loss(self, ctx, x, y):
        result = super().loss(ctx, x, y)
        return result if ctx.epoch == 0 else type(result)(result.loss * float("nan"), result.logits)


def test_a_diverged_run_stops_with_a_clear_error_and_keeps_its_last_good_checkpoint(fmnist, tmp_path):
    trainer = _trainer(fmnist, _DivergesInSecondEpoch(), tmp_path, n=128, epochs=4)
    with pytest.raises(RobustlabError, match=r"diverged: the loss is nan at epoch 2, step 1 .*fp32") as err:
        trainer.fit()
    assert "\n" not in str(err.value)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1  # epoch 1's checkpoint is the last one
    assert json.loads((tmp_path / "last.json").read_text())["epoch"] == 0


class _SetsItsOwnRateThenDiverges(_DivergesInSecondEpoch):
    def train_step(self, ctx, x, y):
        for group in ctx.optimizer.param_groups:
            group["lr"] = 0.0123  # as RiFT's fine-tuning does with its step decay
        return super().train_step(ctx, x, y)


def test_the_divergence_message_names_the_rate_the_step_used_not_the_schedules(fmnist, tmp_path):
    trainer = _trainer(fmnist, _SetsItsOwnRateThenDiverges(), tmp_path, n=128, epochs=2, lr=0.1)
    with pytest.raises(RobustlabError, match=r"lr 0\.0123\)"):
        trainer.fit()


def test_mart_stays_finite_in_bf16_on_confidently_wrong_examples():
    """bf16 rounds the reference's 1.0001 to 1 and a p_k(x') of 0.9995 to 1: computed in bf16, log(1.0001 − p)
    has a gradient of 1e12, the other classes' logits get ~1e7, and weights soon hold NaN (a 10-epoch run did)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 10))
    with torch.no_grad():
        model[1].weight.mul_(0.01)
        model[1].bias.copy_(torch.tensor([0.0, 0, 0, 9.8, 0, 0, 0, 0, 0, 0]))  # class 3: p ≈ 0.9995, every label 0
    x, y = torch.rand(8, 1, 4, 4), torch.zeros(8, dtype=torch.long)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = make_method("mart", "fashion-mnist", "linf").objective(model, x, x.clamp(0, 1), y)
    result.loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert torch.isfinite(result.loss) and all(torch.isfinite(g).all() for g in grads)
    assert max(g.abs().max().item() for g in grads) < 1e6


def test_trades_takes_its_first_step_in_fp32_under_bf16_autocast(batch):
    """From x + 0.001·N(0, 1) the KL's change of the logits is below bf16's resolution, so a bf16 first step
    follows rounding noise (on a small TRADES cnn-small PGD-10 then ended at KL 0.036 where fp32 reached 0.040,
    experiments/trades_bf16.py)."""
    x, y = batch
    model = lenet()
    fp32 = TRADES(steps=1).adversarial_examples(context(model), x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = TRADES(steps=1).adversarial_examples(context(model), x, y)
        with torch.no_grad():
            target = F.softmax(model(x), dim=1)
        method = TRADES()
        in_bf16 = perturb(model, x, target, method._threat, 1, loss_fn=kl_to_target,
                          x_init=method._start(context(model), x))
    assert torch.equal(mixed, fp32)
    assert (in_bf16 != fp32).float().mean() > 0.2  # what the step would have been


@pytest.mark.parametrize("name", ["trades", "mart", "trades-awp"])
def test_joint_batch_normalizes_clean_and_adversarial_inputs_with_one_set_of_statistics(name):
    """Without BatchNorm the joint pass changes nothing; with it, the running statistics are those of the joint
    batch, where two passes would have averaged each half's own."""
    torch.manual_seed(0)
    x = torch.rand(16, 1, 4, 4)
    x_adv, y = (x + 0.1).clamp(0, 1), torch.randint(0, 10, (16,))
    plain = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 10))
    separate, joint = (make_method(name, "fashion-mnist", "linf", joint_batch=j) for j in (False, True))
    assert torch.allclose(separate.objective(plain, x, x_adv, y).loss, joint.objective(plain, x, x_adv, y).loss,
                          atol=1e-6)
    bn = torch.nn.BatchNorm2d(1, momentum=None)  # momentum=None: the plain average of the batches seen
    joint.objective(torch.nn.Sequential(bn, plain), x, x_adv, y)
    both = torch.cat([x, x_adv])
    assert bn.num_batches_tracked == 1
    assert torch.allclose(bn.running_mean, both.mean().view(1), atol=1e-6)
    assert torch.allclose(bn.running_var, both.var().view(1), atol=1e-6)


def test_free_at_divides_the_epochs_by_its_replays(fmnist, tmp_path):
    assert _trainer(fmnist, FreeAT(replays=8), tmp_path, epochs=10).epochs == 2
    assert _trainer(fmnist, FreeAT(replays=8), tmp_path, epochs=3).epochs == 1
    assert _trainer(fmnist, FastAT(), tmp_path, epochs=3).epochs == 3
    # reports read the epochs the run trains from its checkpoints: a FreeAT run showed "epoch 1 of 3"
    _trainer(fmnist, FreeAT(replays=8), tmp_path, n=64, epochs=3).fit()
    assert json.loads((tmp_path / "best.json").read_text())["epochs_total"] == 1


# -- learning -----------------------------------------------------------------------------------

TEST_N = 300
ROBUST = partial(pgd, eps=0.1, norm="linf", steps=10, step_size=0.025)


def _fine_tune(fmnist, base, method, out):
    """Two epochs of `method` on 512 images from `base`; returns (per-epoch train losses, model)."""
    epochs = 2 * getattr(method, "replays", 1)  # FreeAT runs epochs / replays
    trainer = _trainer(fmnist, method, out, epochs=epochs, optimizer="adam", lr=0.002)
    trainer.model.load_state_dict(base.state_dict())
    assert trainer.epochs == 2
    trainer.fit()
    losses = [json.loads(line)["train_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    return losses, trainer.model.eval()


@pytest.fixture(scope="module")
def normally_trained(fmnist, tmp_path_factory):
    """A LeNet trained normally (6 epochs, 2,000 images), the starting point of every method."""
    trainer = _trainer(fmnist, Standard(), tmp_path_factory.mktemp("base"), n=2000, epochs=6,
                       optimizer="adam", lr=0.004)
    trainer.fit()
    return trainer.model.eval()


@pytest.fixture(scope="module")
def standard_robust(fmnist, normally_trained, tmp_path_factory):
    """PGD-10 accuracy of the normally trained model after the same two epochs of normal training."""
    _, model = _fine_tune(fmnist, normally_trained, Standard(), tmp_path_factory.mktemp("standard"))
    return accuracy(model, fmnist.test.subset(TEST_N), attack=ROBUST)


@pytest.mark.parametrize("name", FAMILY)
def test_method_learns_robustness(name, fmnist, normally_trained, standard_robust, tmp_path):
    # cheaper settings than the defaults, as the conftest's PGD-5 models: FreeAT m = 4, PGD-5 of step 0.04
    overrides = {"free-at": {"replays": 4}, "fast-at": {}, "yopo": {}}.get(name, {"steps": 5, "step_size": 0.04})
    losses, model = _fine_tune(fmnist, normally_trained, make_method(name, "fashion-mnist", "linf", **overrides), tmp_path)
    assert all(math.isfinite(l) for l in losses) and losses[-1] < losses[0], losses
    robust = accuracy(model, fmnist.test.subset(TEST_N), attack=ROBUST)
    assert robust > standard_robust + 0.05, (robust, standard_robust)


# -- the objectives' formulas, on a model small enough to compute them by hand ----------------------

def _linear_and_inputs(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 10))
    x = torch.rand(32, 1, 4, 4)
    x_adv = (x + 0.1 * torch.randn_like(x).sign()).clamp(0, 1)
    return model, x, x_adv, torch.randint(0, 10, (32,))


@pytest.mark.parametrize("beta", [1.0, 6.0])
def test_trades_objective_is_clean_cross_entropy_plus_beta_times_the_kl(beta):
    model, x, x_adv, y = _linear_and_inputs()
    loss = TRADES(beta=beta).objective(model, x, x_adv, y).loss
    logits, logits_adv = model(x), model(x_adv)
    p, p_adv = F.softmax(logits, 1), F.softmax(logits_adv, 1)
    kl = (p * (p.log() - p_adv.log())).sum(1).mean()  # KL(p(x) ‖ p(x')), batch mean
    assert kl > 1e-3
    torch.testing.assert_close(loss, F.cross_entropy(logits, y) + beta * kl, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("beta", [1.0, 6.0])
def test_mart_objective_is_the_reference_mart_loss(beta):
    """MART (Wang et al. 2020) computed here independently: boosted CE on x' plus β·KL(p(x) ‖ p(x'))·(1 − p_y(x))."""
    model, x, x_adv, y = _linear_and_inputs(1)
    loss = make_method("mart", "fashion-mnist", "linf", beta=beta).objective(model, x, x_adv, y).loss
    logits, logits_adv = model(x), model(x_adv)
    adv_probs, nat_probs = F.softmax(logits_adv, 1), F.softmax(logits, 1)
    top2 = torch.argsort(adv_probs, dim=1)[:, -2:]
    new_y = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
    loss_adv = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), new_y)
    true_probs = nat_probs.gather(1, y[:, None]).squeeze(1)
    kl = torch.nn.KLDivLoss(reduction="none")(torch.log(adv_probs + 1e-12), nat_probs).sum(1)
    loss_robust = (kl * (1.0000001 - true_probs)).sum() / len(x)
    torch.testing.assert_close(loss, loss_adv + beta * loss_robust, rtol=1e-5, atol=1e-6)


def test_trades_inner_maximization_starts_from_x_plus_a_thousandth_of_a_gaussian(batch, monkeypatch):
    import robustlab.training.trades as trades
    x, y = batch
    starts = []
    real = trades.perturb
    monkeypatch.setattr(trades, "perturb", lambda *a, x_init=None, **k: (starts.append(x_init), real(*a, x_init=x_init, **k))[1])
    x_adv = TRADES(steps=3).adversarial_examples(context(lenet()), x, y)
    noise = starts[0] - x
    assert noise.std().item() == pytest.approx(0.001, rel=0.05) and abs(noise.mean().item()) < 1e-4
    assert (x_adv - x).abs().amax() > 0.05  # and the KL-PGD climbed away from it


def test_fast_at_steps_one_and_a_quarter_eps_from_its_random_start():
    """δ = clip(δ₀ + 1.25ε·sign(g), −ε, ε) with δ₀ ∈ [−ε, ε]: every coordinate ends at least ε/4 away from x.
    (A linear model, whose input gradient has no zeros; x inside the box, so the box clips nothing.)"""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    x, y, eps = 0.3 + 0.4 * torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,)), 0.1
    for clip_start in (False, True):
        delta = FastAT(eps=eps, clip_start=clip_start).adversarial_examples(context(model), x, y) - x
        assert delta.abs().amax() <= eps + 1e-6
        assert delta.abs().amin() >= 0.25 * eps - 1e-6, clip_start
        assert 0.55 < (delta.abs() > eps - 1e-6).float().mean() < 0.7  # P(δ₀·sign(g) > −ε/4) = 5/8 at the corner


@pytest.mark.parametrize("cls", [PGDATAWP, TRADESAWP])
def test_awp_perturbation_is_one_ascent_step_on_the_objective(cls, batch):
    """The proxy's one SGD step on −objective points each layer's v along +∇_w objective(w): v raises the loss."""
    x, y = batch
    method, model = cls(awp_warmup=0.0), lenet()
    ctx = context(model, seed=3)
    x_adv = method.adversarial_examples(ctx, x, y)
    v = method.weight_perturbation(ctx, x, x_adv, y)
    weights = dict(model.named_parameters())
    loss = method.objective(model, x, x_adv, y).loss
    grads = dict(zip(weights, torch.autograd.grad(loss, list(weights.values()))))
    for name, delta in v.items():
        assert F.cosine_similarity(delta.flatten(), grads[name].flatten(), dim=0) > 0.9999, name
    with torch.no_grad():
        for name, delta in v.items():
            weights[name].add_(delta)
        assert method.objective(model, x, x_adv, y).loss > loss


class _CollapsesAndStopsInSecondEpoch(Standard):
    """Epoch 2 wrecks the weights (as catastrophic overfitting wrecks robustness) and asks to stop."""
    def train_step(self, ctx, x, y):
        result = super().train_step(ctx, x, y)
        if ctx.epoch == 1:
            with torch.no_grad():
                for p in ctx.module.parameters():
                    p.zero_()
        return result

    def should_stop(self, metrics, best):
        return "overfitted" if metrics["epoch"] == 1 else None


def test_an_early_stop_keeps_the_last_good_epoch_as_the_best_checkpoint(fmnist, tmp_path):
    from robustlab import load_model
    trainer = _trainer(fmnist, _CollapsesAndStopsInSecondEpoch(), tmp_path, n=1024, epochs=4,
                       optimizer="adam", lr=0.003, schedule="constant")
    assert trainer.fit()["stopped_early"] == "overfitted"
    assert json.loads((tmp_path / "best.json").read_text())["epoch"] == 0
    assert json.loads((tmp_path / "last.json").read_text())["epoch"] == 1
    best = load_model(tmp_path / "best.safetensors")
    assert all(p.abs().sum() > 0 for p in best.parameters())  # not the wrecked weights of the stopped epoch
