"""Corruption suite and OOD accuracy: determinism, shapes, growing severity, cache, CIFAR-C files."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from robustlab.data import ImageSet
from robustlab.errors import RobustlabError
from robustlab.evaluate import accuracy
from robustlab.evaluate import corruptions as C
from robustlab.evaluate.corruptions import (CORRUPTIONS, SEVERITIES, corrupt, corruption_suite, default_corruptions,
                                            ood_accuracy, plot_corruptions)


def synthetic(channels: int, size: int, n: int = 16, seed: int = 0) -> ImageSet:
    """Smooth backgrounds with a bright ellipse: structure for blurs and warps to act on, no data files needed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    images = []
    for _ in range(n):
        a, b = rng.uniform(0, 0.4, (2, channels, 1, 1))
        background = a + b * yy + (0.4 - b) * xx
        cy, cx, ry, rx = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.3), rng.uniform(0.1, 0.25)
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        images.append(np.where(inside, rng.uniform(0.6, 1.0, (channels, 1, 1)), background))
    images = np.rint(np.clip(np.stack(images), 0, 1) * 255).astype(np.uint8)
    return ImageSet(torch.from_numpy(images), torch.arange(n) % 10)


pytestmark = pytest.mark.usefixtures("one_thread")


KINDS = {"gray": (1, 28), "colour": (3, 32)}


def test_at_least_15_types_with_5_severities_each():
    assert SEVERITIES == (1, 2, 3, 4, 5)
    for channels in (1, 3):
        names = default_corruptions(channels)
        assert len(names) >= 15 and set(names) <= set(CORRUPTIONS)
    assert "saturate" in default_corruptions(3) and "saturate" not in default_corruptions(1)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corruption_changes_images_more_with_severity(name, kind):
    channels, size = KINDS[kind]
    if name not in default_corruptions(channels) and name in C.COLOUR_ONLY:
        pytest.skip("colour only")
    clean = synthetic(channels, size)
    change = []
    for severity in (1, 5):
        out = corrupt(clean, name, severity)
        assert out.images.dtype == torch.uint8 and out.images.shape == clean.images.shape
        assert torch.equal(out.labels, clean.labels)
        change.append((out.images.float() - clean.images.float()).abs().mean().item())
    assert change[0] > 0, f"{name} severity 1 left the images unchanged"
    assert change[1] > change[0], f"{name}: severity 5 changes less than severity 1 ({change})"


# Severity pairs that give byte-identical images from the same random draws, both from CIFAR-10-C's own tables
# (make_cifar_c.py, which robustlab's follow): glass_blur's σ of 0.05 and 0.25 px both blur nothing at uint8, so its
# severities 1 and 2 differ only in their random shuffles; motion_blur's severities 3 and 4, (radius 6, σ 2) and
# (8, 2), are one blur, since σ sets the streak (ImageMagick's taps beyond the 13th weigh under 1e-9): on 28-pixel
# images byte for byte, on 32-pixel ones within one grey level. Kept as the benchmark defines them; listed so that a
# new duplicate (a table entry copied or shifted) fails the test.
SAME_STRENGTH = {"gray": {("glass_blur", 1, 2), ("motion_blur", 3, 4)}, "colour": {("glass_blur", 1, 2)}}
# Where the mean pixel change does not grow with every severity: those two, and, as in CIFAR-10-C's tables, frost
# dims the image as the frost thickens, snow's flakes are sparser at severity 3, colour spatter turns from water to
# mud, saturate first desaturates and then oversaturates.
NOT_MONOTONE = {"gray": {"glass_blur", "motion_blur", "frost", "snow"},
                "colour": {"glass_blur", "motion_blur", "frost", "spatter", "saturate"}}


@pytest.mark.parametrize("kind", KINDS)
def test_every_severity_has_its_own_strength(kind, monkeypatch):
    """With the random draws made the same for every severity, only the severity's parameters tell the sets apart:
    two severities with one parameter (a table entry copied or shifted) give the same images."""
    monkeypatch.setattr(C, "_rng", lambda seed, name, severity, chunk: np.random.default_rng([seed, chunk]))
    channels, size = KINDS[kind]
    clean = synthetic(channels, size)
    same, flat = set(), []
    for name in default_corruptions(channels):
        outs = [corrupt(clean, name, s).images for s in SEVERITIES]
        same |= {(name, a, b) for a in SEVERITIES for b in SEVERITIES
                 if a < b and torch.equal(outs[a - 1], outs[b - 1])}
        change = [(out.float() - clean.images.float()).abs().mean().item() for out in outs]
        if name not in NOT_MONOTONE[kind] and not all(b > 1.005 * a for a, b in zip(change, change[1:])):
            flat.append((name, [round(c, 2) for c in change]))
    assert same == SAME_STRENGTH[kind]
    assert not flat, flat


@pytest.mark.parametrize("kind", KINDS)
def test_no_two_corruptions_give_the_same_images(kind):
    """defocus_blur's severity 1 once had a disk inside the centre pixel: gaussian_blur's severity 1, byte for byte."""
    channels, size = KINDS[kind]
    clean = synthetic(channels, size)
    for severity in SEVERITIES:
        seen = {}
        for name in default_corruptions(channels):
            key = corrupt(clean, name, severity).images.numpy().tobytes()
            assert key not in seen, f"severity {severity}: {name} gives {seen.get(key)}'s images"
            seen[key] = name


@pytest.mark.parametrize("size", [28, 64])
def test_grayscale_spatter_covers_more_with_every_severity_at_any_size(size):
    """CIFAR-10-C's table, on dark grayscale images, hurt most at severity 3 and left 4 and 5 at clean accuracy; and
    the fixed threshold under a smoothing scaled to the image covered 0.1% of a 64-pixel image at severity 1."""
    black = ImageSet(torch.zeros(64, 1, size, size, dtype=torch.uint8), torch.zeros(64, dtype=torch.long))
    covered = [(corrupt(black, "spatter", s).images > 12).float().mean().item() for s in SEVERITIES]
    assert covered == sorted(covered) and len(set(covered)) == 5, covered
    assert 0.03 < covered[0] < 0.15 and covered[-1] > 0.35, covered


def test_motion_streaks_run_as_far_as_imagemagicks():
    """MotionBlurImage spans 2·⌈radius⌉ + 1 taps; σ, not the radius, sets the streak's length (snow's σ 12 at radius
    14 reaches well past 14 pixels). The line once stopped at the radius."""
    kernel = C._motion_kernels(1, 4, 100.0, np.array([0.0]))[0]  # horizontal, centre at (8, 8)
    assert kernel.shape == (17, 17) and kernel[8, 16] > 0 and kernel[8, 9:].sum() > 0.8


def test_stripe_changes_every_image_of_a_non_square_set():
    """The band's start was drawn over the longer side for both axes, so on the shorter one it often fell outside."""
    grey = ImageSet(torch.full((200, 1, 56, 28), 50, dtype=torch.uint8), torch.zeros(200, dtype=torch.long))
    for severity in SEVERITIES:
        out = corrupt(grey, "stripe", severity).images
        assert (out != grey.images).flatten(1).any(1).all()


def test_contrast_pulls_each_channel_toward_its_own_mean():
    """CIFAR-10-C's contrast averages over H×W per channel: a pure red image stays pure red."""
    red = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    red[:, 0] = 255
    out = corrupt(ImageSet(red, torch.zeros(2, dtype=torch.long)), "contrast", 5).images
    assert torch.equal(out, red)


@pytest.mark.parametrize("name", ["gaussian_noise", "motion_blur", "snow", "rotate", "zigzag", "elastic_transform"])
def test_same_seed_same_images_other_seed_other_images(name):
    clean = synthetic(3, 32)
    first, again = corrupt(clean, name, 3, seed=0), corrupt(clean, name, 3, seed=0)
    assert torch.equal(first.images, again.images)
    assert not torch.equal(first.images, corrupt(clean, name, 3, seed=1).images)
    assert not torch.equal(first.images, corrupt(clean, name, 4, seed=0).images)


def test_chunks_get_their_own_randomness(monkeypatch):
    monkeypatch.setattr(C, "CHUNK", 8)
    out = corrupt(synthetic(1, 28, n=16), "gaussian_noise", 5).images.float()
    clean = synthetic(1, 28, n=16).images.float()
    assert not torch.equal(out[:8] - clean[:8], out[8:] - clean[8:])


def test_batched_jpeg_equals_one_image_at_a_time():
    for channels, size in KINDS.values():
        clean = synthetic(channels, size, n=5)
        out = corrupt(clean, "jpeg_compression", 5).images.numpy()
        for i, img in enumerate(clean.images.numpy().transpose(0, 2, 3, 1)):
            pil = Image.fromarray(img[..., 0] if channels == 1 else img)
            buffer = io.BytesIO()
            pil.save(buffer, format="JPEG", quality=40)
            alone = np.asarray(Image.open(buffer).convert(pil.mode)).reshape(size, size, channels)
            assert np.array_equal(out[i], alone.transpose(2, 0, 1))


def test_bad_requests_raise_one_line_errors():
    gray = synthetic(1, 28, n=2)
    with pytest.raises(RobustlabError, match="colour"):
        corrupt(gray, "saturate", 1)
    with pytest.raises(RobustlabError, match="unknown corruption"):
        corrupt(gray, "rain", 1)
    with pytest.raises(RobustlabError, match="severities"):
        corrupt(gray, "fog", 6)
    # once tracebacks from numpy or the loop: 3.0 passed as level 3 and failed inside the generator's seed
    for call, words in ((lambda: corrupt(gray, "fog", 3.0), "severities"),
                        (lambda: corrupt(gray, "shot_noise", 1, seed=-1), "seed"),
                        (lambda: corrupt(gray, "shot_noise", 1, seed=None), "seed must be an integer >= 0"),
                        (lambda: list(corruption_suite(gray, ["fog"], 3)), "severities is a list"),
                        (lambda: list(corruption_suite(gray, [], (1,))), "no corruption named")):
        with pytest.raises(RobustlabError, match=words):
            call()


def test_numpy_integers_are_levels_and_seeds():
    """Refused when the checks were tightened to plain ints: np.int64(3) is as good a level as 3."""
    gray = synthetic(1, 28, n=2)
    assert torch.equal(corrupt(gray, "shot_noise", np.int64(3), seed=np.int64(1)).images,
                       corrupt(gray, "shot_noise", 3, seed=1).images)
    assert [s for _, s, _ in corruption_suite(gray, ["fog"], np.arange(1, 3))] == [1, 2]


def test_colour_spatter_mud_covers_what_cifar_10_cs_does():
    """CIFAR-10-C keeps mud where the smoothed blobs exceed 0.8; at 0.5 it covered four times as much (30% at
    severity 5 on a grey image, against the reference's 7%)."""
    grey = ImageSet(torch.full((50, 3, 32, 32), 128, dtype=torch.uint8), torch.zeros(50, dtype=torch.long))
    covered = {s: ((corrupt(grey, "spatter", s).images.float() - 128).abs().amax(1) > 10).float().mean().item()
               for s in (4, 5)}
    assert 0.02 < covered[4] < covered[5] < 0.12, covered


def test_cache_round_trip(tmp_path, monkeypatch):
    clean = synthetic(1, 28, n=6)
    names, severities = ["shot_noise", "frost"], (1, 5)
    first = list(corruption_suite(clean, names, severities, seed=3, cache_dir=tmp_path))
    files = sorted(tmp_path.rglob("*.npy"))
    assert len(files) == 4
    assert np.load(files[0], allow_pickle=False).dtype == np.uint8

    def fail(*args, **kwargs):
        raise AssertionError("generated again instead of reading the cache")

    monkeypatch.setattr(C, "corrupt", fail)
    second = list(corruption_suite(clean, names, severities, seed=3, cache_dir=tmp_path))
    for (n1, s1, a), (n2, s2, b) in zip(first, second):
        assert (n1, s1) == (n2, s2) and torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    monkeypatch.undo()

    for damaged in (b"not an npy file", b""):  # a damaged or empty file (once an EOFError) is generated again
        files[0].write_bytes(damaged)
        third = list(corruption_suite(clean, names, severities, seed=3, cache_dir=tmp_path))
        assert all(torch.equal(a.images, c.images) for (_, _, a), (_, _, c) in zip(first, third))
    other = synthetic(1, 28, n=6, seed=1)  # other clean images: other cache folder
    list(corruption_suite(other, ["shot_noise"], (1,), cache_dir=tmp_path))
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2


def test_a_failed_cache_write_is_one_line_and_leaves_no_partial_file(tmp_path, monkeypatch):
    """The cache wrote its own temporary file and kept it when np.save failed (a full disk): as large as the set."""
    clean = synthetic(1, 28, n=6)

    def full_disk(f, array, allow_pickle):
        f.write(b"\x93NUMPY half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(C.np, "save", full_disk)
    with pytest.raises(RobustlabError, match=r"cannot write .*No space left on device"):
        list(corruption_suite(clean, ["shot_noise"], (1,), cache_dir=tmp_path))
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_the_temporaries_of_a_killed_writer_are_removed_and_a_live_writer_s_kept(tmp_path):
    """An evaluation killed while writing a cached set left its temporary (as large as the set) for good; the cache
    is shared, so one is removed only when its process is gone and it is over an hour old."""
    import os
    import subprocess
    import sys
    import time
    clean = synthetic(1, 28, n=6)
    list(corruption_suite(clean, ["shot_noise"], (1,), cache_dir=tmp_path))
    folder = next(p for p in tmp_path.iterdir() if p.is_dir())
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a process that has ended
    hour_ago = time.time() - 3700
    stale = folder / f".shot_noise-s2-seed0.npy.tmp{gone}"
    live = folder / f".shot_noise-s3-seed0.npy.tmp{os.getppid()}"  # a writer that still runs (here: our parent)
    fresh = folder / f".shot_noise-s4-seed0.npy.tmp{gone}"  # perhaps a writer on another machine: too young
    for path in (stale, live, fresh):
        path.write_bytes(b"part of a set")
    for path in (stale, live):
        os.utime(path, (hour_ago, hour_ago))
    list(corruption_suite(clean, ["shot_noise"], (1,), cache_dir=tmp_path))
    assert not stale.exists() and live.exists() and fresh.exists()


def test_ood_accuracy_below_clean_and_falls_with_severity(standard_model, fmnist, tmp_path):
    test = fmnist.test.subset(200)
    names = ["gaussian_noise", "motion_blur", "fog", "contrast", "rotate"]
    result = ood_accuracy(standard_model, test, names=names, progress=False)
    assert set(result.accuracy) == set(names) and all(set(v) == set(SEVERITIES) for v in result.accuracy.values())
    assert result.clean == pytest.approx(accuracy(standard_model, test))
    assert result.mean < result.clean - 0.05
    assert result.per_severity_mean[5] < result.per_severity_mean[1]
    assert result.mean == pytest.approx(np.mean(list(result.per_corruption().values())))
    summary = result.to_dict()
    assert summary["ood_accuracy"] == result.mean and set(summary["per_corruption"]) == set(names)
    plot_corruptions(result, tmp_path / "ood.png")
    assert (tmp_path / "ood.png").stat().st_size > 10_000


def test_ood_accuracy_uses_its_seed_and_the_cache_keeps_seeds_apart(tmp_path):
    """Each seed's sets are generated from it, and a cache shared by two seeds gives each its own sets."""
    clean = synthetic(1, 28, n=64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10)).eval()
    names, severities = ["gaussian_noise", "impulse_noise", "zigzag"], (3, 5)
    results = {seed: ood_accuracy(model, clean, names=names, severities=severities, seed=seed, progress=False,
                                  cache_dir=tmp_path).accuracy for seed in (0, 1)}
    for seed in (0, 1):
        direct = {name: {s: accuracy(model, corrupt(clean, name, s, seed=seed)) for s in severities} for name in names}
        assert results[seed] == direct, seed
    assert results[0] != results[1]
    for seed in (0, 1):
        _, _, cached = next(corruption_suite(clean, ["zigzag"], (5,), seed=seed, cache_dir=tmp_path))
        assert torch.equal(cached.images, corrupt(clean, "zigzag", 5, seed=seed).images)


def _write_cifar_c(folder, clean: ImageSet, names):
    """Published layout: (5·N)×H×W×3 uint8 per corruption, severity s in rows (s-1)·N : s·N, and labels.npy."""
    folder.mkdir()
    np.save(folder / "labels.npy", np.tile(clean.labels.numpy(), 5))
    stacked = {}
    for name in names:
        sets = [corrupt(clean, name, s).images.numpy().transpose(0, 2, 3, 1) for s in SEVERITIES]
        stacked[name] = np.concatenate(sets)
        np.save(folder / f"{name}.npy", stacked[name])
    return stacked


def test_published_cifar_c_files_are_used_as_they_are(tmp_path):
    clean = synthetic(3, 32, n=12)
    stacked = _write_cifar_c(tmp_path / "CIFAR-10-C", clean, ["fog", "pixelate"])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)).eval()
    result = ood_accuracy(model, clean.subset(10), cifar_c_dir=tmp_path, progress=False)
    assert set(result.accuracy) == {"fog", "pixelate"} and result.n == 10
    assert "CIFAR-C" in result.source
    images = torch.from_numpy(stacked["fog"][2 * 12: 2 * 12 + 10].transpose(0, 3, 1, 2).copy())
    assert result.accuracy["fog"][3] == pytest.approx(accuracy(model, ImageSet(images, clean.labels[:10])))

    shuffled = ImageSet(clean.images, clean.labels.roll(1))
    with pytest.raises(RobustlabError, match="labels"):
        ood_accuracy(model, shuffled, cifar_c_dir=tmp_path, progress=False)
    with pytest.raises(RobustlabError, match="not found"):
        ood_accuracy(model, clean, names=["snow"], cifar_c_dir=tmp_path, progress=False)
    for names in ("fog", []):  # once read as the files f, o and g, and as a NaN mean
        with pytest.raises(RobustlabError, match="non-empty list"):
            ood_accuracy(model, clean, names=names, cifar_c_dir=tmp_path, progress=False)


def test_a_published_folder_that_does_not_fit_the_test_set_is_refused_from_headers_and_labels(tmp_path):
    """check_cifar_c runs before an evaluation's attacks, so it must catch what _published_suite would meet hours
    later: another image shape, fewer images per severity, or labels that differ at any one severity."""
    from robustlab.data import check_cifar_c
    clean = synthetic(3, 32, n=12)
    folder = tmp_path / "CIFAR-10-C"
    _write_cifar_c(folder, clean, ["fog", "pixelate"])
    assert check_cifar_c(tmp_path, (3, 32, 32), clean.labels) == ["fog", "pixelate"]
    assert check_cifar_c(tmp_path, (3, 32, 32), clean.labels[:5], ["fog"]) == ["fog"]  # the first images of the set
    assert check_cifar_c(tmp_path, (3, 32, 32)) == ["fog", "pixelate"]  # files only: before the test set is read
    with pytest.raises(RobustlabError, match=r"holds 12 images of shape \(3, 32, 32\) per severity; the test set "
                                             r"has 13 images of shape \(3, 32, 32\)"):
        check_cifar_c(tmp_path, (3, 32, 32), torch.cat([clean.labels, clean.labels[:1]]))
    with pytest.raises(RobustlabError, match=r"shape \(3, 32, 32\) per severity; the dataset's are of shape "
                                             r"\(1, 28, 28\): is it the corruption set of another dataset"):
        check_cifar_c(tmp_path, (1, 28, 28))
    labels = np.tile(clean.labels.numpy(), 5)
    labels[3 * 12 + 4] = (labels[3 * 12 + 4] + 1) % 10  # severity 4 alone
    np.save(folder / "labels.npy", labels)
    check_cifar_c(tmp_path, (3, 32, 32), clean.labels[:4])  # the first four still match everywhere
    with pytest.raises(RobustlabError, match="labels in .* do not match the test set's"):
        check_cifar_c(tmp_path, (3, 32, 32), clean.labels[:5])


def test_published_files_give_each_severity_its_own_rows(tmp_path):
    """Severity s is rows (s-1)·N : s·N of each file, for every s (a reversed order keeps severity 3 in place)."""
    from robustlab.data import load_cifar_c
    clean = synthetic(3, 32, n=6)
    stacked = _write_cifar_c(tmp_path / "CIFAR-10-C", clean, ["contrast"])
    sets = load_cifar_c(tmp_path, ["contrast"])["contrast"]
    assert sorted(sets) == list(SEVERITIES)
    for s in SEVERITIES:
        rows = torch.from_numpy(stacked["contrast"][(s - 1) * 6: s * 6].transpose(0, 3, 1, 2).copy())
        assert torch.equal(sets[s].images, rows) and torch.equal(sets[s].labels, clean.labels)
        assert torch.equal(sets[s].images, corrupt(clean, "contrast", s).images)


def test_cifar_100_c_subfolder_is_found_and_negative_labels_refused(tmp_path):
    from robustlab.data import load_cifar_c
    clean = synthetic(3, 32, n=12)
    _write_cifar_c(tmp_path / "CIFAR-100-C", clean, ["fog"])
    assert set(load_cifar_c(tmp_path)) == {"fog"}  # once found for CIFAR-10-C's folder name only
    np.save(tmp_path / "CIFAR-100-C" / "labels.npy", np.full(60, -1))
    with pytest.raises(RobustlabError, match="labels.npy holds int64 labels down to -1"):
        load_cifar_c(tmp_path)
