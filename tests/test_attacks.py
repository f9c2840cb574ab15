"""FGSM, FGM and PGD: budgets, box constraints, side effects, and agreement with a textbook PGD."""
import warnings
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustlab.attacks import apgd, fgm, fgsm, pgd, within_ball
from robustlab.errors import RobustlabError


class Recorder(nn.Module):
    """Wraps a model and keeps every input it is called on: the attack's iterates."""

    def __init__(self, model):
        super().__init__()
        self.model, self.seen = model, []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.model(x)


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 1.5)])
def test_every_iterate_stays_in_ball_and_box(robust_model, test_batch, norm, eps):
    x, y = test_batch[0][:64], test_batch[1][:64]
    rec = Recorder(robust_model)
    pgd(rec, x, y, eps=eps, norm=norm, steps=10, generator=torch.Generator().manual_seed(0))
    assert len(rec.seen) >= 10
    for iterate in rec.seen:
        assert within_ball(iterate, x, norm, eps)
    # Later restarts run only on the examples still classified correctly.
    assert within_ball(pgd(robust_model, x, y, eps=eps, norm=norm, steps=10, restarts=3), x, norm, eps)


def test_one_step_attacks_respect_their_budgets(robust_model, test_batch):
    x, y = test_batch
    assert within_ball(fgsm(robust_model, x, y, eps=0.1), x, "linf", 0.1)
    assert within_ball(fgm(robust_model, x, y, eps=1.5), x, "l2", 1.5)


def test_saturated_pixels_move_in_their_allowed_direction():
    """Black pixels can rise and white pixels can fall: clipping inside the forward pass only would freeze them."""
    torch.manual_seed(0)
    d = 28 * 28
    w = torch.randn(d)

    class Linear(nn.Module):  # one class, so no iterate ends the attack early by succeeding
        def forward(self, x):
            return (x.flatten(1) @ w).unsqueeze(1)

    x = torch.zeros(1, 1, 28, 28)
    x.view(-1)[d // 2:] = 1.0  # half black, half white
    y = torch.zeros(1, dtype=torch.long)
    lower_score = lambda logits, y: -logits[:, 0]  # the attack moves x against w
    x_adv = pgd(Linear(), x, y, eps=0.1, steps=10, step_size=0.025, loss_fn=lower_score,
                generator=torch.Generator().manual_seed(0))
    flat, black, white = x_adv.view(-1), torch.arange(d) < d // 2, torch.arange(d) >= d // 2
    assert torch.allclose(flat[black & (w < 0)], torch.tensor(0.1))   # black pixels went up to ε
    assert torch.allclose(flat[black & (w > 0)], torch.tensor(0.0))   # and stay at the box edge otherwise
    assert torch.allclose(flat[white & (w > 0)], torch.tensor(0.9))   # white pixels went down to 1 − ε
    assert torch.allclose(flat[white & (w < 0)], torch.tensor(1.0))


def test_pgd_at_least_as_strong_as_fgsm(robust_model, test_batch):
    x, y = test_batch
    acc_fgsm = accuracy(robust_model, fgsm(robust_model, x, y, eps=0.1), y)
    acc_pgd = accuracy(robust_model, pgd(robust_model, x, y, eps=0.1, steps=20, step_size=0.01), y)
    assert acc_pgd <= acc_fgsm
    assert acc_pgd < accuracy(robust_model, x, y)


def test_restarts_keep_the_worst_case(robust_model, test_batch):
    x, y = test_batch
    x_one = pgd(robust_model, x, y, eps=0.1, steps=5, generator=torch.Generator().manual_seed(3))
    rec = Recorder(robust_model)
    x_three = pgd(rec, x, y, eps=0.1, steps=5, restarts=3, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        broken_one = robust_model(x_one).argmax(1) != y
        broken_three = robust_model(x_three).argmax(1) != y
    # the first of three restarts is the single run (same seed): what it broke stays broken
    assert not (broken_one & ~broken_three).any()
    # restarts 2 and 3 really run (5 steps each), on the images the earlier ones left; `three <= one` held with
    # equality when the restarts were skipped
    # (the first pass looks at the clean images: one the model already gets wrong is returned as it is)
    sizes, left = [len(seen) for seen in rec.seen], int((~broken_one).sum())
    assert sizes[:7] == [len(x)] * 7 and sizes[7:13] == [left] * 6, sizes  # 5 steps, then which survived
    assert len(sizes) == 18 and len(set(sizes[13:])) == 1 and 0 < sizes[13] <= left, sizes


def test_targeted_pgd_reaches_the_target(standard_model, test_batch):
    x, y = test_batch
    target = (y + 1) % 10
    x_adv = pgd(standard_model, x, target, eps=0.3, steps=40, step_size=0.02, targeted=True)
    with torch.no_grad():
        before = (standard_model(x).argmax(1) == target).float().mean()
        after = (standard_model(x_adv).argmax(1) == target).float().mean()
    assert after > before + 0.3


def test_attacks_leave_parameter_gradients_modes_and_buffers_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(),
                          nn.Linear(4 * 26 * 26, 10))
    model.train()
    model[3].eval()  # a mixed-mode model: the per-module modes must come back as they were
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    for attack in (lambda: pgd(model, x, y, eps=0.1, steps=3), lambda: fgsm(model, x, y, eps=0.1),
                   lambda: fgm(model, x, y, eps=1.0), lambda: pgd(model, x, y, eps=1.0, norm="l2", steps=3)):
        attack()
    assert [m.training for m in model.modules()] == [True, True, True, True, False, True, True]
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) and p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, buffers[k]) for k, v in model.state_dict().items())


def textbook_pgd(model, x, y, eps, alpha, steps, seed):
    """The loop from the papers, written independently of robustlab."""
    g = torch.Generator().manual_seed(seed)
    x_adv = (x + (torch.rand(x.shape, generator=g) * 2 - 1) * eps).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y)
        grad, = torch.autograd.grad(loss, x_adv)
        x_adv = x_adv.detach() + alpha * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv


def test_pgd_agrees_with_a_textbook_loop(robust_model, fmnist):
    x, y = fmnist.test.subset(1000).as_float(), fmnist.test.labels[:1000]
    ours = accuracy(robust_model, pgd(robust_model, x, y, eps=0.1, steps=20, step_size=0.01,
                                      generator=torch.Generator().manual_seed(0)), y)
    x_theirs = textbook_pgd(robust_model, x, y, 0.1, 0.01, 20, seed=0)
    theirs = accuracy(robust_model, x_theirs, y)
    assert abs(ours - theirs) <= 0.01
    assert ours <= theirs + 0.002  # keeping the first successful iterate can only help the attack
    # the last iterates themselves agree (same random start, same sign steps): an accuracy within 1 point let a
    # step less or a start at x through
    x_last = pgd(robust_model, x, y, eps=0.1, steps=20, step_size=0.01, keep_best=False,
                 generator=torch.Generator().manual_seed(0))
    differ = ((x_last - x_theirs).abs() > 1e-5).float().mean().item()
    assert differ < 1e-3, differ


@pytest.mark.parametrize("kwargs", [{"eps": -0.1}, {"eps": 0.1, "steps": 0}, {"eps": 0.1, "restarts": 0},
                                    {"eps": 0.1, "norm": "l1"}, {"eps": float("nan")},
                                    {"eps": 0.1, "step_size": float("inf")},
                                    {"eps": 0.1, "steps": 2.5}, {"eps": 0.1, "restarts": "3"}])
def test_bad_budgets_are_clear_errors(kwargs):
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(RobustlabError):
        pgd(model, torch.rand(2, 1, 2, 2), torch.zeros(2, dtype=torch.long), **kwargs)
    if "steps" in kwargs or "restarts" in kwargs:  # TypeErrors from range() and "3" < 1, in APGD too
        with pytest.raises(RobustlabError, match="must be an integer >= 1"):
            apgd(model, torch.rand(2, 1, 2, 2), torch.zeros(2, dtype=torch.long), **kwargs)


@pytest.mark.parametrize("name", ["fgsm", "fgm", "pgd", "apgd", "apgd-t", "fab-t", "square", "pgd-smooth"])
def test_inputs_outside_the_box_are_refused_by_every_attack(name):
    """Normalized inputs (the usual mistake) would otherwise be attacked, clipped into [0, 1] and scored."""
    from robustlab.attacks import ATTACKS
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))  # a ReLU for pgd-smooth
    x = (torch.rand(2, 1, 2, 2) - 0.5) / 0.25  # "normalized": values around ±2
    with pytest.raises(RobustlabError, match=r"\[0, 1\].*inside the model"):
        ATTACKS[name](model, x, torch.zeros(2, dtype=torch.long), eps=0.1)


@pytest.mark.parametrize("name", ["fgsm", "fgm", "pgd", "apgd", "apgd-t", "fab-t", "square", "pgd-smooth"])
@pytest.mark.parametrize("x,y,words", [
    ((torch.rand(2, 1, 2, 2) * 255).to(torch.uint8), torch.zeros(2, dtype=torch.long), ["uint8", "divide by 255"]),
    (torch.rand(2, 1, 2, 2), torch.zeros(3, dtype=torch.long), ["2 images", "(3,)"]),
    (torch.rand(2, 1, 2, 2), torch.zeros(2), ["integer label", "float32"]),
])
def test_images_and_labels_that_do_not_fit_are_clear_errors(name, x, y, words):
    """Each was a traceback from inside torch (a label-count mismatch, float labels) or a box error."""
    from robustlab.attacks import ATTACKS
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))
    with pytest.raises(RobustlabError) as error:
        ATTACKS[name](model, x, y, eps=0.1)
    assert all(w in str(error.value) for w in words), str(error.value)


@pytest.mark.parametrize("name", ["fgsm", "fgm", "pgd", "apgd", "apgd-t", "fab-t", "square", "pgd-smooth"])
def test_nan_inputs_are_refused_by_every_attack(name):
    """NaN compares False with both bounds, so it passed the box check and came back as an adversarial image."""
    from robustlab.attacks import ATTACKS
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))
    x = torch.rand(2, 1, 2, 2)
    x[1, 0, 0, 0] = float("nan")
    with pytest.raises(RobustlabError, match="hold NaN values"):
        ATTACKS[name](model, x, torch.zeros(2, dtype=torch.long), eps=0.1)


ALL = ["fgsm", "fgm", "pgd", "apgd", "apgd-t", "fab-t", "square", "pgd-smooth"]


def _four_classes():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))  # APGD-T needs 4 classes


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32])
def test_labels_of_any_integer_type_are_taken(name, dtype):
    """uint8 is what idx files hold; each type failed inside a loss or `gather` with a torch traceback."""
    from robustlab.attacks import ATTACKS
    x, y = torch.rand(3, 1, 2, 2), torch.tensor([0, 1, 3])
    x_adv = ATTACKS[name](_four_classes(), x, y.to(dtype), eps=0.1)
    assert within_ball(x_adv, x, "l2" if name == "fgm" else "linf", 0.1)


@pytest.mark.parametrize("name", ALL + ["autoattack"])
@pytest.mark.parametrize("label", [4, -1])
def test_labels_outside_the_models_classes_are_refused(name, label):
    """APGD, FAB-T, Square and AutoAttack counted such an image as broken before any attack (a wrong figure without
    a word); PGD failed in cross-entropy's IndexError."""
    from robustlab.attacks import ATTACKS, autoattack
    attack = ATTACKS.get(name) or partial(autoattack, steps=2, queries=2, progress=False)
    x, y = torch.rand(3, 1, 2, 2), torch.tensor([0, 1, label])
    words = "class indices >= 0, got -1" if label < 0 else "4 outputs .0 to 3., got 4"
    with pytest.raises(RobustlabError, match=words):
        attack(_four_classes(), x, y, eps=0.1)


@pytest.mark.parametrize("name", ALL + ["autoattack"])
def test_attacks_take_a_model_with_float64_logits(name):
    """A float64 buffer added to float32 logits: FAB-T's margin made its next iterate float64, which the model's
    float32 convolution refused, after AutoAttack's first three stages."""
    from robustlab.attacks import ATTACKS, autoattack
    attack = ATTACKS.get(name) or (lambda *a, **k: autoattack(*a, steps=3, queries=3, progress=False, **k).x_adv)
    net = _four_classes()
    model = type("Float64Head", (nn.Module,), {"forward": lambda self, x: net(x).double()})()
    model.net = net
    x, y = torch.rand(3, 1, 2, 2), torch.tensor([0, 1, 3])
    x_adv = attack(model, x, y, eps=0.1)
    assert x_adv.dtype == torch.float32 and within_ball(x_adv, x, "l2" if name == "fgm" else "linf", 0.1)


@pytest.mark.parametrize("name", ALL + ["autoattack", "accuracy"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_a_model_of_another_float_type_than_the_images_is_one_line(name, dtype):
    """It failed in torch's "Input type (float) and bias type (c10::Half) should be the same"."""
    from robustlab.attacks import ATTACKS, autoattack
    from robustlab.evaluate import accuracy
    attack = ATTACKS.get(name) or (lambda *a, **k: autoattack(*a, steps=2, queries=2, progress=False, **k).x_adv)
    x, y = torch.rand(3, 1, 2, 2), torch.tensor([0, 1, 3])
    model = _four_classes().to(dtype)
    run = (lambda m, images: accuracy(m, (images, y))) if name == "accuracy" else \
        (lambda m, images: attack(m, images, y, eps=0.1))
    with pytest.raises(RobustlabError, match=f"weights are {str(dtype)[6:]} and it fails on float32 images .*: call "
                                             "model.float"):
        run(model, x)
    if dtype == torch.float64:  # images of the weights' type are taken
        assert name == "accuracy" or run(model, x.double()).dtype == torch.float64
    else:  # and a model that casts the images itself, or runs under autocast, as before the check
        casting = type("Casting", (nn.Module,), {"forward": lambda self, x: self.net(x.to(dtype)).float()})()
        casting.net = model
        run(casting, x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            run(model, x)


@pytest.mark.parametrize("name", ["fgsm", "fgm", "pgd", "apgd", "apgd-t", "fab-t", "pgd-smooth", "autoattack"])
def test_gradient_attacks_under_inference_mode_say_so(name):
    """torch.enable_grad() does not lift inference mode: "element 0 of tensors does not require grad"."""
    from robustlab.attacks import ATTACKS, autoattack
    attack = ATTACKS.get(name) or partial(autoattack, steps=2, queries=2, progress=False)
    with torch.inference_mode(), pytest.raises(RobustlabError, match="inference_mode"):
        attack(_four_classes(), torch.rand(3, 1, 2, 2), torch.tensor([0, 1, 3]), eps=0.1)
    with torch.inference_mode():  # Square takes no gradients
        x_adv = ATTACKS["square"](_four_classes(), torch.rand(3, 1, 2, 2), torch.tensor([0, 1, 3]), eps=0.1)
    assert x_adv.shape[0] == 3


def test_square_and_autoattack_refuse_a_fractional_query_count():
    """20.0 passed the check and failed in range() after APGD-CE, APGD-T and FAB-T had run."""
    from robustlab.attacks import autoattack, square
    x, y = torch.rand(3, 1, 2, 2), torch.tensor([0, 1, 3])
    for call in (lambda: square(_four_classes(), x, y, eps=0.1, queries=20.0),
                 lambda: autoattack(_four_classes(), x, y, eps=0.1, queries=20.0, progress=False)):
        with pytest.raises(RobustlabError, match="queries must be an integer"):
            call()


def test_attacks_take_a_zero_dimensional_tensor_radius():
    """The L∞ range check read it as no number at all."""
    from robustlab.attacks import ATTACKS
    x, y = torch.rand(3, 1, 2, 2), torch.tensor([0, 1, 3])
    for name in ("fgsm", "pgd", "apgd", "square"):
        assert within_ball(ATTACKS[name](_four_classes(), x, y, eps=torch.tensor(0.1)), x, "linf", 0.1)


def test_perturb_takes_targets_of_its_own_loss_unchecked():
    """The training loop's building block: checking that labels index the outputs cost a host sync per step; `pgd`
    checks them."""
    from robustlab.attacks import LinfBall, perturb
    x, y = torch.rand(3, 1, 2, 2), torch.tensor([7, 9, 12])  # e.g. pixel indices for a loss of one's own
    x_adv = perturb(_four_classes(), x, y, LinfBall(0.1, 0.05), 2, loss_fn=lambda logits, t: logits.sum(1) * 0 + t)
    assert within_ball(x_adv, x, "linf", 0.1)


def test_dlr_losses_are_finite_for_float16_logits_whose_top_values_tie():
    """The 1e-12 in the denominator is 0 in float16: 0 / 0."""
    from robustlab.attacks.apgd import dlr_loss, dlr_targeted_loss
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0]], dtype=torch.float16)
    y, t = torch.tensor([0]), torch.tensor([1])
    assert torch.isfinite(dlr_loss(logits, y)).all() and torch.isfinite(dlr_targeted_loss(logits, y, t)).all()
    # float64 logits keep their precision: float32 reads 1e8 + 3 and 1e8 + 2 alike
    logits = torch.tensor([[1e8 + 3, 1e8 + 2, 1e8, 1e8 - 5]], dtype=torch.float64)
    assert dlr_loss(logits, torch.tensor([1])).item() == pytest.approx(1 / 3)


@pytest.mark.parametrize("name", [n for n in ALL if n != "fgm"] + ["autoattack", "pgd-at"])
def test_an_linf_radius_beyond_the_pixel_range_is_refused(name):
    """eps=25 meaning 25/255 gave 0% robust accuracy without a word (the CLI and evaluate_model refused it), and
    trained at ε = 25. An L2 radius has no such bound."""
    from robustlab.attacks import ATTACKS, autoattack
    from robustlab.training.run import make_method
    x, y = torch.rand(3, 1, 2, 2), torch.tensor([0, 1, 3])
    attack = ATTACKS.get(name) or partial(autoattack, progress=False)
    with pytest.raises(RobustlabError, match="eps 25: an L∞ radius above 1 exceeds the pixel range"):
        if name == "pgd-at":
            make_method(name, "fashion-mnist", "linf", eps=25)
        else:
            attack(_four_classes(), x, y, eps=25)
    if name in ("pgd", "apgd", "square"):
        assert attack(_four_classes(), x, y, eps=25, norm="l2").shape == x.shape


@pytest.mark.parametrize("name", ALL)
def test_attacks_run_inside_no_grad(name):
    """Evaluation code often holds torch.no_grad(); PGD and its one-step forms raised "does not require grad"."""
    from robustlab.attacks import ATTACKS
    x, y = torch.rand(3, 1, 2, 2), torch.tensor([0, 1, 3])
    with torch.no_grad():
        x_adv = ATTACKS[name](_four_classes(), x, y, eps=0.1)
    assert x_adv.shape == x.shape


@pytest.mark.parametrize("name", ALL)
def test_images_that_require_grad_give_a_constant_without_a_warning(name):
    """Images from a generator network require grad: the input check warned on every call ("Converting a tensor with
    requires_grad=True to a scalar"), and PGD and its one-step forms returned a tensor still in the images' graph."""
    from robustlab.attacks import ATTACKS
    x, y = torch.rand(3, 1, 2, 2).requires_grad_(), torch.tensor([0, 1, 3])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x_adv = ATTACKS[name](_four_classes(), x, y, eps=0.1)
    assert not x_adv.requires_grad and x.grad is None


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_an_empty_batch_gives_an_empty_batch(norm):
    x, y = torch.rand(0, 1, 2, 2), torch.zeros(0, dtype=torch.long)
    assert pgd(_four_classes(), x, y, eps=0.1, norm=norm).shape == x.shape  # L2's random start read x[0]
    assert (fgm if norm == "l2" else fgsm)(_four_classes(), x, y, eps=0.1).shape == x.shape


def test_evaluation_restores_each_modules_own_mode():
    """A caller training with a BatchNorm layer frozen in eval mode: evaluation used to hand the whole model back in
    train mode, BatchNorm included, and the next training step updated the frozen statistics."""
    from robustlab.evaluate import accuracy as evaluate_accuracy
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(4))
    model(torch.rand(2, 1, 6, 6))  # materialize the lazy layer
    model.train()
    model[1].eval()
    x, y = torch.rand(8, 1, 6, 6), torch.randint(0, 4, (8,))
    evaluate_accuracy(model, (x, y), attack=lambda m, x, y, generator=None: pgd(m, x, y, eps=0.1, steps=2))
    assert model.training and model[0].training and not model[1].training


def test_accuracy_takes_an_image_set_or_a_pair_of_tensors(robust_model, fmnist):
    from robustlab.evaluate import accuracy as evaluate_accuracy
    test = fmnist.test.subset(300)
    attack = lambda m, x, y, generator=None: pgd(m, x, y, eps=0.1, steps=3, generator=generator)
    on_set = evaluate_accuracy(robust_model, test, attack=attack, batch_size=100)
    assert evaluate_accuracy(robust_model, (test.images, test.labels), attack=attack, batch_size=100) == on_set
    assert evaluate_accuracy(robust_model, (test.as_float(), test.labels), attack=attack, batch_size=100) == on_set
    with pytest.raises(RobustlabError, match="an ImageSet .* or an \\(images, labels\\) pair, not a Tensor"):
        evaluate_accuracy(robust_model, test.as_float())
    with pytest.raises(RobustlabError, match="normalization belongs inside the model"):  # even without an attack
        evaluate_accuracy(robust_model, ((test.as_float() - 0.286) / 0.353, test.labels))
    with pytest.raises(RobustlabError, match="300 images but 299 labels"):
        evaluate_accuracy(robust_model, (test.images, test.labels[:-1]))
    with pytest.raises(RobustlabError, match="batch_size must be an integer >= 1, got 0"):  # a ZeroDivisionError
        evaluate_accuracy(robust_model, test, batch_size=0)


def test_transfer_attacks_the_source_and_never_runs_the_target(robust_model, standard_model, fmnist):
    from functools import partial

    from robustlab.attacks import transfer
    from robustlab.evaluate import accuracy as evaluate_accuracy
    test = fmnist.test.subset(300)
    x, y = test.as_float()[:50], test.labels[:50]
    made = partial(pgd, eps=0.1, steps=10, step_size=0.025, keep_best=False)
    calls = []
    hook = robust_model.register_forward_hook(lambda *_: calls.append(1))
    try:
        x_t = transfer(standard_model, made)(robust_model, x, y, generator=torch.Generator().manual_seed(3))
    finally:
        hook.remove()
    assert not calls  # black-box: the attacked model is never run
    assert torch.equal(x_t, made(standard_model, x, y, generator=torch.Generator().manual_seed(3)))
    assert within_ball(x_t, x, "linf", 0.1)
    # A robust model resists examples made on a standard one better than its own white-box attack.
    white = evaluate_accuracy(robust_model, test, attack=made, batch_size=100)
    moved = evaluate_accuracy(robust_model, test, attack=transfer(standard_model, made), batch_size=100)
    assert white + 0.03 < moved < evaluate_accuracy(robust_model, test), (white, moved)  # 0.52, 0.58, 0.70 here


@pytest.mark.parametrize("name", ALL)
def test_attacks_say_what_they_take_for_arrays_and_models_returning_more(name):
    """numpy images, list labels and a model returning (logits, features) were AttributeErrors inside."""
    import numpy as np

    from robustlab.attacks import ATTACKS
    x, y = torch.rand(3, 1, 2, 2), torch.tensor([0, 1, 3])
    with pytest.raises(RobustlabError, match="torch tensors, got images as ndarray and labels as list"):
        ATTACKS[name](_four_classes(), np.asarray(x), [0, 1, 3], eps=0.1)
    net = _four_classes()
    pair = type("Pair", (nn.Module,), {"forward": lambda self, x: (net(x), x)})()
    pair.net = net
    if name != "square":  # Square's first pass meets it too, through the same check
        with pytest.raises(RobustlabError, match="returns a tuple; attacks need logits alone"):
            ATTACKS[name](pair, x, y, eps=0.1)


def test_l2_step_is_the_normalized_gradient_and_projection_keeps_points_inside_the_ball():
    """One L2 step has length step_size along the gradient (not the raw gradient); a point already inside the
    L2 ball is left where it is, one outside goes radially back onto its sphere."""
    from robustlab.attacks.threat import project
    torch.manual_seed(0)
    d = 28 * 28
    w = torch.randn(d)

    class Linear(nn.Module):
        def forward(self, x):
            return (x.flatten(1) @ w).unsqueeze(1)

    x = torch.full((1, 1, 28, 28), 0.5)
    y = torch.zeros(1, dtype=torch.long)
    lower_score = lambda logits, y: -logits[:, 0]
    for eps in (1.0, 0.05):  # the step of 0.1 lies inside the first ball and crosses the second
        x_adv = pgd(Linear(), x, y, eps=eps, norm="l2", steps=1, step_size=0.1, random_start=False,
                    loss_fn=lower_score)
        delta = (x_adv - x).flatten()
        torch.testing.assert_close(delta, -w / w.norm() * min(eps, 0.1), rtol=1e-4, atol=1e-6)
    inside = x + 0.2 * (torch.rand(x.shape) - 0.5) / 28
    assert torch.equal(project(inside, x, 1.0, "l2"), inside)
    outside = x + 0.3 * torch.ones_like(x) / 28  # L2 norm 0.3
    torch.testing.assert_close(project(outside, x, 0.1, "l2"), x + 0.1 * torch.ones_like(x) / 28)


@pytest.mark.parametrize("shape", [(4096, 1, 28, 28), (4096, 2)])
def test_l2_random_start_is_uniform_in_the_ball(shape):
    """Uniform in the d-ball: P(‖δ‖ ≤ rε) = r^d. A radius drawn as U (not U^(1/d)) crowds the centre: in 784
    dimensions the median ‖δ‖/ε is then 0.5, not 0.9991."""
    from robustlab.attacks.threat import make_threat
    x = torch.full(shape, 0.5)
    delta = make_threat("l2", 0.1, 0.01).random_start(x, torch.Generator().manual_seed(0), box=False) - x
    radius = delta.flatten(1).norm(dim=1) / 0.1
    d = shape[1] * (shape[2] * shape[3] if len(shape) == 4 else 1)
    assert radius.max() <= 1 + 1e-5
    for r in (0.5, 0.9, 0.99, 0.999):  # the empirical CDF against r^d, within sampling noise of 4096 draws
        assert abs((radius <= r).float().mean().item() - r ** d) < 0.03, (r, d)


class WrongOnlyAtTheCentre(nn.Module):
    """Right (class 1 of 4) everywhere but exactly at the first `wrong` clean images, where it says class 0; flat,
    so an attack gets no gradient. PGD's random start never evaluates x itself: the attack came back with an input
    the model classifies right, and the image counted as robust though the model gets it wrong."""

    def __init__(self, x, wrong):
        super().__init__()
        self.register_buffer("centres", x[:wrong].clone())

    def forward(self, x):
        at = ((x[:, None] - self.centres[None]).flatten(2).abs().amax(2) < 1e-7).any(1).float()
        zero = torch.zeros_like(at)
        return 5 * torch.stack([at, 1 - at, zero, zero], 1) + 0 * x.flatten(1).sum(1, keepdim=True)


def test_an_image_the_model_gets_wrong_is_never_counted_robust():
    from robustlab.evaluate import correct_mask
    x, y = torch.rand(4, 1, 6, 6) * 0.5 + 0.25, torch.ones(4, dtype=torch.long)
    model = WrongOnlyAtTheCentre(x, wrong=2)
    for kwargs in [{}, {"restarts": 3}, {"norm": "l2", "eps": 0.5}]:
        x_adv = pgd(model, x, y, **{"eps": 0.1, **kwargs})
        assert torch.equal(x_adv[:2], x[:2])  # the clean input is the first "iterate" that breaks it
        assert model(x_adv).argmax(1).tolist() == [0, 0, 1, 1]
    target = torch.zeros(4, dtype=torch.long)  # targeted: already classified as the target counts as done
    assert torch.equal(pgd(model, x, target, eps=0.1, targeted=True)[:2], x[:2])
    assert correct_mask(model, x, y, attack=partial(pgd, eps=0.1)).tolist() == [False, False, True, True]
    # Any attack: robust accuracy asks for the clean image too (one returning an input the model gets right).
    step_off = lambda m, x, y, generator=None: (x + 0.05).clamp(0, 1)
    assert correct_mask(model, x, y, attack=step_off).tolist() == [False, False, True, True]
    assert correct_mask(model, x, y).tolist() == [False, False, True, True]
