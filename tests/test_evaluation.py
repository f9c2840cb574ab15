"""`evaluate_model`: `robustlab eval`'s evaluation and report for a model that robustlab did not train."""
from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from torch import nn

from robustlab import provenance
from robustlab.attacks import pgd
from robustlab.errors import RobustlabError
from robustlab.evaluate import accuracy, evaluate_model, load_adversarial


class OwnModel(nn.Module):
    """A model as a user brings it: its own class, normalization inside, no robustlab metadata."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def test_a_models_own_figures_are_the_attacks_figures(fmnist, robust_model, one_thread):
    model = OwnModel(robust_model)
    result = evaluate_model(model, fmnist, suite="none", n=100, steps=5, restarts=2, seed=3)  # no out: no sweep
    attack = partial(pgd, eps=0.1, steps=5, step_size=0.05, restarts=2)  # 2.5·ε/steps, the protocol's rule
    assert result["clean"] == accuracy(model, fmnist.test.subset(100))
    assert result["robust"] == accuracy(model, fmnist.test.subset(100), attack=attack, seed=3)
    assert result["label"] == "PGD-5×2 linf ε=0.1 step 0.05" and result["n"] == 100
    assert result["run"] == {"model": "OwnModel", "dataset": "fashion-mnist"} and "sweep" not in result
    on_val = evaluate_model(model, fmnist, split="val", suite="none", n=50, steps=5, restarts=1, sweep_n=0)
    assert on_val["clean"] == accuracy(model, fmnist.val.subset(50))


def test_the_standard_suite_writes_the_runs_report_for_a_model_of_ones_own(fmnist, robust_model, tmp_path,
                                                                            one_thread):
    model = OwnModel(robust_model).train()  # the caller's mode comes back
    out = tmp_path / "report"
    result = evaluate_model(model, fmnist, out=out, name="my-net", n=30, steps=3, restarts=1, aa_steps=2,
                            aa_queries=10, sanity_n=20, sweep_n=20, batch_size=15)
    assert model.training and model.inner.training
    names = [row["name"] for row in result["rows"]]
    assert names[0] == "clean" and any("after square (off-protocol" in n for n in names)
    assert names[-1] == "OOD mean over 25 corruptions × 5 severities"
    assert result["sanity"]["verdict"] and result["sweep"]["n"] == 20
    assert json.loads((out / "report.json").read_text())["rows"] == result["rows"]
    report = (out / "report.md").read_text()
    assert report.startswith("# Evaluation of `my-net`") and "- model: `my-net`, dataset: `fashion-mnist`\n" in report
    # where it was measured, as the protocol asks every result to record
    assert result["machine"] == provenance.machine() and result["commit"] == provenance.commit()
    assert f"Measured on {provenance.machine()}, robustlab commit {provenance.commit()}, in " in report
    for plot in ("accuracy_vs_eps.png", "adversarial_examples.png", "per_class.png", "corruptions.png"):
        assert f"({plot})" in report and (out / plot).stat().st_size > 1000
    # again into the same folder: AutoAttack's finished state is taken, and its time with it (it said 0.0)
    again = evaluate_model(model, fmnist, out=out, name="my-net", n=30, steps=3, restarts=1, aa_steps=2,
                           aa_queries=10, sanity_n=20, sweep_n=0, batch_size=15, ood=False)
    assert again["rows"][:len(names) - 1] == result["rows"][:-1]
    assert again["wall_s_by_step"]["autoattack"] >= round(sum(result["autoattack"]["seconds"].values()), 1) > 0


class Colour(nn.Module):  # a CIFAR-shaped model, given grayscale 28×28 images
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 30 * 30, 10))

    def forward(self, x):
        return self.net(x)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(784, 10)

    def forward(self, x, mask):
        return self.linear(x.flatten(1)) * mask


class WithFeatures(TwoInputs):
    def forward(self, x):
        return self.linear(x.flatten(1)), x


LINEAR = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))


@pytest.mark.parametrize("model, options, words", [
    (Colour(), {}, "the model fails on fashion-mnist images (1×28×28, values in [0, 1])"),
    (nn.Sequential(nn.Flatten(), nn.Linear(784, 7)), {}, "returns (2, 7) for 2 fashion-mnist images (1×28×28); "
                                                         "evaluation needs logits alone, of shape (2, 10)"),
    (lambda x: x, {}, "must be a torch.nn.Module"),
    (nn.Flatten(), {"split": "val", "suite": "none", "out": "x"}, "split='val' writes no report"),
    (nn.Flatten(), {"split": "val"}, "on split='val' use suite='none'"),
    (nn.Flatten(), {"attack": "fgsm", "steps": 5}, "attack fgsm takes one step of size ε; steps applies to pgd"),
    (nn.Flatten(), {"attack": "fgsm", "norm": "l2"}, "attack fgsm is the linf one-step attack; for norm l2 use attack fgm"),
    (nn.Flatten(), {"attack": "apgd-ce", "step_size": 0.01}, "drop step_size"),
    (nn.Flatten(), {"attack": "cw"}, "unknown attack 'cw'; allowed: apgd-ce, fgm, fgsm, pgd, pgd-smooth"),
    (nn.Flatten(), {"eps": 2}, "eps 2: an L∞ radius above 1"),
    (nn.Flatten(), {"eps": 0}, "suite='standard' needs eps > 0"),
    (LINEAR, {"attack": "pgd-smooth"}, "attack pgd-smooth: the model has no nn.ReLU modules to smooth; use pgd"),
    (TwoInputs(), {}, "the model fails on fashion-mnist images (1×28×28, values in [0, 1]): TypeError:"),
    (WithFeatures(), {}, "the model returns a tuple for 2 fashion-mnist images"),
    (nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).double(), {}, "the model's weights are torch.float64"),
    # a report must never call clean accuracy robust, nor run another budget than the one it names
    (LINEAR, {"suite": "none", "eps": -0.1}, "eps must be a finite number >= 0"),
    (LINEAR, {"suite": "none", "eps": float("nan")}, "eps must be a finite number >= 0"),
    (LINEAR, {"suite": "none", "restarts": 0}, "restarts must be an integer >= 1, got 0"),
    (LINEAR, {"suite": "none", "n": 0}, "n must be an integer >= 1, got 0"),
    (LINEAR, {"suite": "none", "n": 2.5}, "n must be an integer >= 1, got 2.5"),
    (LINEAR, {"suite": "none", "steps": 0}, "steps must be an integer >= 1, got 0"),
    (LINEAR, {"suite": "none", "batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
    (LINEAR, {"suite": "none", "sweep_n": -5}, "sweep_n must be an integer >= 0, got -5"),
    (LINEAR, {"attack": "pgd-smooth", "tau": 0}, "tau must be a finite number > 0, got 0"),
    (LINEAR, {"suite": "none", "step_size": True}, "step_size must be a finite number > 0, got True"),
    (LINEAR, {"suite": "none", "seed": 2 ** 64}, "seed must be an integer from 0 to 9223372036854775807"),
    (LINEAR, {"suite": "none", "seed": None}, "seed must be an integer from 0 to 9223372036854775807, got None"),
    (LINEAR, {"suite": "none", "sweep_n": None}, "sweep_n must be an integer >= 0, got None"),
    (LINEAR, {"suite": "none", "data_dir": "/no/such/dir"}, "these Splits are loaded already: drop data_dir"),
    (LINEAR, {"suite": "none", "aa_n": 5, "ood": False}, "aa_n, ood apply to suite='standard'"),
    (LINEAR, {"suite": "none", "cifar_c_dir": "/no/such/dir"}, "cifar_c_dir applies to suite='standard'"),
    (LINEAR, {"ood": False, "cifar_c_dir": "/no/such/dir"}, "cifar_c_dir names the corruption files of the OOD suite"),
    (LINEAR, {"cifar_c_dir": "/no/such/dir"}, "labels.npy not found in /no/such/dir"),  # before the clean pass
])
def test_a_model_or_option_that_cannot_work_is_one_line_before_any_attack(fmnist, model, options, words):
    with pytest.raises(RobustlabError) as error:
        evaluate_model(model, fmnist, **{"n": 10, **options})
    assert words in str(error.value) and "\n" not in str(error.value)


def test_a_dataset_name_is_read_like_load_datasets(fmnist, robust_model, tmp_path):
    with pytest.raises(RobustlabError, match="fashion-mnist"):
        evaluate_model(OwnModel(robust_model), "fashion-mnist", data_dir=tmp_path, suite="none", n=10)
    with pytest.raises(RobustlabError, match="data must be a dataset name or the Splits that load_dataset returns, "
                                             "not a ImageSet"):
        evaluate_model(OwnModel(robust_model), fmnist.test, suite="none", n=10)


def test_fgm_takes_its_own_norm_and_the_report_says_how_to_repeat_it(fmnist, tmp_path, one_thread):
    result = evaluate_model(LINEAR, fmnist, attack="fgm", suite="none", n=20, sweep_n=0, out=tmp_path)
    assert result["attack"]["norm"] == "l2" and result["label"] == "FGM l2 ε=1.5"
    assert result["command"] == f"evaluate_model(Sequential, 'fashion-mnist', out={str(tmp_path)!r}, n=20, " \
                                "attack='fgm', suite='none', sweep_n=0)"
    assert result["command"] in (tmp_path / "report.md").read_text()


def test_the_sweep_of_a_large_linf_radius_stops_at_the_pixel_range(fmnist, tmp_path, one_thread):
    """Its 2ε point at ε = 0.6 is a radius the attacks refuse (above 1, where ε = 1 reaches every image)."""
    result = evaluate_model(LINEAR, fmnist, eps=0.6, steps=2, restarts=1, suite="none", n=10, sweep_n=10, out=tmp_path)
    assert [e for e, _ in result["sweep"]["points"]] == pytest.approx([0, 0.15, 0.3, 0.45, 0.6, 0.9])


def test_saved_adversarial_examples_are_the_ones_behind_the_figure(fmnist, robust_model, tmp_path, one_thread):
    from robustlab.checkpoint import weights_digest
    path = tmp_path / "adv" / "pgd.safetensors"
    model = OwnModel(robust_model)
    result = evaluate_model(model, fmnist, suite="none", n=60, steps=5, restarts=2, seed=1, sweep_n=0, batch_size=25,
                            save_adversarial=path)
    tensors, meta = load_adversarial(path)
    assert torch.equal(tensors["clean"], fmnist.test.images[:60])
    x, adversarial = tensors["clean"].float() / 255, tensors["adversarial"]
    assert adversarial.shape == x.shape and adversarial.dtype == torch.float32
    assert 0 <= adversarial.min() and adversarial.max() <= 1 and (adversarial - x).abs().max() <= 0.1 + 1e-6
    assert torch.equal(tensors["labels"], fmnist.test.labels[:60])
    assert (tensors["predictions"] == tensors["labels"]).float().mean().item() == pytest.approx(result["robust"])
    assert (tensors["clean_predictions"] == tensors["labels"]).float().mean().item() == pytest.approx(result["clean"])
    with torch.no_grad():
        assert torch.equal(tensors["predictions"], model(adversarial).argmax(1))
    assert meta["label"] == result["label"] and meta["attack"]["seed"] == 1 and meta["n"] == 60
    assert meta["batch_size"] == 25 and meta["weights"] == weights_digest(model)  # the seeds depend on the batches
    assert meta["command"] == result["command"]
    # an earlier call's examples may be replaced; nothing else
    evaluate_model(model, fmnist, suite="none", n=10, steps=1, sweep_n=0, save_adversarial=path)
    assert load_adversarial(path)[1]["n"] == 10


def _checkpoint(tmp_path):
    from robustlab import checkpoint
    checkpoint.save(tmp_path / "model.safetensors", {"w": torch.zeros(1)}, {"model": {"name": "mlp"}})
    return tmp_path / "model.safetensors"


def test_a_file_for_adversarial_examples_is_checked_before_the_attack(fmnist, tmp_path):
    model = _checkpoint(tmp_path)
    for where, words in ((tmp_path, "names no file"), (f"{tmp_path}/new/", "names no file"), ("", "names no file"),
                         (model, "exists and holds no adversarial examples"),
                         ("/proc/adv.safetensors", "cannot write in /proc")):
        with pytest.raises(RobustlabError, match=words):
            evaluate_model(LINEAR, fmnist, suite="none", n=10, save_adversarial=where)
    with pytest.raises(RobustlabError, match="needs ε > 0"):
        evaluate_model(LINEAR, fmnist, suite="none", n=10, eps=0, save_adversarial=tmp_path / "x.safetensors")
    with pytest.raises(RobustlabError, match="a file of the evaluation's own report"):  # AutoAttack would write it
        evaluate_model(LINEAR, fmnist, n=10, out=tmp_path / "new", save_adversarial=tmp_path / "new" /
                       "autoattack_state.safetensors")
    with pytest.raises(RobustlabError, match="the model fails"):  # and leaves no folder for the examples behind
        evaluate_model(Colour(), fmnist, suite="none", n=10, save_adversarial=tmp_path / "new" / "x.safetensors")
    assert not (tmp_path / "new").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["model.json",
                                                                                               "model.safetensors"]


def test_load_adversarial_says_what_a_file_is_not(tmp_path):
    from safetensors.torch import save_file
    (tmp_path / "text.safetensors").write_text("hello")
    save_file({"a": torch.zeros(2)}, str(tmp_path / "bare.safetensors"))
    save_file({"a": torch.zeros(2)}, str(tmp_path / "list.safetensors"), metadata={"robustlab": "[1, 2]"})
    save_file({"a": torch.zeros(2)}, str(tmp_path / "empty.safetensors"),
              metadata={"robustlab": '{"format": "robustlab-adversarial/1", "n": 2}'})
    for name, words in (("text", "not a readable safetensors file"), ("bare", "without robustlab's metadata"),
                        ("list", "without robustlab's metadata"), ("empty", "is damaged: expected clean"),
                        ("", "is a folder")):
        with pytest.raises(RobustlabError, match=words):
            load_adversarial(tmp_path / f"{name}.safetensors" if name else tmp_path)
    with pytest.raises(RobustlabError, match="holds no adversarial examples"):
        load_adversarial(_checkpoint(tmp_path))  # a model's checkpoint, not examples


def test_accuracy_refuses_labels_it_cannot_score(one_thread):
    """A label beyond the model's outputs counted as a wrong prediction without a word (pgd refused it), and (N, 1)
    labels failed in a broadcasting error."""
    from robustlab.attacks import fgsm
    from robustlab.evaluate import accuracy
    x = torch.rand(8, 1, 28, 28)
    with pytest.raises(RobustlabError, match="10 outputs .0 to 9., got 10"):
        accuracy(LINEAR, (x, torch.full((8,), 10)))
    with pytest.raises(RobustlabError, match="one integer per image, got torch.int64 .8, 1."):
        accuracy(LINEAR, (x, torch.zeros(8, 1, dtype=torch.long)))
    attack = partial(fgsm, eps=0.1)  # fgsm took no generator
    assert 0 <= accuracy(LINEAR, (x, torch.zeros(8, dtype=torch.long)), attack=attack) <= 1
    pair = type("Pair", (torch.nn.Module,), {"forward": lambda self, x: (LINEAR(x), x)})()
    with pytest.raises(RobustlabError, match="returns a tuple; attacks need logits alone"):  # at the clean pass
        accuracy(pair, (x, torch.zeros(8, dtype=torch.long)), attack=attack)


def test_importing_and_plotting_leave_a_users_matplotlib_backend_alone(tmp_path):
    """robustlab.rift imported pyplot and called matplotlib.use("Agg"): in a notebook, plots stopped showing. And
    every command paid half a second for matplotlib and scipy before doing anything."""
    import subprocess
    import sys
    code = f"""
import sys
import robustlab.cli, robustlab.evaluate.suite, robustlab.rift, robustlab.training
assert not [m for m in ("matplotlib", "scipy") if m in sys.modules], "imported at import"
import matplotlib
matplotlib.use("svg")
from robustlab.evaluate.report import plot_accuracy_vs_eps
plot_accuracy_vs_eps({{"pgd": [(0.0, 0.9), (0.1, 0.6)]}}, r"{tmp_path / 'plot.png'}", "t", "linf")
assert matplotlib.get_backend() == "svg" and "matplotlib.pyplot" not in sys.modules
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"


def test_per_class_bars_are_each_class_s_clean_and_robust_accuracy(tmp_path, monkeypatch):
    """The per-class plot's bars: per class, the share of its images clean-correct and robust."""
    from matplotlib.figure import Figure
    from robustlab.evaluate.suite import plot_per_class
    saved = []
    monkeypatch.setattr(Figure, "savefig", lambda self, path, **kw: saved.append(self))
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
    clean = torch.tensor([1, 1, 1, 0, 1, 0, 1, 1, 1, 1, 1], dtype=torch.bool)
    robust = torch.tensor([1, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0], dtype=torch.bool)
    plot_per_class(["a", "b", "c"], clean, robust, labels, tmp_path / "p.png", "PGD")
    bars = [p.get_height() for p in saved[0].axes[0].patches]
    assert bars == pytest.approx([75, 50, 100, 25, 0, 60])  # clean a, b, c, then robust a, b, c
    ticks = [t.get_text() for t in saved[0].axes[0].get_xticklabels()]
    assert ticks == ["a (4)", "b (2)", "c (5)"]


def test_each_sweep_point_is_measured_at_its_own_radius_on_the_first_n_images():
    from robustlab.data import ImageSet
    from robustlab.evaluate.evaluation import eps_sweep
    test = ImageSet(torch.zeros(30, 1, 2, 2, dtype=torch.uint8), torch.zeros(30, dtype=torch.long))
    asked = []

    def measure(images, e, progress=None):  # a figure that falls with the radius it is measured at
        asked.append(len(images))
        return 1 - e
    sweep = eps_sweep(measure, test, 0.2, 12, max_eps=1.0)
    radii = [0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4]
    assert sweep["n"] == 12 and set(asked) == {12}
    assert [e for e, _ in sweep["points"]] == pytest.approx(radii)
    assert [a for _, a in sweep["points"]] == pytest.approx([1 - e for e in radii])


@pytest.mark.parametrize("attack", ["pgd", "pgd-smooth"])
def test_the_attack_at_another_radius_scales_its_step_with_it(attack):
    """The sweep and the sanity checks run the evaluation's attack at other radii: 50 steps of 0.01 cannot reach the
    edge of a ball of 0.8, and such a point would overstate the accuracy there."""
    from robustlab.evaluate.evaluation import attack_at_radius
    attack_at, label = attack_at_radius(attack, "linf", 0.1, 50, 0.01, 3, None)
    assert label.startswith("PGD-50×3 linf ε=0.1 step 0.01")
    for e in (0.025, 0.2, 0.8):
        options = attack_at(e).keywords
        assert options["eps"] == e and options["step_size"] == pytest.approx(e / 10)
        assert (options["steps"], options["restarts"]) == (50, 3)


@pytest.mark.parametrize("dataset, norm, budget", [
    ("fashion-mnist", "linf", (0.1, 50, 0.01, 3)), ("fashion-mnist", "l2", (1.5, 50, 0.15, 3)),
    ("mnist", "linf", (0.3, 100, 0.01, 1)), ("cifar10", "linf", (8 / 255, 20, 2 / 255, 1)),
    ("cifar100", "l2", (0.5, 20, 0.0625, 1)),
    # image folders and .npy arrays hold natural images of unknown origin: CIFAR's budget
    ("folder", "linf", (8 / 255, 20, 2 / 255, 1)), ("npy", "l2", (0.5, 20, 0.0625, 1)),
])
def test_the_default_attack_is_the_protocols_evaluation_pgd(dataset, norm, budget):
    """ε, steps, step and restarts of the protocol's table (Fashion-MNIST's PGD-50×3: worst case of three starts)."""
    from robustlab.evaluate.evaluation import attack_budget
    got_norm, eps, steps, step_size, restarts = attack_budget("pgd", dataset, norm)
    assert got_norm == norm and (eps, steps, step_size, restarts) == pytest.approx(budget)
    assert attack_budget("apgd-ce", dataset, norm) == (norm, pytest.approx(budget[0]), 100, None, 1)


def test_the_suite_draws_its_attacks_own_mask_per_class_and_marks_lowered_queries_off_protocol(tmp_path, monkeypatch,
                                                                                                one_thread):
    from robustlab.data import ImageSet
    from robustlab.data.datasets import DatasetInfo
    from robustlab.evaluate import suite
    from robustlab.evaluate.accuracy import fraction
    drawn = {}
    monkeypatch.setattr(suite, "plot_per_class",
                        lambda names, clean, robust, labels, path, label: drawn.update(clean=clean, robust=robust))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 10)).eval()
    x = torch.randint(0, 256, (12, 1, 4, 4), dtype=torch.uint8)
    with torch.no_grad():
        y = model(x.float() / 255).argmax(1)  # every image starts correct
    info = DatasetInfo("toy", 10, (1, 4, 4), (0.5,), (0.25,), tuple("abcdefghij"), "none")
    rows, _, _ = suite.run_suite(model, ImageSet(x, y), info, norm="linf", eps=0.2,
                                 attack_at=lambda e: partial(pgd, eps=e, norm="linf", steps=2, step_size=e),
                                 pgd_label="PGD-2", out_dir=tmp_path, aa_steps=100, aa_queries=10, sanity_n=4,
                                 ood=False, show=False)
    assert fraction(drawn["clean"]) == rows[0]["accuracy"] == 1.0
    assert fraction(drawn["robust"]) == rows[1]["accuracy"] < 1.0
    stages = [row["name"] for row in rows if row["name"].startswith("AutoAttack")]
    assert stages and all(name.endswith("(off-protocol: 100 steps, 10 queries)") for name in stages)


def test_a_model_left_in_training_mode_is_scored_in_eval_mode_and_left_unchanged(one_thread):
    """BatchNorm in training mode normalizes each batch by its own statistics and moves its running ones: the figure
    would depend on the batch size, and measuring it would change the model."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    with torch.no_grad():
        model(torch.rand(64, 1, 4, 4) * 3)  # running statistics unlike any batch's below
    x = torch.rand(32, 1, 4, 4)
    with torch.no_grad():
        y = model.eval()(x).argmax(1)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert accuracy(model, (x, y), batch_size=8) == 1.0
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_the_gallery_shows_the_first_correctly_classified_images(one_thread):
    """Its title says "on the first N correctly classified test images": a misclassified one would show an
    'adversarial example' that the attack never had to make."""
    from robustlab.attacks import fgsm
    from robustlab.data import ImageSet
    from robustlab.evaluate.evaluation import gallery_examples
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()
    images = torch.randint(0, 256, (40, 1, 4, 4), dtype=torch.uint8)
    with torch.no_grad():
        predicted = model(images.float() / 255).argmax(1)
    labels = torch.where(torch.arange(40) % 3 == 0, (predicted + 1) % 3, predicted)  # every third image is wrong
    x, x_adv, y, pred = gallery_examples(model, ImageSet(images, labels), partial(fgsm, eps=0.1), n=5)
    right = (labels == predicted).nonzero().squeeze(1)[:5]
    assert torch.equal(x, images[right].float() / 255) and torch.equal(y, labels[right])
    with torch.no_grad():
        assert torch.equal(pred, model(x_adv).argmax(1))


def test_the_report_keeps_its_markdown_in_report_md_and_its_figures_in_report_json(tmp_path):
    """report.json holds the figures (what `summary` reads), report.md the readable form: the sanity checks' table
    is written into the second only."""
    from robustlab.evaluate.report import write_report
    results = {"run": {"model": "cnn-small", "dataset": "fashion-mnist", "method": "pgd-at", "epoch": 2, "epochs": 3},
               "rows": [{"name": "clean", "n": 10, "accuracy": 0.5}], "wall_s": 2.0,
               "sanity": {"verdict": "trustworthy", "n": 5}, "sanity_markdown": "| check | passed |"}
    write_report(tmp_path, results, {}, "run")
    saved = json.loads((tmp_path / "report.json").read_text())
    assert "sanity_markdown" not in saved and saved["sanity"] == results["sanity"]
    text = (tmp_path / "report.md").read_text()
    assert "method: `pgd-at`, epoch 3 of 3" in text and "| clean | 10 | 50.00% |" in text
    assert "On the first 5 of the evaluated images" in text and "| check | passed |" in text
