"""Tests for robustlab.data on tiny synthetic files; the only network is a loopback HTTP server."""

import functools
import gzip
import hashlib
import http.server
import pickle
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from robustlab.data import (DATASETS, DEFAULT_DATA_DIRS, ImageSet, augment_batch, load_cifar_c,
                            load_dataset)
from robustlab.data import download
from robustlab.errors import RobustlabError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


# ---- synthetic data writers ----

def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes((0, 0, 0x08, array.ndim)) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_dataset(folder: Path, n_train=30, n_test=10, gz=True, seed=0):
    """Four idx files; image i of the training set carries i in pixel (0, 0) to trace splits."""
    rng = np.random.default_rng(seed)
    train_x = rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)
    train_x[:, 0, 0] = np.arange(n_train)
    test_x = rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8)
    train_y = rng.integers(0, 10, n_train, dtype=np.uint8)
    test_y = rng.integers(0, 10, n_test, dtype=np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in zip(IDX_NAMES, (train_x, train_y, test_x, test_y)):
        data = idx_bytes(array)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return train_x, train_y, test_x, test_y


def write_cifar(folder: Path, files, label_key: bytes, num_classes: int, per_file=4, seed=0):
    """Pickled batches in the publisher's layout; returns the images (N×3×32×32) and labels."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = [], []
    for name in files:
        x = rng.integers(0, 256, (per_file, 3, 32, 32), dtype=np.uint8)
        y = rng.integers(0, num_classes, per_file).tolist()
        batch = {b"data": x.reshape(per_file, 3072), label_key: y, b"batch_label": b"synthetic"}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        images.append(x)
        labels += y
    return np.concatenate(images), np.array(labels)


def write_cifar10(root: Path):
    folder = root / "cifar-10-batches-py"
    train = write_cifar(folder, [f"data_batch_{i}" for i in range(1, 6)], b"labels", 10)
    test = write_cifar(folder, ["test_batch"], b"labels", 10, per_file=3, seed=1)
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"airplane"] * 10}))
    return train, test


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- registry and ImageSet ----

def test_registry_is_consistent():
    assert set(DATASETS) == {"fashion-mnist", "mnist", "cifar10", "cifar100"}
    for name, info in DATASETS.items():
        assert info.name == name
        assert len(info.class_names) == info.num_classes == len(set(info.class_names))
        assert len(info.mean) == len(info.std) == info.input_shape[0]
        assert info.augment in ("none", "crop", "crop-flip")
    assert DATASETS["fashion-mnist"].augment == "crop" and DATASETS["cifar10"].augment == "crop-flip"


def test_imageset_subset_and_float():
    s = ImageSet(torch.arange(24, dtype=torch.uint8).view(6, 1, 2, 2), torch.arange(6))
    assert len(s.subset(4)) == 4 and torch.equal(s.subset(4).labels, torch.arange(4))
    assert len(s.subset(100)) == 6
    f = s.as_float()
    assert f.dtype == torch.float32 and torch.allclose(f * 255, s.images.float())


@pytest.mark.parametrize("images, labels, said", [
    (np.zeros((2, 1, 2, 2), np.uint8), torch.zeros(2, dtype=torch.long), "images must be a torch tensor, got ndarray"),
    (torch.zeros(2, 1, 2, 2, dtype=torch.uint8), [0, 1], "labels must be a torch tensor, got list"),
    (torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.tensor([0.0, 1.0]), "labels must be integers"),
])
def test_imageset_refuses_what_it_cannot_hold(images, labels, said):
    with pytest.raises(RobustlabError, match=said):
        ImageSet(images, labels)


# ---- idx readers ----

@pytest.mark.parametrize("gz", [True, False])
def test_idx_roundtrip(tmp_path, gz):
    train_x, train_y, test_x, test_y = write_idx_dataset(tmp_path, gz=gz)
    splits = load_dataset("mnist", data_dir=tmp_path, val_size=0)
    assert splits.info is DATASETS["mnist"] and len(splits.val) == 0
    assert splits.test.images.shape == (10, 1, 28, 28) and splits.test.images.dtype == torch.uint8
    assert np.array_equal(splits.test.images[:, 0].numpy(), test_x)
    assert splits.test.labels.dtype == torch.int64
    assert np.array_equal(splits.test.labels.numpy(), test_y)
    order = splits.train.images[:, 0, 0, 0].long()  # the identity pixel
    assert np.array_equal(splits.train.images[:, 0].numpy(), train_x[order])
    assert np.array_equal(splits.train.labels.numpy(), train_y[order])


def test_data_dir_subfolder_is_accepted(tmp_path):
    write_idx_dataset(tmp_path / "fashion-mnist")
    assert len(load_dataset("fashion-mnist", data_dir=tmp_path, val_size=5).test) == 10


def test_truncated_and_foreign_idx_files_fail_clearly(tmp_path):
    write_idx_dataset(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    good = path.read_bytes()
    cases = {
        "truncated gzip": good[: len(good) // 2],
        "short data": gzip.compress(gzip.decompress(good)[:-5]),
        "wrong magic": gzip.compress(b"\x00\x00\x08\x01" + gzip.decompress(good)[4:]),
        "not unsigned bytes": gzip.compress(b"\x00\x00\x0d\x03" + gzip.decompress(good)[4:]),  # float32 type code
        "nonzero magic prefix": gzip.compress(b"\x01\x00\x08\x03" + gzip.decompress(good)[4:]),
        "not gzip, not idx": b"<html>not found</html>",
    }
    for case, data in cases.items():
        path.write_bytes(data)
        with pytest.raises(RobustlabError) as err:
            load_dataset("mnist", data_dir=tmp_path, val_size=5)
        assert str(path) in str(err.value), case
        assert "\n" not in str(err.value)


def test_missing_data_names_searched_dirs(tmp_path, monkeypatch):
    with pytest.raises(RobustlabError) as err:
        load_dataset("fashion-mnist", data_dir=tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path) in msg and str(tmp_path / "fashion-mnist") in msg
    assert "--download" in msg and "--data-dir" in msg

    defaults = (str(tmp_path / "system"), str(tmp_path / "cache"))
    monkeypatch.setitem(DEFAULT_DATA_DIRS, "mnist", defaults)
    with pytest.raises(RobustlabError) as err:
        load_dataset("mnist")
    assert all(d in str(err.value) for d in defaults)
    write_idx_dataset(Path(defaults[1]))
    assert len(load_dataset("mnist", val_size=5).train) == 25  # falls through to the 2nd dir

    part = tmp_path / "part"  # a download cut short: the files that are missing are named
    write_idx_dataset(part)
    (part / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(RobustlabError, match=r"not found in .*part, .*\(.*part lacks t10k-labels-idx1-ubyte, with or "
                                             r"without .gz\); "):
        load_dataset("fashion-mnist", data_dir=part)


def test_unknown_dataset_and_bad_val_size(tmp_path):
    with pytest.raises(RobustlabError, match="allowed"):
        load_dataset("imagenet", data_dir=tmp_path)
    write_idx_dataset(tmp_path)
    with pytest.raises(RobustlabError, match="val_size"):
        load_dataset("mnist", data_dir=tmp_path, val_size=30)


# ---- splits ----

def test_splits_follow_the_randperm_protocol(tmp_path):
    write_idx_dataset(tmp_path, n_train=40)
    a = load_dataset("mnist", data_dir=tmp_path, val_size=12, seed=3)
    b = load_dataset("mnist", data_dir=tmp_path, val_size=12, seed=3)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.val.labels, b.val.labels)
    train_ids = a.train.images[:, 0, 0, 0].long()
    val_ids = a.val.images[:, 0, 0, 0].long()
    assert len(train_ids) == 28 and len(val_ids) == 12
    assert set(train_ids.tolist()).isdisjoint(val_ids.tolist())
    assert sorted(train_ids.tolist() + val_ids.tolist()) == list(range(40))
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(3))
    assert torch.equal(train_ids, perm[:28]) and torch.equal(val_ids, perm[28:])
    other = load_dataset("mnist", data_dir=tmp_path, val_size=12, seed=4)
    assert not torch.equal(other.val.images, a.val.images)


# ---- CIFAR ----

def test_cifar10_pickles(tmp_path):
    (train_x, train_y), (test_x, test_y) = write_cifar10(tmp_path)
    for data_dir in (tmp_path, tmp_path / "cifar-10-batches-py"):  # parent or the folder itself
        s = load_dataset("cifar10", data_dir=data_dir, val_size=0)
        assert s.train.images.shape == (20, 3, 32, 32) and s.train.images.is_contiguous()
        assert np.array_equal(s.test.images.numpy(), test_x)
        assert np.array_equal(s.test.labels.numpy(), test_y)
        perm = torch.randperm(20, generator=torch.Generator().manual_seed(0)).numpy()
        assert np.array_equal(s.train.images.numpy(), train_x[perm])
        assert np.array_equal(s.train.labels.numpy(), train_y[perm])


def test_cifar100_pickles(tmp_path):
    folder = tmp_path / "cifar-100-python"
    train_x, train_y = write_cifar(folder, ["train"], b"fine_labels", 100, per_file=9)
    test_x, test_y = write_cifar(folder, ["test"], b"fine_labels", 100, per_file=5, seed=2)
    s = load_dataset("cifar100", data_dir=tmp_path, val_size=4)
    assert (len(s.train), len(s.val), len(s.test)) == (5, 4, 5)
    assert s.info.num_classes == 100
    assert np.array_equal(s.test.images.numpy(), test_x)
    assert np.array_equal(s.test.labels.numpy(), test_y)


def test_cifar_archive_is_extracted(tmp_path):
    src = tmp_path / "src"
    (_, _), (test_x, _) = write_cifar10(src)
    archive = tmp_path / "data" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    s = load_dataset("cifar10", data_dir=archive, val_size=2)  # the archive itself
    assert np.array_equal(s.test.images.numpy(), test_x)
    assert (archive.parent / "cifar-10-batches-py" / "test_batch").is_file()
    assert [p.name for p in archive.parent.iterdir() if p.name.startswith(".")] == []
    assert len(load_dataset("cifar10", data_dir=archive.parent, val_size=2).test) == 3


def test_cifar_archive_extracted_by_another_process_first_or_left_incomplete(tmp_path):
    """Two torchrun ranks extracting the same archive: the slower one failed (ENOTEMPTY) where the faster one's
    folder was there to read. A folder left incomplete got the advice to download the archive again."""
    from robustlab.data.datasets import _extract
    src = tmp_path / "src"
    write_cifar10(src)
    data = tmp_path / "data"
    data.mkdir()
    with tarfile.open(data / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    first = _extract(data / "cifar-10-python.tar.gz", "cifar-10-batches-py", data, "data_batch_1")
    again = _extract(data / "cifar-10-python.tar.gz", "cifar-10-batches-py", data, "data_batch_1")  # the slower rank
    assert first == again == data / "cifar-10-batches-py"
    assert [p.name for p in data.iterdir() if p.name.startswith(".")] == []
    for f in first.iterdir():
        if f.name != "test_batch":
            f.unlink()
    with pytest.raises(RobustlabError, match=r"cifar-10-batches-py is incomplete \(it has no data_batch_1\); delete "
                                             "that folder and it is extracted again"):
        load_dataset("cifar10", data_dir=data)


def test_a_damaged_cifar_pickle_is_a_one_line_error(tmp_path):
    """A pickle naming an unknown text encoding was a LookupError traceback."""
    write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    batch.write_bytes(pickle.dumps({b"data": np.zeros(3, dtype=np.uint8)}, protocol=2).replace(b"latin1", b"latinX"))
    with pytest.raises(RobustlabError, match="cannot read CIFAR batch .*test_batch"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_cifar_pickle_cannot_run_code(tmp_path):
    write_cifar10(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(RobustlabError, match="test_batch"):
        load_dataset("cifar10", data_dir=tmp_path)


# ---- download over a loopback server ----

@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A local HTTP server for ROBUSTLAB_DATA_MIRROR; yields the folder it serves."""
    served = tmp_path / "served"
    served.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=served)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    monkeypatch.setenv(download.MIRROR_ENV, f"http://127.0.0.1:{server.server_address[1]}")
    for var in ("no_proxy", "NO_PROXY"):  # never route loopback through a configured proxy
        monkeypatch.setenv(var, "*")
    yield served
    server.shutdown()
    server.server_close()
    thread.join()


def test_download_idx_and_checksum_mismatch(tmp_path, mirror, monkeypatch):
    _, _, test_x, _ = write_idx_dataset(mirror)
    digests = {f"{n}.gz": sha256(mirror / f"{n}.gz") for n in IDX_NAMES}
    monkeypatch.setitem(download.SHA256, "fashion-mnist", digests)

    dest = tmp_path / "dl"
    s = load_dataset("fashion-mnist", data_dir=dest, download=True, val_size=5)
    assert sorted(p.name for p in dest.iterdir()) == sorted(digests)
    assert np.array_equal(s.test.images[:, 0].numpy(), test_x)
    from robustlab.checkpoint import _UMASK  # files were owner-only (mkstemp): a shared folder unreadable for others
    assert {(dest / f).stat().st_mode & 0o777 for f in digests} == {0o666 & ~_UMASK}

    bad = dict(digests, **{"t10k-images-idx3-ubyte.gz": "0" * 64})
    monkeypatch.setitem(download.SHA256, "fashion-mnist", bad)
    dest2 = tmp_path / "dl2"
    with pytest.raises(RobustlabError) as err:
        load_dataset("fashion-mnist", data_dir=dest2, download=True)
    msg = str(err.value)
    assert msg.startswith("checksum mismatch for http://127.0.0.1:") and "t10k-images" in msg
    assert "\n" not in msg and "0" * 64 in msg and digests["t10k-images-idx3-ubyte.gz"] in msg
    assert not (dest2 / "t10k-images-idx3-ubyte.gz").exists()
    assert not [p for p in dest2.iterdir() if p.name.endswith(".part")]


def test_download_missing_file_on_server(tmp_path, mirror, monkeypatch):
    monkeypatch.setitem(download.SHA256, "mnist", {"train-images-idx3-ubyte.gz": "0" * 64})
    with pytest.raises(RobustlabError, match="download of .* failed") as err:
        load_dataset("mnist", data_dir=tmp_path / "dl", download=True)
    assert "\n" not in str(err.value)
    assert list((tmp_path / "dl").iterdir()) == []


def test_a_mirror_that_is_no_url_is_a_one_line_error(tmp_path, monkeypatch):
    """A mirror without its scheme was a ValueError traceback from urllib."""
    monkeypatch.setenv(download.MIRROR_ENV, "mirror.example.org/data")
    with pytest.raises(RobustlabError, match=r"ROBUSTLAB_DATA_MIRROR must be a URL starting with http://"):
        load_dataset("mnist", data_dir=tmp_path / "dl", download=True)


def test_download_cifar_archive(tmp_path, mirror, monkeypatch):
    (_, _), (test_x, _) = write_cifar10(tmp_path / "src")
    archive = mirror / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    monkeypatch.setitem(download.SHA256, "cifar10", {archive.name: sha256(archive)})
    s = load_dataset("cifar10", data_dir=tmp_path / "dl", download=True, val_size=2)
    assert np.array_equal(s.test.images.numpy(), test_x)


# ---- augmentation ----

def test_augment_preserves_shape_range_and_is_deterministic():
    x = torch.rand(16, 3, 32, 32)
    assert augment_batch(x, "none") is x
    for kind in ("crop", "crop-flip"):
        y = augment_batch(x, kind, torch.Generator().manual_seed(1))
        assert y.shape == x.shape and y.dtype == x.dtype
        assert y.min() >= 0 and y.max() <= 1
        assert torch.equal(y, augment_batch(x, kind, torch.Generator().manual_seed(1)))
        assert not torch.equal(y, augment_batch(x, kind, torch.Generator().manual_seed(2)))
    with pytest.raises(RobustlabError, match="allowed"):
        augment_batch(x, "rotate")


def shifted(x: torch.Tensor, dy: int, dx: int, p: int) -> torch.Tensor:
    """Reference crop: x translated so that output[i, j] = x[i + dy, j + dx], zeros outside."""
    padded = torch.nn.functional.pad(x, (p, p, p, p))
    h, w = x.shape[-2:]
    return padded[..., p + dy: p + dy + h, p + dx: p + dx + w]


def test_crop_is_a_per_example_shift():
    x = torch.rand(12, 1, 28, 28) + 0.01  # no zeros, so padding is visible
    y = augment_batch(x, "crop", torch.Generator().manual_seed(0))
    shifts = []
    for xi, yi in zip(x, y):
        match = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                 if torch.equal(yi, shifted(xi, dy, dx, 2))]
        assert len(match) == 1
        shifts.append(match[0])
    assert len(set(shifts)) > 1 and any(s != (0, 0) for s in shifts)


def test_flip_only_for_crop_flip():
    x = torch.rand(32, 3, 8, 8)
    assert torch.equal(augment_batch(x, "crop", torch.Generator().manual_seed(0), padding=0), x)
    y = augment_batch(x, "crop-flip", torch.Generator().manual_seed(0), padding=0)
    flipped = [torch.equal(yi, xi.flip(-1)) for xi, yi in zip(x, y)]
    kept = [torch.equal(yi, xi) for xi, yi in zip(x, y)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 0 < sum(flipped) < len(x)


@pytest.mark.parametrize("size, padding", [(28, 2), (32, 4)])
def test_crop_shifts_reach_every_offset_up_to_the_padding_both_ways(size, padding):
    """MNIST's customary 2 pixels and CIFAR's 4, in every direction: a shift that never reaches +p, or CIFAR's images
    cropped as MNIST's, trains on other data than the recipe says."""
    y = augment_batch(torch.ones(600, 1, size, size), "crop", torch.Generator().manual_seed(0))[:, 0]
    zero_rows, zero_cols = y.sum(2) == 0, y.sum(1) == 0  # the zero padding that a shift brings in
    half = size // 2
    dy = zero_rows[:, half:].sum(1) - zero_rows[:, :half].sum(1)
    dx = zero_cols[:, half:].sum(1) - zero_cols[:, :half].sum(1)
    assert set(dy.tolist()) == set(dx.tolist()) == set(range(-padding, padding + 1))


# ---- CIFAR-10-C ----

def test_cifar_c_npy(tmp_path):
    n = 7
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 5 * n)
    np.save(tmp_path / "labels.npy", labels)
    fog = rng.integers(0, 256, (5 * n, 32, 32, 3), dtype=np.uint8)
    np.save(tmp_path / "fog.npy", fog)
    np.save(tmp_path / "snow.npy", fog[::-1].copy())

    sets = load_cifar_c(tmp_path, severities=(1, 3))
    assert set(sets) == {"fog", "snow"} and set(sets["fog"]) == {1, 3}
    s3 = sets["fog"][3]
    assert s3.images.shape == (n, 3, 32, 32) and s3.images.dtype == torch.uint8
    assert s3.images.is_contiguous()
    assert np.array_equal(s3.images.numpy(), fog[2 * n: 3 * n].transpose(0, 3, 1, 2))
    assert np.array_equal(s3.labels.numpy(), labels[2 * n: 3 * n])
    assert list(load_cifar_c(tmp_path, ["snow"])) == ["snow"]
    levels, = load_cifar_c(tmp_path, ["snow"], severities=[np.int64(2)])["snow"]
    assert levels == 2 and type(levels) is int  # numpy keys would fail json.dumps
    assert set(load_cifar_c(tmp_path, ["snow"], severities=iter([2]))["snow"]) == {2}  # read once, not used up
    for levels in ([3.0], [True], [6], 3, "3", None):  # a float, a bool, out of range, not a list
        with pytest.raises(RobustlabError, match="severities"):
            load_cifar_c(tmp_path, ["snow"], severities=levels)

    with pytest.raises(RobustlabError, match="rain"):
        load_cifar_c(tmp_path, ["rain"])
    np.save(tmp_path / "blur.npy", fog[:-5])
    with pytest.raises(RobustlabError, match="blur.npy"):
        load_cifar_c(tmp_path, ["blur"])
    (tmp_path / "labels.npy").unlink()
    with pytest.raises(RobustlabError, match="labels.npy not found") as err:
        load_cifar_c(tmp_path)
    assert str(tmp_path) in str(err.value)


# ---- the real Fashion-MNIST, when installed ----

@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="Fashion-MNIST is not installed")
def test_real_fashion_mnist():
    s = load_dataset("fashion-mnist")
    assert (len(s.train), len(s.val), len(s.test)) == (55000, 5000, 10000)
    for part in (s.train, s.val, s.test):
        assert part.images.dtype == torch.uint8 and part.images.shape[1:] == (1, 28, 28)
        assert part.labels.dtype == torch.int64 and part.labels.max() == 9
    assert torch.equal(s.test.labels.bincount(), torch.full((10,), 1000))


def test_idx_files_of_another_size_an_overflowing_header_and_shadowed_folders_are_refused(tmp_path):
    # 32×32 images under an MNIST name failed later as a matmul inside the model
    folder = tmp_path / "size32"
    write_idx_dataset(folder)
    x = np.zeros((30, 32, 32), np.uint8)
    (folder / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(x)))
    with pytest.raises(RobustlabError, match=r"training images in .* are \(1, 32, 32\), not mnist's \(1, 28, 28\)"):
        load_dataset("mnist", data_dir=folder, val_size=5)
    # a header whose size product wraps to 0 in int64 was a reshape ValueError
    forged = tmp_path / "forged"
    write_idx_dataset(forged)
    header = bytes((0, 0, 0x08, 3)) + b"".join(d.to_bytes(4, "big") for d in (1 << 22, 1 << 21, 1 << 21))
    (forged / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(header))
    with pytest.raises(RobustlabError, match="data bytes but its header"):
        load_dataset("mnist", data_dir=forged, val_size=5)
    # files in --data-dir and in --data-dir/<name>: the parent's once won without a word
    nest = tmp_path / "nest"
    write_idx_dataset(nest)
    write_idx_dataset(nest / "fashion-mnist", seed=1)
    with pytest.raises(RobustlabError, match="both .* hold fashion-mnist files"):
        load_dataset("fashion-mnist", data_dir=nest, val_size=5)


def test_cifar_pickles_of_other_dtypes_are_refused(tmp_path):
    """float pixels in [0, 1] were cast to black uint8 images and float labels truncated, without a word."""
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(tmp_path)
    batch = {b"data": np.full((4, 3072), 0.5, np.float32), b"labels": [1, 2, 3, 4]}
    (folder / "data_batch_2").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(RobustlabError, match="data_batch_2 holds float32 data and int64 labels; expected uint8"):
        load_dataset("cifar10", data_dir=tmp_path, val_size=2)
    batch = {b"data": np.zeros((4, 3072), np.uint8), b"labels": [1.0, 2.5, 3.0, 4.0]}
    (folder / "data_batch_2").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(RobustlabError, match="uint8 data and float64 labels"):
        load_dataset("cifar10", data_dir=tmp_path, val_size=2)


def test_a_cifar_label_beyond_the_classes_is_refused(tmp_path):
    """Label 10 in a CIFAR-10 batch names no class: read as it is, it fails in the first loss or is scored as a
    wrong prediction."""
    write_cifar10(tmp_path)
    batch = {b"data": np.zeros((4, 3072), np.uint8), b"labels": [1, 2, 10, 4]}
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(RobustlabError, match=r"CIFAR labels in .* fall outside 0\.\.9"):
        load_dataset("cifar10", data_dir=tmp_path, val_size=2)


def test_mnist_and_fashion_mnist_files_are_told_apart(tmp_path):
    """The two share file names and shapes: the wrong --dataset trained with the other's normalization silently."""
    def write_with_mean(folder, mean):  # 300 images whose pixels average `mean` (in [0, 1])
        x = np.zeros((300, 28, 28), np.uint8)
        x.reshape(300, -1)[:, :int(round(mean * 784))] = 255
        write_idx_dataset(folder, n_train=300)
        (folder / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(x)))
    write_with_mean(tmp_path / "fashion", 0.2860)
    with pytest.raises(RobustlabError, match="are fashion-mnist's, not mnist's .*pass --dataset fashion-mnist"):
        load_dataset("mnist", data_dir=tmp_path / "fashion")
    assert len(load_dataset("fashion-mnist", data_dir=tmp_path / "fashion").train) == 270
    write_with_mean(tmp_path / "mnist", 0.1307)
    with pytest.raises(RobustlabError, match="pass --dataset mnist"):
        load_dataset("fashion-mnist", data_dir=tmp_path / "mnist")
    write_with_mean(tmp_path / "kmnist", 0.19)  # another idx dataset of the same shape is no registered one's
    assert len(load_dataset("mnist", data_dir=tmp_path / "kmnist").train) == 270


def test_download_cut_short_or_into_a_file_is_a_one_line_error(tmp_path, monkeypatch):
    import http.client
    from robustlab.data.download import download_file

    class CutShort:
        headers = {}

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read(self, n):
            raise http.client.IncompleteRead(b"partial")
    monkeypatch.setattr("urllib.request.urlopen", lambda url, timeout: CutShort())
    with pytest.raises(RobustlabError, match="download of http://127.0.0.1/x failed"):
        download_file("http://127.0.0.1/x", tmp_path / "x.gz", "0" * 64)
    assert list(tmp_path.iterdir()) == []  # no .part left behind
    (tmp_path / "afile").write_text("x")
    with pytest.raises(RobustlabError, match="cannot download into"):
        download_file("http://127.0.0.1/x", tmp_path / "afile" / "sub" / "x.gz", "0" * 64)
