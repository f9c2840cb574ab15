"""The Trainer: learning, validation-based best epoch, checkpoints, exact resume after a kill."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from robustlab import checkpoint, load_model, provenance
from robustlab.errors import RobustlabError
from robustlab.training import TrainConfig, build_trainer, learning_rate

FMNIST = "/usr/share/datasets/fashion-mnist"


def small_trainer(out, epochs=2, **config):
    cfg = TrainConfig(**{"epochs": epochs, "train_n": 512, "val_n": 100, "threads": 1, **config})
    return build_trainer(dataset="fashion-mnist", model="cnn-small", method="pgd-at", out=out, data_dir=FMNIST,
                         config=cfg, method_kwargs={"steps": 3, "step_size": 0.04}, show_progress=False)


def test_robust_training_beats_standard_training_under_attack(robust_model, standard_model, fmnist):
    from robustlab.attacks import pgd
    from robustlab.evaluate import accuracy
    attack = lambda m, x, y, generator=None: pgd(m, x, y, eps=0.1, steps=10, step_size=0.025, generator=generator)
    test = fmnist.test.subset(500)
    assert accuracy(robust_model, test, attack=attack) > accuracy(standard_model, test, attack=attack) + 0.05


def test_metrics_checkpoints_and_best_epoch(fmnist, tmp_path):
    trainer = small_trainer(tmp_path, epochs=3)
    trainer.fit()
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert {"train_loss", "train_acc", "val_clean", "val_robust", "elapsed_s"} <= rows[0].keys()
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    best_epoch = max(rows, key=lambda r: r["val_robust"])["epoch"]
    assert checkpoint.read_metadata(tmp_path / "best.safetensors")["epoch"] == best_epoch
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]  # atomic writes leave nothing behind
    meta = json.loads((tmp_path / "last.json").read_text())
    assert meta["dataset"]["name"] == "fashion-mnist" and meta["versions"]["torch"] == torch.__version__
    assert meta["machine"] == provenance.machine() and meta["commit"] == provenance.commit()
    assert meta["config"]["augment"] is None and meta["dataset"]["augment"] == "crop"  # the default, as it ran
    best = checkpoint.read_metadata(tmp_path / "best.safetensors")
    assert best["metrics"] == rows[best_epoch]  # the figures of the weights it holds, not of the last epoch
    from robustlab.data import DATASETS
    info = DATASETS["fashion-mnist"]
    assert (best["dataset"]["mean"], best["dataset"]["std"]) == (list(info.mean), list(info.std))
    no_crops = small_trainer(tmp_path / "no-crops", augment="none")
    assert no_crops.run_meta["dataset"]["augment"] == "none"  # not the dataset's default beside config "none"


def test_keep_every_keeps_those_epochs_weights(fmnist, tmp_path):
    trainer = small_trainer(tmp_path, epochs=3, keep_every=2)
    trainer.fit()
    assert sorted(p.name for p in tmp_path.glob("epoch-*.safetensors")) == ["epoch-002.safetensors"]
    assert checkpoint.read_metadata(tmp_path / "epoch-002.safetensors")["epoch"] == 1  # 0-based, as in metrics.jsonl
    kept, last = load_model(tmp_path / "epoch-002.safetensors"), load_model(tmp_path, "last")
    assert any(not torch.equal(a, b) for a, b in zip(kept.state_dict().values(), last.state_dict().values()))


def test_load_model_reproduces_the_trained_logits(fmnist, tmp_path):
    trainer = small_trainer(tmp_path, epochs=1)
    trainer.fit()
    model = load_model(tmp_path, "last")
    x = fmnist.test.subset(16).as_float()
    assert not model.training
    # the layout `robustlab eval` attacks in, so that Python figures are the CLI's (and 1.6x faster than contiguous)
    assert model.net.conv2.weight.is_contiguous(memory_format=torch.channels_last)
    trainer.model.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), trainer.model(x), atol=1e-5)


def test_foreign_and_corrupted_checkpoints_are_clear_errors(fmnist, tmp_path):
    small_trainer(tmp_path / "run", epochs=1).fit()
    good = (tmp_path / "run" / "best.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00not a checkpoint")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    for name in ("truncated", "garbage", "foreign"):
        with pytest.raises(RobustlabError) as info:
            load_model(tmp_path / f"{name}.safetensors")
        assert "\n" not in str(info.value)
    with pytest.raises(RobustlabError):
        load_model(tmp_path / "missing")


def test_resume_after_a_kill_matches_an_uninterrupted_run(fmnist, tmp_path, run_cli):
    common = ["train", "--data-dir", FMNIST, "--train-n", "768", "--val-n", "50", "--epochs", "3",
              "--steps", "3", "--step-size", "0.04", "--threads", "1", "--ema", "0.99"]
    assert run_cli(*common, "--out", str(tmp_path / "whole")).returncode == 0

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "robustlab", *common, "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not ((killed / "metrics.jsonl").exists()
                                          and (killed / "metrics.jsonl").read_text().count("\n") >= 1):
        time.sleep(0.05)
    time.sleep(0.3)  # into the second epoch
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert checkpoint.read_metadata(killed / "last.safetensors")["epoch"] < 2
    assert run_cli(*common, "--out", str(killed), "--resume").returncode == 0

    whole, _ = checkpoint.load(tmp_path / "whole" / "last.safetensors")
    resumed, _ = checkpoint.load(killed / "last.safetensors")
    assert whole.keys() == resumed.keys()
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key
    epochs = [json.loads(l)["epoch"] for l in (killed / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2]

    # Resuming with another recipe would mix two runs: refused in one line, the run left as it was.
    changed = run_cli(*common, "--out", str(killed), "--resume", "--lr", "0.1", "--ema", "0.9")
    assert changed.returncode == 2 and changed.stderr.count("\n") == 1, changed.stderr
    assert "other settings" in changed.stderr and "lr 0.05 → 0.1" in changed.stderr and "ema 0.99 → 0.9" in changed.stderr
    changed = run_cli(*common, "--out", str(killed), "--resume", "--steps", "4")
    assert changed.returncode == 2 and "method.steps 3 → 4" in changed.stderr, changed.stderr
    # another model was a traceback from load_state_dict; other data of the same shape trained on silently
    mnist = tmp_path / "mnist"  # idx files of MNIST's mean pixel: --dataset mnist on Fashion-MNIST's is refused first
    mnist.mkdir()
    for name, count in (("train", 300), ("t10k", 10)):
        images = np.zeros((count, 28 * 28), np.uint8)
        images[:, :round(0.1307 * 784)] = 255
        (mnist / f"{name}-images-idx3-ubyte").write_bytes(
            bytes((0, 0, 8, 3)) + b"".join(d.to_bytes(4, "big") for d in (count, 28, 28)) + images.tobytes())
        (mnist / f"{name}-labels-idx1-ubyte").write_bytes(
            bytes((0, 0, 8, 1)) + count.to_bytes(4, "big") + bytes(i % 10 for i in range(count)))
    for option, words in ((["--model", "lenet"], "model.name 'cnn-small' → 'lenet'"),
                          (["--dataset", "mnist", "--data-dir", str(mnist)], "dataset.name 'fashion-mnist' → 'mnist'")):
        changed = run_cli(*common, "--out", str(killed), "--resume", *option)
        assert changed.returncode == 2 and changed.stderr.count("\n") == 1 and words in changed.stderr, changed.stderr
    resumed_again, _ = checkpoint.load(killed / "last.safetensors")
    assert all(torch.equal(resumed[k], resumed_again[k]) for k in resumed)


def test_resume_restores_the_loss_scale(tmp_path):
    """fp16 runs scale their loss (GradScaler): a resumed run must go on with the scale reached, not restart at 2^16,
    which would replay the first overflows and skip optimizer steps the uninterrupted run took. fp16 needs CUDA, so
    the CPU scaler stands in for it."""
    trainer = small_trainer(tmp_path, epochs=1, train_n=64)
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    trainer.scaler.load_state_dict({**trainer.scaler.state_dict(), "scale": 1024.0, "_growth_tracker": 7})
    trainer.save(0, {"epoch": 0}, is_best=False)
    again = small_trainer(tmp_path, epochs=1, train_n=64)
    again.scaler = torch.amp.GradScaler("cpu")
    assert again.resume()
    assert again.scaler.state_dict()["scale"] == 1024.0 and again.scaler.state_dict()["_growth_tracker"] == 7


def test_resume_of_a_run_killed_in_its_first_epoch_starts_it_afresh(tmp_path, run_cli):
    """A requeued job repeats its command with --resume; a kill before the first checkpoint must not make it fail."""
    common = ["train", "--data-dir", FMNIST, "--train-n", "256", "--val-n", "50", "--epochs", "1",
              "--steps", "2", "--threads", "1"]
    assert run_cli(*common, "--out", str(tmp_path / "whole")).returncode == 0
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "robustlab", *common, "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (killed / "config.json").exists():
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (killed / "config.json").exists() and not (killed / "last.safetensors").exists()

    resumed = run_cli(*common, "--out", str(killed), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "holds no finished epoch; starting it afresh" in resumed.stderr
    whole, _ = checkpoint.load(tmp_path / "whole" / "last.safetensors")
    again, _ = checkpoint.load(killed / "last.safetensors")
    assert all(torch.equal(whole[k], again[k]) for k in whole)

    # A folder that never held a run (a mistyped --out) is still an error, not a new run.
    for place in ("empty", "missing"):
        if place == "empty":
            (tmp_path / place).mkdir()
        refused = run_cli(*common, "--out", str(tmp_path / place), "--resume")
        assert refused.returncode == 2 and "holds no run to continue" in refused.stderr, refused.stderr
    assert not (tmp_path / "empty" / "config.json").exists() and not (tmp_path / "missing").exists()

    # Stopped while reading its data (minutes for a large dataset), before any epoch began: a data folder that
    # fails stands in for the kill. The placeholder config.json written first lets --resume start it afresh.
    starting = tmp_path / "starting"
    broken = [*common[:common.index("--data-dir") + 1], str(tmp_path / "no-data"), *common[common.index(FMNIST) + 1:]]
    failed = run_cli(*broken, "--out", str(starting))
    assert failed.returncode == 2 and json.loads((starting / "config.json").read_text()) == {"status": "starting"}
    resumed = run_cli(*common, "--out", str(starting), "--resume")
    assert resumed.returncode == 0 and "starting it afresh" in resumed.stderr, resumed.stderr


def test_a_kill_after_last_safetensors_loses_no_kept_epoch_and_weights_only_files_are_refused(fmnist, tmp_path,
                                                                                             monkeypatch):
    """last.safetensors was written before epoch-NNN: a kill between them ended the epoch without its kept file,
    which no resume wrote again. And a model file put in last's place was a load_state_dict traceback."""
    written = []
    real_save = checkpoint.save

    def save(path, *args, **kwargs):
        real_save(path, *args, **kwargs)
        written.append(path.name)
        if path.name == "last.safetensors":
            raise KeyboardInterrupt  # the kill, once the epoch counts as done
    monkeypatch.setattr(checkpoint, "save", save)
    with pytest.raises(KeyboardInterrupt):
        small_trainer(tmp_path, epochs=1, keep_every=1).fit()
    assert written[-2:] == ["epoch-001.safetensors", "last.safetensors"]
    monkeypatch.setattr(checkpoint, "save", real_save)

    os.replace(tmp_path / "epoch-001.safetensors", tmp_path / "last.safetensors")
    with pytest.raises(RobustlabError, match="holds model weights only, not a training state"):
        small_trainer(tmp_path, epochs=1).resume()


@pytest.mark.parametrize("damage", ["lost", "cut short"])
def test_resume_restores_the_metrics_line_a_kill_lost(fmnist, tmp_path, damage):
    """A kill after the epoch's checkpoint but before (or while) its metrics line is appended."""
    small_trainer(tmp_path, epochs=2).fit()
    path = tmp_path / "metrics.jsonl"
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n" + ("" if damage == "lost" else lines[1][:25]))
    assert [r["epoch"] for r in checkpoint.read_metrics(tmp_path)] == [0]
    resumed = small_trainer(tmp_path, epochs=2)
    assert resumed.resume() and resumed.start_epoch == 2
    assert checkpoint.read_metrics(tmp_path) == [json.loads(l) for l in lines]


@pytest.mark.parametrize("killed_after", ["last.safetensors", "last.json"])
def test_a_kill_between_a_checkpoint_and_its_json_twin_leaves_them_agreeing_after_resume(fmnist, tmp_path, monkeypatch,
                                                                                         killed_after):
    """last.safetensors was replaced before last.json: a kill between the two in the last epoch left last.json one
    epoch behind, and the resumed run, with nothing left to train, never wrote it again."""
    real_write = checkpoint.atomic_write

    def atomic_write(path, write):
        real_write(path, write)
        if path.name == killed_after and (json.loads(path.read_text()) if path.suffix == ".json"
                                          else checkpoint.read_metadata(path))["epoch"] == 1:
            raise KeyboardInterrupt  # the kill, right after this file of the last epoch
    monkeypatch.setattr(checkpoint, "atomic_write", atomic_write)
    with pytest.raises(KeyboardInterrupt):
        small_trainer(tmp_path, epochs=2).fit()
    monkeypatch.setattr(checkpoint, "atomic_write", real_write)
    resumed = small_trainer(tmp_path, epochs=2)
    assert resumed.resume()
    resumed.fit()
    for name in ("last", "best"):
        twin = json.loads((tmp_path / f"{name}.json").read_text())
        assert twin == checkpoint.read_metadata(tmp_path / f"{name}.safetensors"), name
    assert checkpoint.read_metadata(tmp_path / "last.safetensors")["epoch"] == 1


def test_a_full_disk_while_rewriting_config_json_keeps_the_previous_one(fmnist, tmp_path, monkeypatch):
    """config.json (and every JSON file robustlab writes) was written in place: a resumed run that met a full disk
    left half a file where the run's configuration had been, and a raw OSError."""
    import errno
    from pathlib import Path
    small_trainer(tmp_path, epochs=1).fit()
    before = (tmp_path / "config.json").read_text()
    real_write_text = Path.write_text

    def full_disk(path, text, *args, **kwargs):
        if "config.json" in path.name:
            real_write_text(path, text[:20], *args, **kwargs)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_text(path, text, *args, **kwargs)
    monkeypatch.setattr(Path, "write_text", full_disk)
    resumed = small_trainer(tmp_path, epochs=1)  # nothing left to train: fit() rewrites config.json all the same
    assert resumed.resume()
    with pytest.raises(RobustlabError, match=r"cannot write .*config.json \(No space left on device\); the previous "
                                             "file is kept"):
        resumed.fit()
    assert (tmp_path / "config.json").read_text() == before
    assert not [p.name for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_resume_afresh_removes_the_temporaries_of_a_kill_during_the_first_checkpoint(fmnist, tmp_path):
    """A SIGKILL while the first epoch's best.safetensors was being written left its temporary file (as large as a
    checkpoint); --resume started the run afresh and removed temporaries only when it found a last.safetensors."""
    from robustlab.cli import main
    (tmp_path / "config.json").write_text("{}\n")
    stale = tmp_path / ".best.safetensors.tmp99999999"
    stale.write_bytes(b"cut short")
    assert main(["train", "--data-dir", FMNIST, "--train-n", "64", "--val-n", "10", "--epochs", "1", "--steps", "1",
                 "--threads", "1", "--precision", "fp32", "--out", str(tmp_path), "--resume"]) == 0
    assert not stale.exists() and (tmp_path / "last.safetensors").exists()


def test_learning_rate_schedules():
    assert learning_rate("one-cycle", 0.1, 0.0) == 0.0
    assert learning_rate("one-cycle", 0.1, 0.4) == pytest.approx(0.1)
    assert learning_rate("one-cycle", 0.1, 1.0) == pytest.approx(0.0)
    assert learning_rate("piecewise", 0.1, 0.6) == pytest.approx(0.01)
    assert learning_rate("cosine", 0.1, 0.5) == pytest.approx(0.05)
    with pytest.raises(RobustlabError):
        learning_rate("sawtooth", 0.1, 0.5)


def test_bad_config_is_a_clear_error(tmp_path):
    for bad in ({"epochs": 0}, {"batch_size": 0}, {"optimizer": "lion"}, {"precision": "fp8"}, {"ema": 1.5},
                {"keep_every": 0}):
        with pytest.raises(RobustlabError):
            small_trainer(tmp_path, **bad)


def test_narrow_resnets_train_without_channels_last_crash(tmp_path):
    """PyTorch 2.13's CPU backward of a strided 1×1 conv with < 8 input channels in channels_last corrupts the heap;
    a width-4 ResNet must therefore train (in a subprocess: the bug kills the process) in the default format."""
    from robustlab.models import build_model, channels_last_safe
    assert not channels_last_safe(build_model("preact-resnet18-small", (1, 28, 28), 10, [0.5], [0.25], width=4))
    assert channels_last_safe(build_model("preact-resnet18-small", (1, 28, 28), 10, [0.5], [0.25], width=8))
    assert channels_last_safe(build_model("cnn-small", (1, 28, 28), 10, [0.5], [0.25]))
    script = ("import torch; from robustlab.training.trainer import TrainConfig, Trainer\n"
              "from robustlab.models import build_model; from robustlab.training.methods import PGDAT\n"
              "from robustlab.data import ImageSet, Splits, DatasetInfo\n"
              "torch.manual_seed(0); torch.set_num_threads(1)\n"
              "m = build_model('preact-resnet18-small', (1, 28, 28), 10, [0.5], [0.25], width=4)\n"
              "imgs = (torch.rand(64, 1, 28, 28) * 255).to(torch.uint8); labels = torch.randint(0, 10, (64,))\n"
              "s = ImageSet(imgs, labels)\n"
              "info = DatasetInfo('toy', 10, (1, 28, 28), (0.5,), (0.25,), tuple('0123456789'), 'none')\n"
              "t = Trainer(m, PGDAT(steps=2), Splits(s, s.subset(16), s.subset(16), info), "
              "TrainConfig(epochs=2, batch_size=16, val_n=16), sys.argv[1], {}, show_progress=False)\n"
              "t.fit(); print('trained')\n")
    done = subprocess.run([sys.executable, "-c", "import sys\n" + script, str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "trained" in done.stdout, done.stderr[-2000:]


@pytest.mark.parametrize("name", ["cnn-small", "lenet"])
def test_pooling_before_relu_is_the_protocols_network(name):
    """cnn-small and lenet pool before each ReLU (for speed): outputs must equal the protocol's conv, ReLU,
    max-pool order exactly, and input gradients must agree."""
    from collections import OrderedDict

    from robustlab.models import build_model
    torch.manual_seed(0)
    model = build_model(name, (1, 28, 28), 10, [0.286], [0.353]).eval()
    net = next(m for m in model.modules() if hasattr(m, "pool1"))
    order = list(net._modules)
    assert order.index("pool1") < order.index("relu1") and order.index("pool2") < order.index("relu2")
    protocol = [n for n in order if n not in ("relu1", "relu2")]
    protocol.insert(protocol.index("pool1"), "relu1")
    protocol.insert(protocol.index("pool2"), "relu2")
    reference = torch.nn.Sequential(OrderedDict((n, net._modules[n]) for n in protocol))
    assert list(reference._modules)[:6] == ["conv1", "relu1", "pool1", "conv2", "relu2", "pool2"]
    x = torch.rand(32, 1, 28, 28, requires_grad=True)
    ours = net(x)
    theirs = reference(x)
    assert torch.equal(ours, theirs)
    g_ours, = torch.autograd.grad(ours.logsumexp(1).sum(), x)
    g_theirs, = torch.autograd.grad(theirs.logsumexp(1).sum(), x)
    torch.testing.assert_close(g_ours, g_theirs)


def test_training_curves_plot_reads_the_runs_metrics(tmp_path):
    from robustlab.checkpoint import read_metrics
    from robustlab.evaluate.report import plot_training_curves
    lines = [{"epoch": e, "val_clean": 0.8 + 0.01 * e, "val_robust": 0.7 - 0.01 * abs(e - 2)} for e in range(5)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    assert read_metrics(tmp_path) == lines
    no_val = [{"epoch": 0, "val_clean": float("nan"), "val_robust": float("nan")}]
    plot_training_curves({"a": lines, "no validation": no_val}, tmp_path / "curves.png", "toy")
    assert (tmp_path / "curves.png").stat().st_size > 1000
    # the kept epoch is the checkpoint's where it is given, and one epoch is a point
    plot_training_curves({"a": lines[:1]}, tmp_path / "one.png", "toy", best={"a": 0})
    plot_training_curves({"a": lines}, tmp_path / "kept.png", "toy", best={"a": 4})
    assert (tmp_path / "one.png").stat().st_size > 1000 and (tmp_path / "kept.png").stat().st_size > 1000


def test_training_curves_ring_the_most_robust_epoch_unless_told_the_kept_one(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from robustlab.evaluate.report import plot_training_curves
    drawn = []
    monkeypatch.setattr(Figure, "savefig", lambda self, path, **kw: drawn.append(self))
    lines = [{"epoch": e, "val_clean": 0.8, "val_robust": r} for e, r in enumerate((0.40, 0.45, 0.43, 0.45))]
    for best, ringed in ((None, 2), ({"a": 2}, 3)):  # the first maximum, as the Trainer keeps; else the given epoch
        plot_training_curves({"a": lines}, tmp_path / "curves.png", "toy", best=best)
        kept, = [l for l in drawn[-1].axes[0].get_lines() if l.get_label() == "kept checkpoint (best.safetensors)"]
        assert list(kept.get_xdata()) == [ringed], best


@pytest.mark.parametrize("name,shape,smallest", [("lenet", (3, 8, 8), 12), ("cnn-small", (1, 3, 3), 4),
                                                 ("cnn-strided", (1, 2, 3), 4), ("cnn-small", (1, 3, 28), 4),
                                                 ("lenet", (1, 40, 8), 12)])
def test_a_model_refuses_images_too_small_for_it_when_built(name, shape, smallest):
    """They failed in the first training step's traceback, after the data had been read. The hint grows only the
    sides that are too short (a 3×28 image was said to need 29×29)."""
    from robustlab.models import build_model
    c, h, w = shape
    with pytest.raises(RobustlabError, match=f"model '{name}' cannot take {h}×{w} images "
                                             f"\\(it needs at least {smallest} pixels a side\\)"):
        build_model(name, shape, 10, [0.5] * c, [0.5] * c)
    h, w = max(h, smallest), max(w, smallest)
    assert build_model(name, (c, h, w), 10, [0.5] * c, [0.5] * c)(torch.rand(2, c, h, w)).shape == (2, 10)


@pytest.mark.parametrize("mean, std", [((0.5,), (0.0,)), ((0.5,), (float("nan"),)), ((0.5,) * 3, (0.3,)),
                                       ((float("inf"),), (0.3,))])
def test_a_model_refuses_a_normalization_that_cannot_work(mean, std):
    """A std of 0 built a model of inf and NaN logits; three means for one channel broadcast the images to three
    channels, and the first layer failed in the first step."""
    from robustlab.models import build_model
    with pytest.raises(RobustlabError, match=r"normalization takes a finite mean and a finite std > 0 per channel "
                                             r"\(1 here\), or one of each for all; got mean \["):
        build_model("cnn-small", (1, 28, 28), 10, mean, std)
    one_for_all = build_model("cnn-small", (3, 8, 8), 10, 0.5, 0.25)  # a scalar, as Normalize always took
    assert one_for_all(torch.rand(2, 3, 8, 8)).isfinite().all()


def test_a_model_refuses_an_option_its_builder_does_not_take():
    """From Python (the CLI checks --width itself), a TypeError from the builder's call."""
    from robustlab.models import build_model
    with pytest.raises(RobustlabError, match="^model 'cnn-small' has no option width; it takes: none$"):
        build_model("cnn-small", (1, 28, 28), 10, [0.5], [0.25], width=8)
    with pytest.raises(RobustlabError, match="^model 'wrn-28-10' has no option width; it takes: depth, widen$"):
        build_model("wrn-28-10", (3, 32, 32), 10, [0.5] * 3, [0.25] * 3, width=8)


def test_an_undefended_run_keeps_its_cleanest_epoch(tmp_path):
    """Ranked by validation robust accuracy, a standard run kept its first, least trained epoch (robust accuracy
    falls as it learns), and eval, summary and rift read that one."""
    cfg = TrainConfig(epochs=3, train_n=2048, val_n=200, threads=1, lr=0.05)
    trainer = build_trainer(dataset="fashion-mnist", model="cnn-small", method="standard", out=tmp_path,
                            data_dir=FMNIST, config=cfg, method_kwargs={"steps": 5}, show_progress=False)
    trainer.fit()
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    cleanest = max(range(3), key=lambda e: (metrics[e]["val_clean"], -e))
    most_robust = max(range(3), key=lambda e: (metrics[e]["val_robust"], -e))
    assert cleanest != most_robust, metrics  # else this run cannot tell the two rules apart
    assert checkpoint.read_metadata(tmp_path / "best.safetensors")["epoch"] == cleanest


def test_wrn_starts_from_the_initialization_of_the_robust_training_code():
    """TRADES's wideresnet.py (also MART's and AWP's): He normal over each convolution's fan-out, the classifier's
    bias at 0. PyTorch's default (uniform over the fan-in) gave the 3×3 convolutions two fifths of that spread."""
    import math

    from robustlab.models import build_model
    net = build_model("wrn-28-10", (3, 32, 32), 10, [0.5] * 3, [0.5] * 3).net
    conv = net.layer3[1].conv2  # 640 → 640 channels: 3.7 M weights
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (9 * 640)), rel=0.01)
    assert not net.linear.bias.any()


def test_fit_from_the_first_epoch_refuses_a_folder_that_holds_a_run(tmp_path):
    """From Python it replaced the run's checkpoints and appended epoch 0 again to its metrics; the CLI refused it."""
    small_trainer(tmp_path, epochs=1, train_n=128, val_n=20).fit()
    metrics = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(RobustlabError, match="already holds a run .last.safetensors.; call resume.. before fit"):
        small_trainer(tmp_path, epochs=1, train_n=128, val_n=20).fit()
    assert (tmp_path / "metrics.jsonl").read_text() == metrics
    trainer = small_trainer(tmp_path, epochs=1, train_n=128, val_n=20)
    assert trainer.resume() and trainer.fit()["epoch"] == 0  # finished: nothing to train, its last epoch reported
    assert checkpoint.read_metrics(tmp_path) == [json.loads(line) for line in metrics.splitlines()]


def test_learning_rate_schedules_between_their_end_points():
    import math
    assert learning_rate("cosine", 0.1, 0.25) == pytest.approx(0.05 * (1 + math.cos(math.pi / 4)))
    assert learning_rate("cosine", 0.1, 1.0) == pytest.approx(0.0)
    assert learning_rate("piecewise", 0.1, 0.49) == pytest.approx(0.1)
    assert learning_rate("piecewise", 0.1, 0.8) == pytest.approx(0.001)  # both milestones passed
    assert learning_rate("one-cycle", 0.1, 0.2) == pytest.approx(0.05)
    assert learning_rate("one-cycle", 0.1, 0.7) == pytest.approx(0.05)
    assert learning_rate("constant", 0.1, 0.9) == 0.1


def test_weight_ema_averages_with_its_warmed_up_decay():
    from robustlab.training.trainer import WeightEMA
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = WeightEMA(model, 0.5)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    for t in (1, 2, 3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(8, 3))  # train mode: moves the running statistics and counts the batch
        ema.update(model)
        d = min(0.5, (1 + t) / (10 + t))  # 2/11, 3/12, then the decay itself
        for k, v in model.state_dict().items():
            expected[k] = d * expected[k] + (1 - d) * v if v.is_floating_point() else v.clone()
    for k, v in ema.model.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=1e-6, atol=1e-6)
    assert not torch.equal(ema.model[0].weight, model[0].weight)


def test_an_ema_run_validates_and_exports_the_average(fmnist, tmp_path):
    cfg = TrainConfig(epochs=1, train_n=128, val_n=20, threads=1, batch_size=32, ema=0.9)
    trainer = build_trainer(dataset="fashion-mnist", model="cnn-small", method="standard", out=tmp_path,
                            data_dir=FMNIST, config=cfg, show_progress=False)
    trainer.fit()
    assert trainer.eval_model is trainer.ema.model
    best = load_model(tmp_path / "best.safetensors")
    for name, p in best.state_dict().items():
        assert torch.equal(p, trainer.ema.model.state_dict()[name]), name
    assert any(not torch.equal(a, b) for a, b in zip(best.parameters(), trainer.model.parameters()))


def test_the_model_normalizes_each_channel_with_its_datasets_mean_and_std():
    """Attacks and users see pixels in [0, 1]; the model's first layer maps the dataset's mean to 0 and one standard
    deviation above it to 1, channel by channel."""
    from robustlab.data import DATASETS
    from robustlab.models import build_model
    info = DATASETS["cifar10"]
    model = build_model("cnn-small", info.input_shape, info.num_classes, info.mean, info.std)
    mean, std = torch.tensor(info.mean).view(3, 1, 1), torch.tensor(info.std).view(3, 1, 1)
    x = torch.stack([mean.expand(3, 32, 32), (mean + std).expand(3, 32, 32)])
    z = model.normalize(x)
    assert torch.allclose(z[0], torch.zeros(3, 32, 32), atol=1e-6)
    assert torch.allclose(z[1], torch.ones(3, 32, 32), atol=1e-5)


def test_training_batches_are_augmented_and_plain_ones_are_not():
    from robustlab.data import ImageSet
    from robustlab.training.trainer import epoch_batches
    train = ImageSet(torch.full((64, 1, 28, 28), 255, dtype=torch.uint8), torch.zeros(64, dtype=torch.long))
    plain = torch.cat([x for x, _ in epoch_batches(train, 32, 0, 0, "none")])
    cropped = torch.cat([x for x, _ in epoch_batches(train, 32, 0, 0, "crop")])
    assert torch.equal(plain, torch.ones(64, 1, 28, 28))
    assert (cropped == 0).flatten(1).any(1).float().mean() > 0.8  # shifted, zeros padded in (1 in 25 is not)


def test_a_checkpoint_keeps_its_tensors_and_metadata_and_another_format_is_refused(tmp_path):
    weights = {"model.w": torch.arange(6, dtype=torch.float32).view(2, 3), "model.n": torch.tensor([3])}
    checkpoint.save(tmp_path / "a.safetensors", weights, {"epoch": 4, "metrics": {"val_robust": 0.5}})
    tensors, meta = checkpoint.load(tmp_path / "a.safetensors")
    assert tensors.keys() == weights.keys() and all(torch.equal(tensors[k], weights[k]) for k in weights)
    assert (meta["epoch"], meta["metrics"], meta["versions"]) == (4, {"val_robust": 0.5}, checkpoint.versions())
    assert json.loads((tmp_path / "a.json").read_text()) == meta
    # a later layout read as this one would be misread without a word
    checkpoint.save(tmp_path / "b.safetensors", weights, {"format": "robustlab-checkpoint/2"})
    with pytest.raises(RobustlabError, match="has checkpoint format 'robustlab-checkpoint/2'; this robustlab reads "
                                             "robustlab-checkpoint/1"):
        checkpoint.load(tmp_path / "b.safetensors")


@pytest.mark.parametrize("name,shape,layers", [
    # the protocol's CNN: 3×3 convs of 32 and 64 channels, 128 hidden units
    ("cnn-small", (1, 28, 28), {"conv1": (32, 1, 3, 3), "conv2": (64, 32, 3, 3), "fc1": (128, 64 * 7 * 7),
                                "fc2": (10, 128)}),
    # Wong et al.'s MNIST network, whose published weights experiments/fast_at_mnist.py imports
    ("cnn-strided", (1, 28, 28), {"conv1": (16, 1, 4, 4), "conv2": (32, 16, 4, 4), "fc1": (100, 32 * 7 * 7),
                                  "fc2": (10, 100)}),
    ("lenet", (1, 28, 28), {"conv1": (6, 1, 5, 5), "conv2": (16, 6, 5, 5), "fc1": (120, 16 * 5 * 5), "fc2": (84, 120),
                            "fc3": (10, 84)}),
    ("mlp", (1, 28, 28), {"fc1": (128, 784), "fc2": (10, 128)}),  # TinyBobNet's 784-128-10
])
def test_the_small_networks_have_their_published_layers(name, shape, layers):
    from robustlab.models import build_model
    net = build_model(name, shape, 10, [0.5], [0.5]).net
    assert {n.removesuffix(".weight"): tuple(p.shape) for n, p in net.named_parameters() if n.endswith("weight")} \
        == layers


def _stage_sizes(model, shape):
    """(channels, side) after the stem and after each stage, read off forward hooks."""
    net, seen = model.net, []
    stages = [net.conv1, net.layer1, net.layer2, net.layer3] + ([net.layer4] if net.layer4 is not None else [])
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append((o.shape[1], o.shape[2]))) for m in stages]
    with torch.no_grad():
        model.eval()(torch.rand(1, *shape))
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("name,shape,kwargs,sizes", [
    # CIFAR layout: a stride-1 stem, then stages of 1, 2, 4, 8 × width channels, halving the side from the second on
    ("preact-resnet18", (3, 32, 32), {"width": 8}, [(8, 32), (8, 32), (16, 16), (32, 8), (64, 4)]),
    ("resnet18", (3, 32, 32), {"width": 8}, [(8, 32), (8, 32), (16, 16), (32, 8), (64, 4)]),
    # the small variant's stride-2 stem: 28×28 → 14×14
    ("preact-resnet18-small", (1, 28, 28), {"width": 16}, [(16, 14), (16, 14), (32, 7), (64, 4), (128, 2)]),
    # WRN-28-k: a 16-channel stem, stages of 16k, 32k, 64k
    ("wrn-28-10", (3, 32, 32), {"widen": 2}, [(16, 32), (32, 32), (64, 16), (128, 8)]),
])
def test_residual_networks_have_their_published_stages(name, shape, kwargs, sizes):
    from robustlab.models import build_model
    from robustlab.models.resnet import PreActBlock
    model = build_model(name, shape, 10, [0.5] * shape[0], [0.5] * shape[0], **kwargs)
    assert _stage_sizes(model, shape) == sizes
    blocks = [s for s in (model.net.layer1, model.net.layer2, model.net.layer3, model.net.layer4) if s is not None]
    assert [len(stage) for stage in blocks] == ([4, 4, 4] if name == "wrn-28-10" else [2, 2, 2, 2])  # 6n + 4 = 28
    preact = name != "resnet18"
    assert all(isinstance(b, PreActBlock) == preact for stage in blocks for b in stage)
    # post-activation nets normalize the stem, pre-activation nets the last stage's output
    assert (model.net.bn1 is None, model.net.bn_final is not None) == (preact, preact)


def test_residual_blocks_order_their_batchnorm_relu_and_convolutions_as_published():
    """Pre-activation (He et al. 2016): BN-ReLU before each convolution, and a projection shortcut takes the
    pre-activated input; post-activation: conv-BN-ReLU, conv-BN, the shortcut added, then ReLU. The classifier reads
    the average over positions."""
    from torch.nn import functional as F

    from robustlab.models.resnet import BasicBlock, PreActBlock, ResNet
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 6)

    def randomized(block):  # BatchNorm statistics and affine parameters away from the identity
        for m in block.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
                m.weight.data.normal_()
                m.bias.data.normal_()
        return block.eval()
    with torch.no_grad():
        b = randomized(PreActBlock(4, 8, 2))
        a = F.relu(b.bn1(x))
        torch.testing.assert_close(b(x), b.conv2(F.relu(b.bn2(b.conv1(a)))) + b.shortcut(a))
        b = randomized(BasicBlock(4, 8, 2))
        out = b.bn2(b.conv2(F.relu(b.bn1(b.conv1(x)))))
        torch.testing.assert_close(b(x), F.relu(out + b.shortcut(x)))
        net = randomized(ResNet(PreActBlock, [1, 1, 1], 4, [4, 8, 8], 3, 5, preact=True))
        images = torch.randn(2, 3, 8, 8)
        features = F.relu(net.bn_final(net.layer3(net.layer2(net.layer1(net.conv1(images))))))
        torch.testing.assert_close(net(images), net.linear(features.mean((2, 3))))


def test_wrn_draws_its_convolutions_over_their_fan_out():
    """A convolution that doubles its channels tells fan-out (He et al.'s "fan_out" mode, TRADES's wideresnet.py)
    from fan-in: std √(2 / (9 · out channels))."""
    import math

    from robustlab.models import build_model
    torch.manual_seed(0)
    net = build_model("wrn-28-10", (3, 32, 32), 10, [0.5] * 3, [0.5] * 3, widen=4).net
    conv = net.layer2[0].conv1  # 64 → 128 channels
    assert (conv.in_channels, conv.out_channels) == (64, 128)
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (9 * 128)), rel=0.02)


def test_channels_last_is_kept_from_narrow_resnets_on_cpus_alone():
    from robustlab.models import build_model, channels_last_safe, fast_memory_format
    narrow = build_model("preact-resnet18-small", (1, 28, 28), 10, [0.5], [0.25], width=4)
    assert not channels_last_safe(narrow) and fast_memory_format(narrow) == torch.contiguous_format
    assert channels_last_safe(narrow, torch.device("cuda")) and fast_memory_format(narrow, "cuda") == torch.channels_last


def test_a_failed_safetensors_write_is_one_line_and_keeps_the_previous_file(tmp_path):
    """safetensors reports a full disk as a SafetensorError (no OSError), whose message runs over several lines."""
    from safetensors import SafetensorError
    path = tmp_path / "last.safetensors"
    checkpoint.save(path, {"w": torch.ones(3)}, {"epoch": 0})

    def full_disk(tmp):
        tmp.write_bytes(b"half")
        raise SafetensorError("Error while serializing: No space left on device (os error 28)\nat save_file")
    with pytest.raises(RobustlabError, match=r"^cannot write .*last.safetensors \(Error while serializing: No space "
                                             r"left on device \(os error 28\)\); the previous file is kept$"):
        checkpoint.atomic_write(path, full_disk)
    assert checkpoint.load(path)[1]["epoch"] == 0 and sorted(p.name for p in tmp_path.iterdir()) == [
        "last.json", "last.safetensors"]


def test_the_temporaries_of_another_process_s_killed_write_are_removed_and_this_process_s_own_kept(tmp_path):
    """What a SIGKILL leaves is atomic_write's own temporary, named by its writer's process; the temporaries of
    writes this process has under way are not stale."""
    written = []
    checkpoint.write_text(tmp_path / "config.json", "{}\n")
    checkpoint.atomic_write(tmp_path / "best.safetensors", lambda tmp: written.append(tmp.name) or tmp.write_text("x"))
    own = tmp_path / written[0]
    killed = tmp_path / written[0].replace(str(os.getpid()), "99999999")  # the same write, by a process now gone
    assert own != killed
    for names in (None, ["best.safetensors"]):
        own.write_text("under way")
        killed.write_text("cut short")
        checkpoint.remove_stale_temporaries(tmp_path, names)
        assert own.exists() and not killed.exists(), names
    assert (tmp_path / "config.json").read_text() == "{}\n"


def test_a_shared_folder_keeps_the_temporaries_of_another_user_s_live_process(tmp_path, monkeypatch):
    """os.kill(pid, 0) on another user's process raises PermissionError: the process runs, its file is in use."""
    stale = tmp_path / ".x.npy.tmp4242"
    stale.write_bytes(b"part")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))

    def kill(pid, signal):
        raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr(checkpoint.os, "kill", kill)
    checkpoint.remove_stale_temporaries(tmp_path, shared=True)
    assert stale.exists()


def test_the_weights_digest_covers_batchnorm_statistics():
    """The digest keys the caches of a model's figures (RiFT's α curves and test results, AutoAttack states): θ(α)
    with re-estimated BatchNorm statistics differs from the interpolation in its buffers alone."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    before = checkpoint.weights_digest(model)
    model[1].running_var.mul_(2)
    assert checkpoint.weights_digest(model) != before
