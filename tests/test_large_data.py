"""The large datasets `folder` and `npy`: protocol splits, estimated DatasetInfo, lazy test sets, streamed
training in the Trainer, and the train → eval command line."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from robustlab import distributed, load_model
from robustlab.attacks import autoattack_accuracy
from robustlab.data import ImageSet, load_dataset
from robustlab.data.folder import LazyImageSet
from robustlab.errors import RobustlabError
from robustlab.training.trainer import loader_batches

COLOURS = {"blue": (30, 40, 200), "green": (40, 190, 50), "red": (210, 30, 40)}


def _folder(root, per_class=30, test_per_class=10, test_name="test"):
    """12×12 RGB PNGs whose colour gives the class, with noise, so that a small model learns them in one epoch."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), (test_name, test_per_class)):
        for name, colour in COLOURS.items():
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(np.array(colour) + rng.integers(-30, 31, (12, 12, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def _npy(root, n_train=40, n_test=20):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        np.save(root / f"{split}_images.npy", rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8))
        np.save(root / f"{split}_labels.npy", np.arange(n) % 4)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _folder(tmp_path_factory.mktemp("folder"))


def test_folder_splits_follow_the_protocol_and_are_deterministic(folder):
    data = load_dataset("folder", folder)
    again = load_dataset("folder", str(folder))
    train, val = data.train.indices, data.val.dataset.indices
    assert (len(train), len(val), len(data.test)) == (81, 9, 30)  # 10% of 90 images validate
    assert train == again.train.indices and val == again.val.dataset.indices
    assert sorted(train + val) == list(range(90))
    perm = torch.randperm(90, generator=torch.Generator().manual_seed(0)).tolist()
    assert val == perm[81:]
    assert not isinstance(data.train, ImageSet)  # streams
    assert data.train[0][0].dtype == torch.uint8


def test_the_split_follows_its_seed(tmp_path):
    root = _npy(tmp_path / "c10c", n_train=40)
    for seed in (0, 1):
        data = load_dataset("npy", root, seed=seed)
        perm = torch.randperm(40, generator=torch.Generator().manual_seed(seed)).tolist()
        assert data.train.indices == perm[:36] and data.val.dataset.indices == perm[36:]
        labels = np.load(root / "train_labels.npy")
        assert data.val.labels.tolist() == labels[perm[36:]].tolist()  # images and labels read together


def test_folder_info_is_estimated_from_the_training_images(folder):
    info = load_dataset("folder", folder).info
    assert (info.name, info.num_classes, info.input_shape) == ("folder", 3, (3, 12, 12))
    assert info.class_names == ("blue", "green", "red") and info.augment == "crop-flip"
    data = load_dataset("folder", folder)
    pixels = torch.stack([data.train[i][0] for i in range(len(data.train))]).double() / 255  # all 81 < 1,000
    assert np.allclose(info.mean, pixels.mean((0, 2, 3)), atol=1e-4)
    assert np.allclose(info.std, pixels.std((0, 2, 3), unbiased=False), atol=1e-4)
    small = load_dataset("folder", folder, image_size=(8, 10), grayscale=True).info
    assert small.input_shape == (1, 8, 10) and small.augment == "crop" and len(small.mean) == 1


def test_test_set_is_decoded_only_as_far_as_it_is_read(folder):
    data = load_dataset("folder", folder)
    assert isinstance(data.test, LazyImageSet)
    first = data.test.subset(5)
    assert "images" not in vars(data.test)  # nothing but the five was decoded
    assert first.images.shape == (5, 3, 12, 12) and first.labels.tolist() == [0] * 5
    assert data.test.images.shape == (30, 3, 12, 12)
    assert torch.equal(data.test.subset(5).images, first.images)
    assert data.test.labels.tolist() == [0] * 10 + [1] * 10 + [2] * 10
    # AutoAttack on the first n decodes n (it decoded the whole folder once it took an (images, labels) pair too)
    again = load_dataset("folder", folder).test
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 12 * 12, 4))
    result = autoattack_accuracy(model, again, eps=0.1, n=3, steps=1, queries=1, n_target_classes=1, progress=False)
    assert len(result.robust) == 3 and "images" not in vars(again)


def test_imagenet_layout_and_bad_folders(tmp_path):
    imagenet = _folder(tmp_path / "imagenet", per_class=10, test_per_class=2, test_name="val")
    assert len(load_dataset("folder", imagenet).test) == 6
    for bad, words in ((tmp_path / "missing", "train/ and test/"), (None, "needs --data-dir")):
        with pytest.raises(RobustlabError, match=words):
            load_dataset("folder", bad)
    Image.fromarray(np.zeros((9, 12, 3), np.uint8)).save(imagenet / "train" / "red" / "odd.png")
    with pytest.raises(RobustlabError, match="--image-size"):  # files of other sizes are refused, not resized
        load_dataset("folder", imagenet)
    assert load_dataset("folder", imagenet, image_size=(12, 12)).info.input_shape == (3, 12, 12)
    with pytest.raises(RobustlabError, match="folder only"):
        load_dataset("fashion-mnist", image_size=(12, 12))


def test_npy_dataset(tmp_path):
    root = _npy(tmp_path / "c10c")
    data = load_dataset("npy", root)
    assert (len(data.train), len(data.val), len(data.test)) == (36, 4, 20)
    assert data.info.input_shape == (3, 8, 8) and data.info.num_classes == 4 and data.info.augment == "crop-flip"
    images = np.load(root / "test_images.npy")
    assert torch.equal(data.test.subset(3).images, torch.from_numpy(images[:3].transpose(0, 3, 1, 2).copy()))
    np.save(root / "test_labels.npy", np.arange(20) % 5)
    with pytest.raises(RobustlabError, match="labels must lie in 0..3"):
        load_dataset("npy", root)
    np.save(root / "test_labels.npy", np.arange(20) % 4)
    train_labels = np.load(root / "train_labels.npy")
    np.save(root / "train_labels.npy", np.where(train_labels == 2, 3, train_labels))  # class 2 never trained
    with pytest.raises(RobustlabError, match="class 2 of 0..3 has no training images: an empty class would still get an output$"):
        load_dataset("npy", root)
    (root / "test_labels.npy").unlink()
    with pytest.raises(RobustlabError, match="test_labels.npy not found"):
        load_dataset("npy", root)


def test_streamed_batches_are_sharded_over_ranks_and_augmented(tmp_path, monkeypatch):
    data = load_dataset("npy", _npy(tmp_path / "c10c", n_train=50))
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    seen = []
    for rank in (0, 1):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        batches = list(loader_batches(data.train, 4, 0, 0, "none", workers=0))
        assert [len(y) for _, y in batches] == [4, 4, 4, 4, 4, 3]  # ceil(45 / 2) images per rank
        seen.append(torch.cat([x for x, _ in batches]))
        assert all(x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1 for x, _ in batches)
    assert len(seen[0]) == len(seen[1]) == 23 and not torch.equal(seen[0], seen[1])
    plain = torch.cat([x for x, _ in loader_batches(data.train, 4, 0, 0, "none", workers=0)])
    cropped = torch.cat([x for x, _ in loader_batches(data.train, 4, 0, 0, "crop", workers=0)])
    assert plain.shape == cropped.shape and not torch.equal(plain, cropped)


def test_train_on_a_folder_then_eval_from_the_run_alone(folder, tmp_path, run_cli):
    run = tmp_path / "run"
    trained = run_cli("train", "--dataset", "folder", "--data-dir", str(folder), "--image-size", "10",
                        "--model", "cnn-small", "--method", "pgd-at", "--epochs", "1", "--steps", "2",
                        "--batch-size", "16", "--workers", "1", "--threads", "1", "--out", str(run))
    assert trained.returncode == 0, trained.stderr
    meta = json.loads((run / "config.json").read_text())["dataset"]
    assert meta["data_dir"] == str(folder) and meta["options"] == {"image_size": [10, 10]}
    assert meta["input_shape"] == [3, 10, 10] and meta["val_size"] == 9
    # Neither --data-dir nor --image-size: both come from the run (12×12 files would not fit the model).
    evaluated = run_cli("eval", str(run), "--n", "20", "--steps", "2", "--restarts", "1", "--sweep-n", "0",
                          "--json", "--threads", "1")
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads(evaluated.stdout)
    assert result["n"] == 20 and 0 <= result["robust"] <= result["clean"] <= 1
    model = load_model(run)
    assert model(torch.rand(2, 3, 10, 10)).shape == (2, 3)
    # other data in the same format: other classes were measured without a word
    import shutil
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    for split in ("train", "test"):
        (other / split / "red").rename(other / split / "yellow")
    refused = run_cli("eval", str(run), "--data-dir", str(other), "--n", "20", "--threads", "1")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "class names (blue, green, yellow) but the run was trained on (blue, green, red)" in refused.stderr
    shutil.move(folder, tmp_path / "moved")  # said "--dataset folder: no folders train/ …", flags never typed
    try:
        gone = run_cli("eval", str(run), "--n", "20", "--threads", "1")
    finally:
        shutil.move(tmp_path / "moved", folder)
    assert gone.returncode == 2 and f"the run's data folder {folder} is gone; point --data-dir at its data" in gone.stderr


@pytest.mark.parametrize("dataset,data_dir,words", [
    ("folder", "missing", ["train/ and test/", "--data-dir"]),
    ("npy", "missing", ["train_images.npy", "--data-dir"]),
    ("folder", None, ["needs --data-dir"]),
])
def test_bad_data_dir_is_one_line_and_status_2(dataset, data_dir, words, tmp_path, run_cli):
    args = ["--data-dir", str(tmp_path / data_dir)] if data_dir else []
    result = run_cli("train", "--dataset", dataset, *args, "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("robustlab: error:"), result.stderr
    assert all(w in lines[0] for w in words)
