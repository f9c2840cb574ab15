"""Shared fixtures: small real data and small trained models, built once per test session."""
from __future__ import annotations

import pytest
import torch

from robustlab.data import load_dataset
from robustlab.training import TrainConfig, build_trainer

FMNIST = "/usr/share/datasets/fashion-mnist"


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared, busy CPU, more threads spin-wait and run many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def fmnist():
    from pathlib import Path
    if not Path(FMNIST).is_dir():  # the tests that need real data say why they skip
        pytest.skip(f"Fashion-MNIST not available: no folder {FMNIST}")
    # files that are there must load: a loader bug (any exception) fails the tests instead of skipping them all
    return load_dataset("fashion-mnist", data_dir=FMNIST)


def _train(tmp_path_factory, method, **config):
    out = tmp_path_factory.mktemp(method)
    cfg = TrainConfig(**{"epochs": 3, "train_n": 4000, "val_n": 200, "lr": 0.05, "threads": 1, **config})
    trainer = build_trainer(dataset="fashion-mnist", model="cnn-small", method=method, out=out, data_dir=FMNIST,
                            config=cfg, method_kwargs={"steps": 5, "step_size": 0.04}, show_progress=False)
    trainer.fit()
    return trainer.model.eval(), out


@pytest.fixture(scope="session")
def robust_model(fmnist, tmp_path_factory):
    """cnn-small after 3 epochs of PGD-5 training on 4,000 images (~40% PGD accuracy at ε = 0.1)."""
    torch.manual_seed(0)
    return _train(tmp_path_factory, "pgd-at")[0]


@pytest.fixture(scope="session")
def standard_model(fmnist, tmp_path_factory):
    """cnn-small after 3 epochs of clean training on 4,000 images."""
    torch.manual_seed(0)
    return _train(tmp_path_factory, "standard")[0]


@pytest.fixture(scope="session")
def test_batch(fmnist):
    """The first 256 test images as floats in [0, 1], with labels."""
    return fmnist.test.subset(256).as_float(), fmnist.test.labels[:256]


@pytest.fixture
def run_cli(capsys):
    """`robustlab ARGS` run in this process, returned as subprocess.run would return `python -m robustlab ARGS`,
    without an interpreter's start (2 s, most of a short command's time). The RNG and thread count are restored
    afterwards; warnings a user would see are added to stderr, where they would print."""
    import subprocess
    import sys
    import warnings

    from robustlab import cli

    def run(*args):
        capsys.readouterr()
        args = [str(a) for a in args]
        threads, argv = torch.get_num_threads(), sys.argv
        sys.argv = ["robustlab", *args]  # reports record the command from it
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            try:
                code = cli.main(args)
            except SystemExit as exc:  # argparse's errors
                code = exc.code
            finally:
                sys.argv = argv
        torch.set_num_threads(threads)
        out, err = capsys.readouterr()
        shown = [w for w in caught if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))]
        err += "".join(f"{w.category.__name__}: {w.message}\n" for w in shown)
        return subprocess.CompletedProcess(["robustlab", *args], code, out, err)

    return run
