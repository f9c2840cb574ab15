"""Embedding-space adversarial training for text: the methods' exact mechanics, models, loaders, CLI."""
from __future__ import annotations

import contextlib
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustlab.cli import main
from robustlab.errors import RobustlabError
from robustlab.text import (EmbeddingAdversary, TextCNN, TextSet, TransformerClassifier, Vocab, embedding_pgd,
                            hf_encode, load_text_dataset, read_agnews, read_folders, read_sst2, tokenize)
from robustlab.text.adversary import ascend, project
from robustlab.text.corpus import build_corpus, corpus_rows, load_corpus, split_of
from robustlab.text.training import load_text_model, make_text_method, text_accuracy

FMNIST = "/usr/share/datasets/fashion-mnist"
pytestmark = pytest.mark.usefixtures("one_thread")


class Tiny(nn.Module):
    """Embedding -> probe (sees the perturbed embedding) -> dropout -> masked mean -> linear, with an
    explicit `delta` argument so tests can compute what the hook-based methods should produce."""

    def __init__(self, vocab=30, dim=8, classes=3, dropout=0.5):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.probe = nn.Identity()
        self.mix = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(dim, classes)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, ids, delta=None):
        x = self.embed(ids)
        if delta is not None:
            x = x + delta
        x = self.dropout(torch.tanh(self.mix(self.probe(x))))
        m = (ids != 0).unsqueeze(-1).float()
        return self.fc((x * m).sum(1) / m.sum(1))


def batch(seed=0, n=6, t=7, vocab=30):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, t), generator=g)
    lengths = torch.randint(2, t + 1, (n,), generator=g)
    lengths[0] = t
    ids[torch.arange(t) >= lengths.unsqueeze(1)] = 0  # right padding
    return ids, torch.randint(0, 3, (n,), generator=g)


def record_deltas(model):
    """Every forward pass's δ = probe input − clean embedding output."""
    clean, deltas = [], []
    model.embed.register_forward_hook(lambda m, i, o: clean.append(o.detach().clone()))  # runs before the adversary's
    model.probe.register_forward_hook(lambda m, i, o: deltas.append(i[0].detach() - clean[-1]))
    return deltas


def param_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


METHODS = [("fgm", {}), ("pgd", {"steps": 3}), ("freelb", {"steps": 3}), ("free-at", {"replays": 3})]


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("method,options", METHODS)
def test_perturbation_respects_norm_bound_and_padding(method, options, norm):
    torch.manual_seed(0)
    model = Tiny()
    ids, y = batch()
    deltas = record_deltas(model)
    eps = 0.3
    adversary = EmbeddingAdversary(model, method, eps=eps, norm=norm, **options,
                                   **({"init_mag": 0.5} if method in ("freelb", "free-at") else {}))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    adversary.step(lambda: model(ids), y, opt)
    passes = {"fgm": 2, "pgd": 4, "freelb": 3, "free-at": 3}[method]
    assert len(deltas) == passes
    pad = ids == 0
    assert pad.any()
    for delta in deltas:
        assert torch.all(delta[pad] == 0), "padding positions must never be perturbed"
        size = delta.flatten(1).norm(dim=1) if norm == "l2" else delta.flatten(1).abs().amax(1)
        assert torch.all(size <= eps * (1 + 1e-5))
    assert deltas[-1].abs().sum() > 0
    # each pass after the first sees a δ moved by the last gradient (FreeAT's and FreeLB's random start alone is
    # nonzero: the check above passed with δ never ascending; the optimizer steps move the embeddings by rounding)
    assert all((a - b).abs().amax() > 1e-3 for a, b in zip(deltas, deltas[1:])), "δ must move between passes"
    if method == "fgm":  # r = ε·g/‖g‖: exactly on the sphere (or the cube's surface)
        size = deltas[1].flatten(1).norm(dim=1) if norm == "l2" else deltas[1].flatten(1).abs().amax(1)
        assert torch.allclose(size, torch.full_like(size, eps), rtol=1e-4)
    assert len(model.embed._forward_hooks) == 1, "the adversary's hook must be removed (only the recorder's is left)"


def test_freelb_random_start_is_scaled_by_sequence_length():
    model = Tiny(dropout=0.0)
    ids, y = batch()
    deltas = record_deltas(model)
    EmbeddingAdversary(model, "freelb", steps=1, init_mag=2.0, eps=0).backward(lambda: model(ids), y)
    lengths = (ids != 0).sum(1)
    # Uniform in [-1, 1]·init_mag/√(tokens·dim): every entry of a row within that bound, zero on padding.
    bound = 2.0 / (lengths * 8).float().sqrt()
    assert torch.all(deltas[0].flatten(1).abs().amax(1) <= bound + 1e-7)
    assert torch.all(deltas[0].flatten(1).abs().amax(1) > bound / 2)


@pytest.mark.parametrize("method", ["fgm", "pgd", "freelb"])
def test_embeddings_and_mode_restored(method):
    torch.manual_seed(0)
    model = Tiny()
    ids, y = batch()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    logits = model(ids)
    model.train()
    EmbeddingAdversary(model, method).backward(lambda: model(ids), y)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training
    model.eval()
    assert torch.equal(model(ids), logits)  # no hook left behind


def test_freelb_restores_the_dropout_rng_as_one_plain_pass():
    model = Tiny()
    ids, y = batch()
    torch.manual_seed(5)
    model(ids)
    after_plain = torch.get_rng_state()
    torch.manual_seed(5)
    EmbeddingAdversary(model, "freelb", steps=3).backward(lambda: model(ids), y)
    assert torch.equal(torch.get_rng_state(), after_plain)


@pytest.mark.parametrize("make", [Tiny, lambda: TransformerClassifier(30, 3, dim=16, heads=2, layers=1, ff=32, dropout=0.3)])
def test_freelb_one_step_no_init_equals_plain_training(make):
    torch.manual_seed(0)
    model = make()
    ids, y = batch()
    torch.manual_seed(1)
    F.cross_entropy(model(ids), y).backward()
    plain = param_grads(model)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    EmbeddingAdversary(model, "freelb", steps=1, init_mag=0.0).backward(lambda: model(ids), y)
    freelb = param_grads(model)
    assert plain.keys() == freelb.keys()
    assert all(torch.equal(plain[k], freelb[k]) for k in plain)


def test_freelb_uses_the_same_dropout_mask_in_all_steps():
    torch.manual_seed(0)
    model = Tiny()
    ids, y = batch()
    masks = []
    model.dropout.register_forward_hook(lambda m, i, o: masks.append(o == 0))
    EmbeddingAdversary(model, "freelb", steps=3).backward(lambda: model(ids), y)
    assert len(masks) == 3 and masks[0].any()
    assert all(torch.equal(masks[0], m) for m in masks[1:])
    masks.clear()
    EmbeddingAdversary(model, "fgm").backward(lambda: model(ids), y)  # the check can see a difference
    assert not torch.equal(masks[0], masks[1])


def _by_hand(model, ids, y, delta):
    model.zero_grad(set_to_none=True)
    delta = delta.clone().requires_grad_(True)
    loss = F.cross_entropy(model(ids, delta), y)
    loss.backward()
    return param_grads(model), delta.grad * (ids != 0).unsqueeze(-1)


def test_freelb_and_pgd_gradients_match_a_hand_computation():
    torch.manual_seed(0)
    model = Tiny().eval()  # no dropout, so passes are comparable
    ids, y = batch()
    zero = torch.zeros(*ids.shape, 8)
    # FreeLB, K = 2, no random start: mean of the gradients at δ0 = 0 and δ1 = Π(α·g/‖g‖).
    g0, d0 = _by_hand(model, ids, y, zero)
    delta1 = project(ascend(zero, d0, 0.1, "l2"), 0.05, "l2")
    g1, d1 = _by_hand(model, ids, y, delta1)
    model.zero_grad(set_to_none=True)
    loss, _ = EmbeddingAdversary(model, "freelb", steps=2, init_mag=0.0, step_size=0.1, eps=0.05).backward(
        lambda: model(ids), y)
    for k, v in param_grads(model).items():
        assert torch.allclose(v, (g0[k] + g1[k]) / 2, atol=1e-6), k
    with torch.no_grad():  # the logged loss is the mean of the losses the gradient averaged, not the last pass's
        mean = (F.cross_entropy(model(ids, zero), y) + F.cross_entropy(model(ids, delta1), y)) / 2
    assert torch.allclose(loss, mean, atol=1e-6)
    # PGD, K = 2: clean gradient + gradient at the last iterate δ2.
    delta2 = project(ascend(delta1, d1, 0.1, "l2"), 0.05, "l2")
    g2, _ = _by_hand(model, ids, y, delta2)
    model.zero_grad(set_to_none=True)
    EmbeddingAdversary(model, "pgd", steps=2, step_size=0.1, eps=0.05).backward(lambda: model(ids), y)
    for k, v in param_grads(model).items():
        assert torch.allclose(v, g0[k] + g2[k], atol=1e-6), k


def test_free_at_takes_one_optimizer_step_per_replay():
    model = Tiny()
    ids, y = batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    steps = []
    opt.register_step_post_hook(lambda *a: steps.append(1))
    EmbeddingAdversary(model, "free-at", replays=4).step(lambda: model(ids), y, opt)
    assert len(steps) == 4
    with pytest.raises(RobustlabError, match="replays"):
        EmbeddingAdversary(model, "free-at").backward(lambda: model(ids), y)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_free_at_starts_at_random_and_ascends_from_where_the_last_replay_left_delta(norm):
    torch.manual_seed(0)
    model = Tiny().eval()  # no dropout, so that the replays' gradients can be redone by hand
    ids, y = batch()
    deltas = record_deltas(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the weights stay as the replays saw them
    eps, alpha = 0.5, 0.1
    EmbeddingAdversary(model, "free-at", replays=3, eps=eps, step_size=alpha, init_mag=1.0, norm=norm).step(
        lambda: model(ids), y, opt)
    assert len(deltas) == 3
    assert deltas[0].abs().amax() > 0.01  # FreeLB's baseline starts FreeAT at init_mag, not at zero
    for before, after in zip(deltas, deltas[1:]):
        _, grad = _by_hand(model, ids, y, before)
        # one ascent step from the previous replay's δ: the perturbation accumulates over the replays
        assert torch.allclose(after, project(ascend(before, grad, alpha, norm), eps, norm), atol=1e-6)


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("method", ["freelb", "free-at"])
def test_a_random_start_larger_than_the_budget_is_projected_into_the_ball(method, norm):
    model = Tiny(dropout=0.0)
    ids, y = batch()
    deltas = record_deltas(model)
    options = {"steps": 1} if method == "freelb" else {"replays": 1}
    adversary = EmbeddingAdversary(model, method, eps=0.02, init_mag=5.0, norm=norm, **options)
    adversary.step(lambda: model(ids), y, torch.optim.SGD(model.parameters(), lr=0.0))
    size = deltas[0].flatten(1).norm(dim=1) if norm == "l2" else deltas[0].flatten(1).abs().amax(1)
    # the first pass is trained on too: it must be within the budget like every later one
    assert torch.all(size <= 0.02 * (1 + 1e-5)) and size.max() > 0.019


def test_projection_is_per_example():
    delta = torch.zeros(3, 4, 2)
    delta[0, 0, 0], delta[1, 1, 1], delta[2, 2, 0] = 3.0, 0.5, -2.0
    projected = project(delta, 1.0, "l2")
    # each sentence has its own budget: one long δ must not shrink another's that is already inside the ball
    assert torch.equal(projected[1], delta[1])
    assert torch.allclose(projected.flatten(1).norm(dim=1), torch.tensor([1.0, 0.5, 1.0]))
    assert torch.equal(project(delta, 1.0, "linf")[1], delta[1])


@pytest.mark.parametrize("bad, match", [({"method": "vat"}, "unknown text adversarial method"),
                                        ({"method": "fgm", "steps": 3}, "takes no option steps"),
                                        ({"method": "pgd", "eps": 0}, "eps must be > 0"),
                                        ({"method": "freelb", "norm": "l1"}, "unknown norm"),
                                        ({"method": "freelb", "steps": 0}, "positive integer"),
                                        ({"method": "freelb", "steps": 2.0}, "positive integer, got 2.0"),
                                        ({"method": "free-at", "replays": 2.0}, "positive integer, got 2.0"),
                                        ({"method": "fgm", "eps": float("inf")}, "finite number >= 0, got inf")])
def test_bad_options_are_one_line_errors(bad, match):
    with pytest.raises(RobustlabError, match=match) as info:
        EmbeddingAdversary(Tiny(), **bad)
    assert "\n" not in str(info.value)
    with pytest.raises(RobustlabError, match="get_input_embeddings"):
        EmbeddingAdversary(nn.Linear(2, 2), "fgm")


class WithLogits:
    """What a Hugging Face model returns: an output object holding `.logits`."""

    def __init__(self, logits):
        self.logits = logits


@pytest.mark.parametrize("method, options", METHODS)
def test_a_forward_returning_an_output_object_trains_as_its_logits(method, options):
    ids, y = batch()
    grads = []
    for wrap in (lambda out: out, WithLogits):
        torch.manual_seed(0)
        model = Tiny(dropout=0.0)
        adversary = EmbeddingAdversary(model, method, generator=torch.Generator().manual_seed(1), **options)
        loss, _ = adversary.step(lambda: wrap(model(ids)), y, torch.optim.SGD(model.parameters(), lr=0.1))
        grads.append((loss, param_grads(model)))
    assert torch.equal(grads[0][0], grads[1][0])
    assert all(torch.equal(grads[0][1][k], grads[1][1][k]) for k in grads[0][1])
    model = Tiny()
    robust = embedding_pgd(model, lambda: WithLogits(model(ids)), y, eps=0.1, steps=2)
    assert robust.shape == y.shape


@pytest.mark.parametrize("forward, labels, said", [
    (lambda m, ids: (m(ids), None), None, "the model returns a tuple; attacks need logits alone"),
    (lambda m, ids: m(ids), lambda y: y.float(),
     "labels must be a tensor of one integer per example, got torch.float32"),
    (lambda m, ids: m(ids), lambda y: y.tolist(), "labels must be a tensor of one integer per example, got list"),
    (lambda m, ids: m(ids), lambda y: y[:-1], "logits for 6 examples but there are 5 labels"),
    (lambda m, ids: m(ids), lambda y: y + 3, "labels must index the model's 3 outputs"),
])
def test_what_a_text_forward_or_its_labels_cannot_be_is_said_in_one_line(forward, labels, said):
    model = Tiny()
    ids, y = batch()
    y = labels(y) if labels else y
    with pytest.raises(RobustlabError, match=said):
        EmbeddingAdversary(model, "pgd").backward(lambda: forward(model, ids), y)
    with pytest.raises(RobustlabError, match=said):
        embedding_pgd(model, lambda: forward(model, ids), y, eps=0.1, steps=2)


def test_a_loss_of_ones_own_takes_its_own_targets_and_a_tensor_eps_is_a_number():
    """The label checks are cross-entropy's: soft or multi-label targets under a loss of one's own were refused."""
    model = Tiny()
    ids, y = batch()
    soft = F.one_hot(y, 3).float()
    for method, options in METHODS:
        adversary = EmbeddingAdversary(model, method, loss_fn=F.binary_cross_entropy_with_logits, **options)
        loss, _ = adversary.step(lambda: model(ids), soft, torch.optim.SGD(model.parameters(), lr=0.01))
        assert torch.isfinite(loss)
    assert EmbeddingAdversary(model, "fgm", eps=torch.tensor(0.5)).eps == 0.5
    assert embedding_pgd(model, lambda: model(ids), y, eps=torch.tensor(0.5), steps=2).shape == y.shape


def test_embedding_pgd_runs_under_no_grad_and_says_what_inference_mode_is():
    """It failed in "element 0 of tensors does not require grad", where the image attacks run."""
    torch.manual_seed(0)
    model = TextCNN(30, 3, dim=16, channels=8)
    ids, y = batch(n=8)
    plain = embedding_pgd(model, lambda: model(ids), y, eps=1.0, steps=3)
    with torch.no_grad():
        assert torch.equal(embedding_pgd(model, lambda: model(ids), y, eps=1.0, steps=3), plain)
    with torch.inference_mode(), pytest.raises(RobustlabError, match="inference_mode"):
        embedding_pgd(model, lambda: model(ids), y, eps=1.0, steps=3)
    with pytest.raises(RobustlabError, match="integer steps >= 1, got eps=1.0, steps=2.0"):
        embedding_pgd(model, lambda: model(ids), y, eps=1.0, steps=2.0)


def test_training_checks_the_labels_once_not_every_step(monkeypatch):
    """The Trainer built an adversary per step, so the first-batch check (a host sync) ran on every step."""
    from robustlab.text import adversary as module
    from robustlab.training.methods import StepContext
    calls = []
    monkeypatch.setattr(module, "check_labels", lambda logits, y: calls.append(len(y)))
    model = Tiny()
    method = make_text_method("freelb")
    ids, y = batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ctx = StepContext(model, model, optimizer, torch.Generator().manual_seed(0), contextlib.nullcontext)
    for _ in range(3):
        method.train_step(ctx, ids, y)
    adversary = EmbeddingAdversary(model, "pgd")
    for _ in range(3):
        adversary.backward(lambda: model(ids), y)
    assert calls == [len(y)]  # the adversary of one's own loop, once; the Trainer's, never (its loader made them)


class FirstToken(nn.Module):
    """Predicts class (first token + offset) mod 3, and the next class in train mode, so that a pass in the wrong mode
    or with other weights shows in the predictions."""

    def __init__(self, offset=0.0):
        super().__init__()
        self.offset = nn.Parameter(torch.tensor(float(offset)))

    def forward(self, ids):
        return F.one_hot((ids[:, 0] + int(self.offset.round()) + int(self.training)) % 3, 3).float() + 0 * self.offset


def first_token_set(n=7):
    """n texts whose first token is 1..n, of lengths 1, 2, 3, 1, 2, ... (right-padded), labelled so that FirstToken
    is right on every example but those at indices 1 and 4."""
    ids = torch.zeros(n, 3, dtype=torch.long)
    for i in range(n):
        ids[i, :i % 3 + 1] = torch.arange(i + 1, i + 2 + i % 3)
    labels = (ids[:, 0] % 3 + torch.isin(torch.arange(n), torch.tensor([1, 4]))) % 3
    return TextSet(ids, labels)


def test_text_accuracy_scores_every_example_once_in_eval_mode_through_the_given_forward():
    from robustlab.text.training import text_correct_mask
    data, model = first_token_set(), FirstToken().train()
    expected = [i not in (1, 4) for i in range(7)]
    assert text_correct_mask(model, data, batch_size=3).tolist() == expected  # batches of 3, 3 and 1
    assert text_accuracy(model, data, batch_size=2) == pytest.approx(5 / 7)
    assert model.training  # scored in eval mode, the caller's mode restored
    # an attack gets the caller's forward: here one that reads the classes in reverse
    reverse = lambda m, ids: m(ids).flip(1)  # noqa: E731
    by_itself = lambda m, forward, y: forward().argmax(1) == y  # noqa: E731
    assert torch.equal(text_correct_mask(model, data, forward=reverse, attack=by_itself, batch_size=3),
                       text_correct_mask(model, data, forward=reverse, batch_size=3))


def text_trainer(tmp_path, train, val, attack=None, **config):
    from robustlab.text.data import TextInfo, TextSplits
    from robustlab.text.training import TextTrainer
    from robustlab.training import Standard, TrainConfig
    info = TextInfo("first-token", 3, ("a", "b", "c"), 3)
    return TextTrainer(FirstToken(), Standard(), TextSplits(train, val, val, info, Vocab(["<pad>", "<unk>"])),
                       TrainConfig(**{"batch_size": 4, "augment": "none", "channels_last": False, **config}),
                       tmp_path / "run", {}, val_attack=attack, show_progress=False)


def test_text_training_batches_reshuffle_every_example_once_per_epoch_trimmed_to_their_longest_text(tmp_path):
    data = first_token_set(10)
    trainer = text_trainer(tmp_path, data, data)
    orders = []
    for epoch in (0, 1, 0):
        batches = list(trainer.batches(epoch))
        assert [len(y) for _, y in batches] == [4, 4, 2]
        for ids, y in batches:
            lengths = (ids != 0).sum(1)
            assert ids.shape[1] == lengths.max() and torch.equal(y, data.labels[ids[:, 0] - 1])
        orders.append(torch.cat([ids[:, 0] for ids, _ in batches]).tolist())
    assert sorted(orders[0]) == sorted(orders[1]) == list(range(1, 11))  # every example once
    assert orders[0] != list(range(1, 11)) and orders[0] != orders[1] and orders[0] == orders[2]  # seeded by epoch


def test_text_validation_is_clean_on_all_and_attacked_on_val_n_of_the_eval_models_weights(tmp_path):
    seen = []

    def attack(model, forward, y):
        seen.append(len(y))
        return torch.zeros_like(y, dtype=torch.bool)  # breaks everything

    data = first_token_set(7)
    trainer = text_trainer(tmp_path, data, data, attack=attack, val_n=5, ema=0.5)
    with torch.no_grad():
        trainer.model.offset.fill_(1.0)  # the trained weights: right on 2 of 7; the EMA's (validated): on 5
    assert trainer.validate(0) == {"val_clean": pytest.approx(5 / 7), "val_robust": 0.0}
    assert sum(seen) == 5


def test_text_trainer_options_reach_the_data_the_validation_and_the_saved_model(tmp_path):
    from robustlab.text.training import build_text_trainer
    from robustlab.training import TrainConfig
    folder = sst2_folder(tmp_path / "sst2", "sentence\tlabel\n" + "a fine and good film\t1\na dull and bad film\t0\n" * 10)
    trainer = build_text_trainer(out=tmp_path / "run", dataset="sst2", data_dir=folder, model="textcnn",
                                 method="standard", model_kwargs={"dim": 8, "channels": 4, "widths": [2]},
                                 config=TrainConfig(epochs=1, batch_size=8, val_n=2, threads=1), max_len=3,
                                 val_eps=0.2, show_progress=False)
    assert trainer.data.train.ids.shape[1] == 3 and trainer.val_attack.keywords["eps"] == 0.2
    trainer.fit()
    model = load_text_model(tmp_path / "run")
    assert not model.training and model.embed.weight.shape[1] == 8  # eval mode, the run's own model options
    ids = trainer.data.test.ids
    assert torch.equal(model(ids), trainer.model.eval()(ids))


def test_embedding_pgd_is_an_honest_evaluation_attack():
    torch.manual_seed(0)
    model = TextCNN(30, 3, dim=16, channels=8)
    ids, y = batch(n=32)
    y = model.eval()(ids).argmax(1)  # all correct when clean
    model.train()
    small = embedding_pgd(model, lambda: model(ids), y, eps=0.01, steps=5)
    large = embedding_pgd(model, lambda: model(ids), y, eps=20.0, steps=10)
    assert model.training and all(p.grad is None for p in model.parameters())
    assert small.sum() >= large.sum() and large.float().mean() < 0.5
    # every iterate the model is scored on lies in the ε-ball (per example, over the sequence), zero on padding;
    # steps of size ε would leave it after the second one without the projection
    tiny = Tiny()
    ids, y = batch()
    deltas = record_deltas(tiny)
    for norm in ("l2", "linf"):
        deltas.clear()
        embedding_pgd(tiny, lambda: tiny(ids), y, eps=0.05, steps=4, step_size=0.05, norm=norm)
        assert len(deltas) == 5
        sizes = torch.stack([d.flatten(1).norm(dim=1) if norm == "l2" else d.flatten(1).abs().amax(1) for d in deltas])
        assert torch.all(sizes <= 0.05 * (1 + 1e-5)) and sizes[-1].max() > 0.99 * 0.05, (norm, sizes)
        assert all(torch.all(d[ids == 0] == 0) for d in deltas)


@pytest.mark.parametrize("make", [lambda: TextCNN(30, 3, dim=16, channels=8),
                                  lambda: TransformerClassifier(30, 3, dim=16, heads=2, layers=2, ff=32)])
def test_models_ignore_padding(make):
    torch.manual_seed(0)
    model = make().eval()
    ids, _ = batch()
    wider = torch.cat([ids, torch.zeros(len(ids), 5, dtype=torch.long)], 1)
    assert torch.allclose(model(ids), model(wider), atol=1e-5)
    alone = torch.stack([model(ids[i:i + 1, :int((ids[i] != 0).sum())])[0] for i in range(len(ids))])
    assert torch.allclose(model(ids), alone, atol=1e-5)


def test_hugging_face_model_through_get_input_embeddings(tmp_path):
    transformers = pytest.importorskip("transformers")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "film", "very", "dull", "plot"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = transformers.BertTokenizer(vocab_file=str(tmp_path / "vocab.txt"))
    data = hf_encode(tokenizer, ["good film", "very very dull plot", "bad", "good plot , very good"], [0, 1, 2, 0])
    ids, y = data.ids, data.labels
    assert data.pad_id == 0 and ids[:, 0].eq(2).all() and (ids == 0).any()  # [CLS] first, right padding
    config = transformers.BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=3)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    mask = (ids != data.pad_id).long()
    ln_inputs = []
    model.bert.embeddings.LayerNorm.register_forward_pre_hook(lambda m, i: ln_inputs.append(i[0].detach()))
    EmbeddingAdversary(model, "fgm", eps=0.5).backward(
        lambda: model(input_ids=ids, attention_mask=mask).logits, y, mask=mask)
    delta = ln_inputs[1] - ln_inputs[0]  # adversarial pass minus clean pass
    assert torch.all(delta[ids == 0] == 0)
    assert torch.allclose(delta.flatten(1).norm(dim=1), torch.full((len(ids),), 0.5), rtol=1e-4)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# -- data -------------------------------------------------------------------------------------------
def test_tokenizer_and_vocab():
    assert tokenize("It's GREAT, isn’t it? 42!") == ["it's", "great", ",", "isn't", "it", "?", "42", "!"]
    vocab = Vocab.build(["a b b c", "b c d"], min_freq=2)
    assert vocab.tokens == ["<pad>", "<unk>", "b", "c"]
    assert vocab.encode("b z c", 2) == [2, 1] and vocab.encode("", 5) == [1]
    assert vocab.encode_all(["b", "c b c"], 8).tolist() == [[2, 0, 0], [3, 2, 3]]


def sst2_folder(folder, train, test="sentence\tlabel\nfine\t1\ndull\t0\n"):
    """An SST-2 style folder: train.tsv and dev.tsv (the test split here) holding these TSV texts (`train` may be
    bytes, for files that are not UTF-8)."""
    folder.mkdir()
    (folder / "train.tsv").write_bytes(train if isinstance(train, bytes) else train.encode())
    (folder / "dev.tsv").write_text(test)
    return folder


def test_loaders_parse_the_standard_formats(tmp_path):
    rows = "".join(f"a fine film {i} \"yes\"\t1\nawful , dull film {i}\t0\n" for i in range(20))
    sst = sst2_folder(tmp_path / "sst2", "sentence\tlabel\n" + rows, "sentence\tlabel\nfine film\t1\ndull film\t0\n")
    assert read_sst2(sst / "dev.tsv") == (["fine film", "dull film"], [1, 0])
    data = load_text_dataset("sst2", sst)
    assert (len(data.train), len(data.val), len(data.test)) == (36, 4, 2)  # 10% of training data is validation
    assert data.info.num_classes == 2 and "fine" in data.vocab.index and data.test.labels.tolist() == [1, 0]

    ag = tmp_path / "ag"
    ag.mkdir()
    (ag / "train.csv").write_text('"3","Wall St. Bears","Short-sellers, Wall Street\'s dwindling\\band"\n'
                                  '"2","Cup final","A ""great"" game"\n' * 10)
    (ag / "test.csv").write_text('"1","Peace talks","Leaders met"\n')
    texts, labels = read_agnews(ag / "train.csv")
    assert labels[:2] == [2, 1] and texts[1] == 'Cup final A "great" game' and "\\" not in texts[0]
    assert load_text_dataset("ag-news", ag).info.class_names[2] == "Business"

    imdb = tmp_path / "imdb"
    for split in ("train", "test"):
        for label, words in (("neg", "bad<br />boring"), ("pos", "wonderful")):
            (imdb / split / label).mkdir(parents=True)
            for i in range(3):
                (imdb / split / label / f"{i}_1.txt").write_text(f"{words} {i}")
    (imdb / "train" / "unsup").mkdir()  # the real archive's 50,000 unlabelled reviews: once read as a third class
    (imdb / "train" / "unsup" / "0_0.txt").write_text("no label")
    texts, labels, classes = read_folders(imdb / "train")
    assert classes == ("neg", "pos") and labels == [0, 0, 0, 1, 1, 1] and texts[0] == "bad boring 0"
    assert len(load_text_dataset("imdb", imdb).test) == 6

    with pytest.raises(RobustlabError, match="needs --data-dir"):
        load_text_dataset("sst2")
    with pytest.raises(RobustlabError, match="no label column"):
        (sst / "test.tsv").write_text("index\tsentence\n0\tfine\n")
        read_sst2(sst / "test.tsv")


def test_text_data_a_classifier_cannot_learn_is_refused_in_one_line(tmp_path):
    """Each was a traceback (ZeroDivisionError, IndexError in the loss, UnicodeDecodeError) or trained silently."""
    def sst(train_rows, dev_rows="fine\t1\ndull\t0\n", raw=None):
        return sst2_folder(tmp_path / f"sst{len(list(tmp_path.iterdir()))}",
                           raw if raw is not None else "sentence\tlabel\n" + train_rows, "sentence\tlabel\n" + dev_rows)
    cases = [(sst(""), "training split holds no examples"),
             (sst("good\t1\nbad\t-1\n" * 5), "negative label"),
             (sst("good\t1\nbad\t0\n" * 5, "odd\t7\n"), "test split has label 7, but sst2 has 2 classes"),
             (sst("", raw=b"sentence\tlabel\ngood\xff\t1\n"), r"not UTF-8 text \(it holds byte 0xff\)"),
             (sst("good\t1\n" * 10), r"one class \(positive\); a classifier needs at least two")]
    for folder, message in cases:
        with pytest.raises(RobustlabError, match=message):
            load_text_dataset("sst2", folder)
    imdb = tmp_path / "imdb"
    for split in ("train", "test"):
        (imdb / split / "pos").mkdir(parents=True)
        (imdb / split / "pos" / "0_1.txt").write_text("wonderful")
    with pytest.raises(RobustlabError, match=r"one class \(pos\)"):
        load_text_dataset("imdb", imdb)


def test_vocab_ties_go_alphabetically_and_max_size_counts_pad_and_unk():
    vocab = Vocab.build(["z y x", "y"], min_freq=1)
    assert vocab.tokens == ["<pad>", "<unk>", "y", "x", "z"]  # x and z once each: x first, though z came first
    assert Vocab.build(["z y x", "y"], min_freq=1, max_size=4).tokens == ["<pad>", "<unk>", "y", "x"]


def test_select_drops_only_columns_that_are_padding_in_every_row_and_subset_takes_the_first():
    data = TextSet(torch.tensor([[3, 4, 5, 0], [6, 0, 0, 0], [7, 8, 0, 0]]), torch.tensor([0, 1, 2]))
    assert data.select(torch.tensor([0, 1])).ids.tolist() == [[3, 4, 5], [6, 0, 0]]  # the longest row kept whole
    assert data.select(torch.tensor([1])).ids.tolist() == [[6]]
    assert data.subset(2).labels.tolist() == [0, 1] and data.subset(10).labels.tolist() == [0, 1, 2]


def test_readers_take_the_header_column_order_escaped_line_breaks_and_refuse_empty_folders(tmp_path):
    (tmp_path / "swapped.tsv").write_text("label\tsentence\n1\tfine film\n0\tdull\n")
    assert read_sst2(tmp_path / "swapped.tsv") == (["fine film", "dull"], [1, 0])
    (tmp_path / "ag.csv").write_text('"1","Title","one\\ntwo"\n')  # AG News writes a line break as backslash-n
    assert read_agnews(tmp_path / "ag.csv") == (["Title one two"], [0])
    for name in ("neg", "pos"):
        (tmp_path / "imdb" / name).mkdir(parents=True)
    with pytest.raises(RobustlabError, match="no .txt files in neg, pos"):
        read_folders(tmp_path / "imdb")


@pytest.mark.parametrize("label, message", [(2, "test split has label 2, but sst2 has 2 classes"),
                                            (-1, "negative label")])
def test_a_test_label_outside_the_classes_is_refused(tmp_path, label, message):
    """A test label of num_classes (one past the last class) or below 0 is never predicted: scored as always wrong."""
    folder = sst2_folder(tmp_path / "sst2", "sentence\tlabel\n" + "good\t1\nbad\t0\n" * 5,
                         f"sentence\tlabel\nfine\t1\nodd\t{label}\n")
    with pytest.raises(RobustlabError, match=message):
        load_text_dataset("sst2", folder)


def test_validation_is_a_seeded_tenth_of_the_training_texts_and_the_vocabulary_sees_training_only(tmp_path):
    texts = [f"w{i} common" for i in range(30)]
    folder = sst2_folder(tmp_path / "sst2", "sentence\tlabel\n" + "".join(f"{t}\t{i % 2}\n" for i, t in enumerate(texts)),
                         "sentence\tlabel\nzebra zebra common\t1\nzebra\t0\n")
    data = load_text_dataset("sst2", folder, min_freq=1)
    words = lambda split: [" ".join(data.vocab.tokens[t] for t in row if t) for row in split.ids.tolist()]  # noqa: E731
    order = torch.randperm(30, generator=torch.Generator().manual_seed(0)).tolist()  # the protocol's split: seed 0
    assert words(data.train) == [texts[i] for i in order[3:]] and data.val.labels.tolist() == [i % 2 for i in order[:3]]
    # the vocabulary is the training split's: the validation texts' own words are unknown, as are the test split's
    assert {f"w{i}" for i in order[3:]} == set(data.vocab.index) - {"<pad>", "<unk>", "common"}
    assert words(data.val) == ["<unk> common"] * 3
    assert data.test.ids[0].tolist() == [1, 1, data.vocab.index["common"]]


def test_load_text_dataset_passes_on_its_vocabulary_length_and_size_options(tmp_path):
    folder = sst2_folder(tmp_path / "sst2", "sentence\tlabel\n" + "a b c d e f\t1\nb c d e f\t0\n" * 10)
    data = load_text_dataset("sst2", folder, max_len=3, max_vocab=4)
    assert data.vocab.tokens == ["<pad>", "<unk>", "b", "c"] and data.train.ids.shape[1] == 3
    given = Vocab(["<pad>", "<unk>", "fine"])
    data = load_text_dataset("sst2", folder, vocab=given)
    assert data.vocab is given and data.test.ids.tolist() == [[2], [1]]  # "fine", then "dull" unknown


def fake_package_lists(n_per_section=40):
    """Control-format stanzas like `apt-cache dumpavail`'s, with duplicates and a conflict."""
    words = {"games": "game puzzle arcade strategy board", "python": "python module library bindings pure",
             "perl": "perl module cpan script parser", "misc": "misc other odd rare stuff"}
    out = []
    for section, vocab in words.items():
        count = 2 if section == "misc" else n_per_section
        for i in range(count):
            w = vocab.split()
            desc = f"{w[i % 5]} {w[(i * 3 + 1) % 5]} tool number {i}\n ..."  # long-description lines are kept
            out.append(f"Package: {section}-{i}\nVersion: 1\nSection: contrib/{section}\nDescription: {desc}\n")
    out.append("Package: twin\nSection: games\nDescription: Game puzzle tool number 0\n ...\n")  # duplicate: kept once
    out.append("Package: clash\nSection: games\nDescription: shared text\n")
    out.append("Package: clash2\nSection: python\nDescription: shared text\n")  # two sections: dropped
    return "\n".join(out)


def test_debian_corpus_is_deduplicated_and_split_by_hash(tmp_path):
    rows = corpus_rows(fake_package_lists(), top=3)
    assert {r[1] for r in rows} == {"games", "python", "perl"}  # contrib/ stripped, rarest sections cut
    assert len(rows) == 120 and len({r[2] for r in rows}) == 120
    assert all(r[0] == split_of(r[2]) for r in rows) and {r[0] for r in rows} == {"train", "val", "test"}
    assert all(r[2].endswith(" ...") for r in rows)  # the long description's line is joined on
    assert "shared text" not in {r[2] for r in rows}
    path = build_corpus(tmp_path / "debian-packages.tsv", top=3, package_lists=fake_package_lists())
    for top in (-3, 1):  # -3 kept all sections but the last three, 1 a corpus no classifier can learn
        with pytest.raises(RobustlabError, match="top must be an integer >= 2"):
            build_corpus(tmp_path / "bad.tsv", top=top, package_lists=fake_package_lists())
    assert json.loads(path.with_suffix(".json").read_text())["examples"] == 120
    splits, classes = load_corpus(tmp_path)
    assert classes == ("games", "perl", "python") and sum(len(v[0]) for v in splits.values()) == 120
    for bad in ("train\tgames", "bogus\tgames\ttext"):  # truncated, or an unknown split: once a traceback
        (tmp_path / "broken").mkdir(exist_ok=True)
        (tmp_path / "broken" / "debian-packages.tsv").write_text(f"split\tsection\ttext\ntrain\tperl\tok\n{bad}\n")
        with pytest.raises(RobustlabError, match="line 3: expected split<TAB>section<TAB>text"):
            load_corpus(tmp_path / "broken")


def test_cli_trains_a_text_model_and_rejects_bad_options(tmp_path, capsys):
    build_corpus(tmp_path / "debian-packages.tsv", top=3, package_lists=fake_package_lists(60))
    out = tmp_path / "run"
    args = ["train", "--task", "text", "--data-dir", str(tmp_path), "--method", "freelb", "--steps", "2",
            "--epochs", "3", "--batch-size", "32", "--optimizer", "adam", "--lr", "0.01", "--weight-decay", "0",
            "--val-n", "13", "--threads", "1", "--out", str(out)]
    assert main(args) == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[-1])["val_clean"] > 0.5
    meta = json.loads((out / "config.json").read_text())
    assert meta["method"] == {"name": "freelb", "eps": 0.6, "steps": 2, "step_size": 0.1, "init_mag": 1.0, "norm": "l2"}
    model = load_text_model(out)
    data = load_text_dataset("debian-packages", tmp_path, vocab=model.vocab)
    assert text_accuracy(model, data.test) > 0.5
    assert main(args + ["--resume"]) == 0  # nothing left to train; resumes cleanly
    capsys.readouterr()
    # an image training pointed at it named the method ("'freelb', not 'pgd-at'"), not the task
    assert main(["train", "--data-dir", FMNIST, "--train-n", "64", "--out", str(out), "--resume"]) == 2
    assert "is a text run; resume it with --task text" in capsys.readouterr().err

    # `robustlab eval` reads a text run (the data folder from its metadata) and writes the usual report
    assert main(["eval", str(out), "--steps", "3", "--sweep-n", "20", "--json", "--threads", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["attack"]["name"] == "embedding-pgd" and result["n"] == len(data.test)
    assert result["clean"] == text_accuracy(model, data.test) and 0 <= result["robust"] <= result["clean"]
    report = (out / "report.md").read_text()
    assert "| evaluation | texts | accuracy |" in report and "accuracy_vs_eps.png" in report
    assert main(["eval", str(out), "--suite", "standard"]) == 2
    assert "text run" in capsys.readouterr().err
    # a corpus with other sections (rebuilt from other package lists) would be scored with the wrong label ids
    other = tmp_path / "other"
    build_corpus(other / "debian-packages.tsv", top=2, package_lists=fake_package_lists(60))
    assert main(["eval", str(out), "--data-dir", str(other), "--n", "10"]) == 2
    assert "trained on ['games', 'perl', 'python']" in capsys.readouterr().err
    for command in (["mrc", str(out)], ["rift", str(out), "--out", str(tmp_path / "rift")]):
        assert main(command) == 2
        assert "text run" in capsys.readouterr().err  # not "unknown dataset 'debian-packages'"
    # --train-n takes the first texts (it once crashed: token ids were treated as a streamed image Dataset)
    assert main([*args[:-1], str(tmp_path / "few"), "--train-n", "40", "--epochs", "1"]) == 0
    assert json.loads((tmp_path / "few" / "metrics.jsonl").read_text())["train_images_per_s"] > 0
    # counts beyond the corpus were cut down to it without a word
    for extra, message in ((["--train-n", "1000"], "--train-n 1000 is more than the 141 training texts (the 13 "
                                                   "validation texts are not among them); give at most 141"),
                           (["--val-n", "16"], "--val-n 16 is more than the 13 validation texts; give at most 13")):
        capsys.readouterr()
        assert main([*args[:-1], str(tmp_path / "many"), "--epochs", "1", *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    # an L∞ run is evaluated in the L2 ball its validation used (it was L∞ at the L2 radius ε = 0.5: 0% robust)
    linf = [*args[:-1], str(tmp_path / "linf"), "--train-n", "40", "--epochs", "1", "--method", "pgd", "--norm",
            "linf", "--eps", "0.01", "--step-size", "0.004"]
    assert main(linf) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "linf"), "--n", "10", "--steps", "2", "--sweep-n", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["attack"]["norm"] == "l2"
    assert main(["eval", str(tmp_path / "linf"), "--n", "10", "--norm", "linf"]) == 2
    assert "--norm linf needs --eps" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "linf"), "--n", "10", "--norm", "l1"]) == 2
    assert capsys.readouterr().err.startswith("robustlab: error: unknown norm 'l1'")  # before the clean pass, not after

    bad = [(["--method", "fgm", "--steps", "3"], "--method fgm takes no --steps; its options: --eps, --norm"),
           (["--method", "fgm", "--init-mag", "1"], "--method fgm takes no --init-mag"),  # was init_mag
           (["--method", "standard", "--eps", "3"], "--method standard trains without attacks"),  # once ignored
           (["--method", "standard", "--norm", "linf"], "--method standard takes no --norm; its options: none"),
           (["--method", "pgd-at"], "unknown text method 'pgd-at'"),
           (["--norm", "l1"], "unknown norm 'l1'"),
           (["--model", "cnn-small"], "unknown text model 'cnn-small'"),
           (["--dataset", "mnist"], "unknown text dataset 'mnist'"),
           (["--method", "fgm", "--beta", "6", "--separate-batches"],  # both were once ignored without a word
            "--beta, --separate-batches: image options"),
           (["--width", "8"], "--width: image options"),
           (["--method", "pgd", "--eps", "0"], "eps must be > 0 for pgd")]  # it left a run folder behind
    for extra, message in bad:
        code = main(["train", "--task", "text", "--data-dir", str(tmp_path), "--out", str(tmp_path / "bad"), *extra])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, (extra, err)
        assert not (tmp_path / "bad").exists(), extra
    with pytest.raises(SystemExit) as info:
        main(["train", "--task", "video", "--out", str(tmp_path / "bad")])
    assert info.value.code == 2
