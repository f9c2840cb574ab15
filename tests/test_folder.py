"""Out-of-memory datasets: class-per-folder images and memory-mapped .npy arrays."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from robustlab.data.folder import ImageFolder, NpyArrays, epoch_loader
from robustlab.errors import RobustlabError


def _folder(root, per_class=3):
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


def test_image_folder_reads_classes_and_pixels(tmp_path):
    data = ImageFolder(_folder(tmp_path / "imgs"))
    assert data.classes == ["cat", "dog"] and len(data) == 6
    x, label = data[4]
    assert x.dtype == torch.uint8 and x.shape == (3, 10, 12) and label == 1
    expected = np.asarray(Image.open(tmp_path / "imgs" / "dog" / "1.png")).transpose(2, 0, 1)
    assert torch.equal(x, torch.from_numpy(expected.copy()))
    small = ImageFolder(tmp_path / "imgs", size=(8, 8), mode="L")
    assert small[0][0].shape == (1, 8, 8)


def test_image_folder_errors_are_one_line(tmp_path):
    with pytest.raises(RobustlabError, match="does not exist"):
        ImageFolder(tmp_path / "missing")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(RobustlabError, match="no images"):
        ImageFolder(tmp_path / "empty")


def test_npy_arrays_are_memory_mapped_and_channel_first(tmp_path):
    images = np.arange(5 * 4 * 4 * 3, dtype=np.uint8).reshape(5, 4, 4, 3)
    np.save(tmp_path / "x.npy", images)
    np.save(tmp_path / "y.npy", np.arange(5))
    data = NpyArrays(tmp_path / "x.npy", tmp_path / "y.npy")
    assert isinstance(data.images, np.memmap)
    x, y = data[2]
    assert torch.equal(x, torch.from_numpy(images[2].transpose(2, 0, 1).copy())) and y == 2
    np.save(tmp_path / "bad.npy", np.zeros((5, 4), dtype=np.float32))
    with pytest.raises(RobustlabError, match="uint8"):
        NpyArrays(tmp_path / "bad.npy", tmp_path / "y.npy")


def test_epoch_loader_order_depends_on_seed_and_epoch_only(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((20, 2, 2, 1), dtype=np.uint8))
    np.save(tmp_path / "y.npy", np.arange(20))
    data = NpyArrays(tmp_path / "x.npy", tmp_path / "y.npy")

    def order(seed, epoch):
        return torch.cat([y for _, y in epoch_loader(data, 6, seed, epoch, workers=0)]).tolist()

    assert sorted(order(0, 0)) == list(range(20))
    assert order(0, 0) == order(0, 0) and order(0, 0) != order(0, 1) and order(0, 0) != order(1, 0)


def test_hidden_folders_are_no_classes_and_an_empty_class_is_refused(tmp_path):
    root = _folder(tmp_path / "imgs")
    (root / ".ipynb_checkpoints").mkdir()  # once class 0, shifting every real label by one
    assert ImageFolder(root).classes == ["cat", "dog"]
    (root / "zebra").mkdir()
    (root / "zebra" / "readme.txt").write_text("no images here")
    with pytest.raises(RobustlabError, match="class folder zebra under .* holds no images"):
        ImageFolder(root)


def test_an_image_too_large_to_decode_is_a_one_line_error(tmp_path, monkeypatch):
    data = ImageFolder(_folder(tmp_path / "imgs"))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # Pillow refuses images over twice this: a decompression bomb
    with pytest.raises(RobustlabError, match="cannot decode image"):
        data[0]


def test_an_error_raised_in_a_loader_worker_is_told_in_one_line():
    """PyTorch re-raises it wrapped in the worker's whole traceback; the CLI prints the last line only."""
    from torch.utils.data import DataLoader, Dataset
    from robustlab.errors import one_line

    class Broken(Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            raise RobustlabError("cannot decode image x.png: truncated")
    with pytest.raises(RobustlabError) as err:
        list(DataLoader(Broken(), num_workers=1))
    assert "Original Traceback" in str(err.value)
    assert one_line(err.value) == "cannot decode image x.png: truncated"


def test_npy_arrays_refuse_channels_first_images_and_labels_that_are_not_class_indices(tmp_path):
    """N×3×H×W arrays trained as 16-channel images, 2-d labels crashed in np.concatenate, string labels in a ufunc."""
    np.save(tmp_path / "x.npy", np.zeros((5, 4, 4, 3), dtype=np.uint8))
    np.save(tmp_path / "nchw.npy", np.zeros((5, 3, 16, 16), dtype=np.uint8))
    np.save(tmp_path / "y.npy", np.arange(5))
    with pytest.raises(RobustlabError, match=r"expected N×H×W×C with 1 or 3 channels"):
        NpyArrays(tmp_path / "nchw.npy", tmp_path / "y.npy")
    for bad in (np.arange(5)[:, None], np.array(list("abcde")), np.arange(5) + 0.5):
        np.save(tmp_path / "bad_y.npy", bad)
        with pytest.raises(RobustlabError, match="expected one integer class index per image"):
            NpyArrays(tmp_path / "x.npy", tmp_path / "bad_y.npy")


def test_hidden_files_are_no_images_and_float_or_32_bit_pixels_are_refused(tmp_path):
    """macOS's ._0.png stopped a run with a decode error; a 32-bit or float image decoded all white or all black."""
    (tmp_path / "a").mkdir()
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(tmp_path / "a" / "0.png")
    (tmp_path / "a" / "._0.png").write_bytes(b"\x00\x05\x16\x07 resource fork")
    assert [f.name for f, _ in ImageFolder(tmp_path, mode="L").files] == ["0.png"]
    Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)).save(tmp_path / "a" / "0.tiff")
    with pytest.raises(RobustlabError, match=r"0.tiff holds floating-point pixels"):
        ImageFolder(tmp_path, mode="L")[1]
    (tmp_path / "a" / "0.tiff").unlink()
    Image.fromarray(np.full((4, 4), 300, dtype=np.int32)).save(tmp_path / "a" / "1.tiff")
    with pytest.raises(RobustlabError, match=r"1.tiff holds 32-bit pixels outside 0..255"):
        ImageFolder(tmp_path, mode="L")[1]
    Image.fromarray(np.full((4, 4), 252, dtype=np.int32)).save(tmp_path / "a" / "1.tiff")  # 8-bit values: kept
    assert ImageFolder(tmp_path, mode="L")[1][0].unique().tolist() == [252]


def test_sixteen_bit_grayscale_images_are_scaled_not_clipped(tmp_path):
    """Pillow's convert clipped every 16-bit value above 255: a 16-bit PNG folder trained on white images."""
    (tmp_path / "a").mkdir()
    ramp = (np.arange(64).reshape(8, 8) * 1040).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(ramp).save(tmp_path / "a" / "0.png")
    for mode, channels in (("L", 1), ("RGB", 3)):
        x, _ = ImageFolder(tmp_path, mode=mode)[0]
        assert x.shape == (channels, 8, 8)
        assert torch.equal(x[0], torch.from_numpy(np.round(ramp / 257).astype(np.uint8)))
    Image.fromarray(ramp).save(tmp_path / "a" / "0.ppm")  # 16-bit grayscale (P5): opens in Pillow's mode "I"
    (tmp_path / "a" / "0.png").unlink()
    assert torch.equal(ImageFolder(tmp_path, mode="L")[0][0][0], torch.from_numpy(np.round(ramp / 257).astype(np.uint8)))


def _npy_dataset(root, train_labels, test_labels=None):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    train_labels = np.asarray(train_labels, dtype=np.int64)
    test_labels = train_labels[:4] if test_labels is None else np.asarray(test_labels, dtype=np.int64)
    np.save(root / "train_images.npy", rng.integers(0, 256, (len(train_labels), 4, 4, 3), dtype=np.uint8))
    np.save(root / "train_labels.npy", train_labels)
    np.save(root / "test_images.npy", rng.integers(0, 256, (len(test_labels), 4, 4, 3), dtype=np.uint8))
    np.save(root / "test_labels.npy", test_labels)
    return root


@pytest.mark.parametrize("labels,message", [
    # np.bincount up to the largest label: 7.5 GiB for a label of 10**9, killed by the kernel
    ([0] * 9 + [10 ** 9], r"classes 1, 2, .*, 10 and 999999989 more of 0\.\.1000000000 have no training images"),
    ([0] * 9 + [100_000], r"classes 1, .*, 10 and 99989 more of"),  # a 690,000-character line listed every one
    ([-1] * 10, r"labels are class indices from 0, found -1"),  # said "labels must lie in 0..-1"
    ([3] * 10, r"every training label is 3; a classifier needs at least two classes"),
    ([0] * 10, r"every training label is 0"),  # trained to 100% clean and robust accuracy without a word
])
def test_npy_labels_are_checked_without_allocating_per_class_and_in_one_short_line(labels, message, tmp_path):
    from robustlab.data.folder import _npy_sets
    with pytest.raises(RobustlabError, match=message) as info:
        _npy_sets(_npy_dataset(tmp_path / "d", labels))
    assert len(str(info.value)) < 300


def test_an_image_folder_of_one_class_is_refused(tmp_path):
    from robustlab.data.folder import _folder_sets
    for split in ("train", "test"):
        _folder(tmp_path / split)
        for f in (tmp_path / split / "dog").iterdir():
            f.unlink()
        (tmp_path / split / "dog").rmdir()
    with pytest.raises(RobustlabError, match=r"1 class folder \(cat\); a classifier needs at least two classes"):
        _folder_sets(tmp_path, None, False)


def test_grayscale_and_resized_images_are_what_pillow_gives(tmp_path):
    """Grayscale is ITU-R 601 luminance (Pillow's "L"), not one channel; resizing is bilinear, not nearest."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    colours = np.array([[200, 30, 60], [20, 180, 240]], np.uint8)[np.indices((8, 8)).sum(0) % 2]  # a checkerboard
    Image.fromarray(colours).save(tmp_path / "a" / "0.png")
    Image.fromarray(colours[::-1]).save(tmp_path / "b" / "0.png")
    gray, label = ImageFolder(tmp_path, mode="L")[0]
    luminance = np.floor(colours.astype(np.float64) @ [0.299, 0.587, 0.114] + 0.5)
    assert label == 0 and gray.shape == (1, 8, 8)
    assert np.abs(gray[0].numpy() - luminance).max() <= 1
    small, _ = ImageFolder(tmp_path, size=(4, 6))[0]
    expected = np.asarray(Image.fromarray(colours).resize((6, 4), Image.BILINEAR)).transpose(2, 0, 1)
    assert small.shape == (3, 4, 6) and torch.equal(small, torch.from_numpy(expected.copy()))


def test_npy_arrays_read_channels_first_rows_as_they_are(tmp_path):
    images = np.arange(5 * 3 * 4 * 6, dtype=np.uint8).reshape(5, 3, 4, 6)
    np.save(tmp_path / "x.npy", images)
    np.save(tmp_path / "y.npy", np.arange(5)[::-1].copy())
    data = NpyArrays(tmp_path / "x.npy", tmp_path / "y.npy", channels_first=True)
    x, y = data[1]
    assert torch.equal(x, torch.from_numpy(images[1].copy())) and y == 3


def test_test_classes_must_have_the_training_classes_names(tmp_path):
    """As many class folders but other names: label 1 would mean dog in training and eel in the test set."""
    from robustlab.data.folder import _folder_sets
    _folder(tmp_path / "train")
    _folder(tmp_path / "test")
    assert _folder_sets(tmp_path, None, False)[2] == ("cat", "dog")
    (tmp_path / "test" / "dog").rename(tmp_path / "test" / "eel")
    with pytest.raises(RobustlabError, match="both splits need the same class folders"):
        _folder_sets(tmp_path, None, False)
