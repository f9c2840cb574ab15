"""The experiment scripts on a few hundred images: the comparison of issue 5 (train, evaluate, resume, table), the
plots, the paired AutoAttack merge and the GPU AutoAttack script run on a CPU."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compare_at_trains_evaluates_and_tabulates(fmnist, one_thread, tmp_path, monkeypatch):
    compare = load_script("compare_at")
    args = ["--out", str(tmp_path), "--epochs", "2", "--train-n", "256", "--val-n", "32", "--n", "32",
            "--methods", "pgd-at", "free-at", "--option", "free-at.replays=2"]
    assert compare.main(args) == 0
    free = json.loads((tmp_path / "free-at" / "config.json").read_text())
    assert free["method"]["replays"] == 2
    # ⌈2 / 2⌉ = 1 epoch of FreeAT: the run counts as finished with the epochs its method asked for
    assert len(compare.read_metrics(tmp_path / "free-at")) == 1 and compare.finished(tmp_path / "free-at")
    assert len(compare.read_metrics(tmp_path / "pgd-at")) == 2
    rows = {r["method"]: r for r in json.loads((tmp_path / "results.json").read_text())}
    assert set(rows) == {"pgd-at", "free-at"} and 0 <= rows["free-at"]["pgd"] <= rows["free-at"]["clean"]
    table = (tmp_path / "results.md").read_text()
    free_row = next(line for line in table.splitlines() if line.startswith("| free-at |"))
    assert "(pgd-at)" in free_row  # its robust accuracy is set against PGD-AT's
    assert (tmp_path / "clean_vs_robust.png").stat().st_size > 0

    # a second call trains nothing and reuses the cached evaluations
    cached = (tmp_path / "pgd-at" / "compare.json").stat().st_mtime_ns
    assert compare.main(args) == 0
    assert (tmp_path / "pgd-at" / "compare.json").stat().st_mtime_ns == cached

    # AutoAttack asked for later is added to the cached measures, without running PGD again
    monkeypatch.setattr(compare, "pgd", None)  # functools.partial(None, ...) would raise
    assert compare.main(args + ["--methods", "pgd-at", "--aa-n", "4"]) == 0
    result = json.loads((tmp_path / "pgd-at" / "compare.json").read_text())["result"]
    assert result["pgd"] == rows["pgd-at"]["pgd"] and 0 <= result["autoattack"] <= 1
    assert "AutoAttack (first 4)" in (tmp_path / "results.md").read_text()
    monkeypatch.undo()

    # step times give the cost column: FreeAT's one epoch of 2 replays against PGD-AT's two epochs of PGD-10
    assert compare.main(args + ["--step-times", "--step-iters", "1"]) == 0
    times = json.loads((tmp_path / "step_times.json").read_text())["times"]
    assert times["free-at"]["trained_epochs"] == 1 and times["free-at"]["s_per_step"] < times["pgd-at"]["s_per_step"]
    assert compare.main(args + ["--table"]) == 0
    free_row = next(line for line in (tmp_path / "results.md").read_text().splitlines() if line.startswith("| free-at |"))
    cost = float(free_row.split("|")[7])
    assert 0 < cost < 1  # 1 epoch × 2 passes against 2 epochs × 11 passes

    # the header gives the image counts the cached figures were taken on, not the options of this call
    assert compare.main(args + ["--table", "--n", "999"]) == 0
    table = (tmp_path / "results.md").read_text()
    assert "PGD-50×3 (first 32)" in table and "AutoAttack (first 4)" in table and "999" not in table.splitlines()[0]
    cache = tmp_path / "free-at" / "compare.json"
    cached = json.loads(cache.read_text())
    cached["key"]["n"] = 64  # as if measured by another worker with --n 64
    cache.write_text(json.dumps(cached))
    assert compare.main(args + ["--table"]) == 0
    table = (tmp_path / "results.md").read_text()
    assert "PGD-50×3 (first N, per row)" in table and " (64) |" in table and " (32) |" in table


def test_compare_at_rejects_malformed_options(tmp_path, capsys):
    compare = load_script("compare_at")
    with pytest.raises(SystemExit) as exit_info:
        compare.main(["--out", str(tmp_path), "--option", "replays=4"])
    assert exit_info.value.code == 2
    assert "expected METHOD.KEY=VALUE" in capsys.readouterr().err


def test_generalist_tradeoff_dominance_reads_the_curve_at_the_same_clean_accuracy():
    tradeoff = load_script("generalist_tradeoff")
    generalist = [{"clean": 0.85, "robust": 0.70}, {"clean": 0.87, "robust": 0.60}]
    trades = [{"name": "inside", "clean": 0.86, "robust": 0.66},    # the curve gives 0.65 there
              {"name": "below", "clean": 0.84, "robust": 0.69},     # left of the curve, beaten by (0.85, 0.70)
              {"name": "beyond", "clean": 0.88, "robust": 0.50}]    # right of it: no point as clean
    result = {d["name"]: d for d in tradeoff.dominance(generalist, trades)}
    assert result["inside"]["robust_gap_at_same_clean"] == pytest.approx(-1.0) and not result["inside"]["dominated"]
    assert result["below"]["dominated"] and result["below"]["robust_gap_at_same_clean"] is None
    assert not result["beyond"]["dominated"]


def test_training_curves_draws_several_runs_and_rejects_a_folder_without_metrics(tmp_path, capsys):
    curves = load_script("training_curves")
    for name, peak in (("a", 2), ("b", 4)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(
            json.dumps({"epoch": e, "val_clean": 0.8, "val_robust": 0.7 - 0.01 * abs(e - peak)}) + "\n" for e in range(6)))
    curves.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "c.png")])
    assert (tmp_path / "c.png").stat().st_size > 1000
    with pytest.raises(SystemExit) as stop:
        curves.main([str(tmp_path), "--out", str(tmp_path / "d.png")])
    assert stop.value.code == 2 and "no metrics.jsonl" in capsys.readouterr().err


def test_rift_curves_overlays_runs_of_one_model_and_refuses_runs_of_two(tmp_path, capsys):
    curves = load_script("rift_curves")
    for name, sha, fall in (("a", "x", 0.01), ("b", "x", 0.03), ("c", "y", 0.02)):
        curve = {f"{a / 10:.2f}": {"clean": 0.86 + 0.01 * a / 10, "robust": 0.78 - fall * a / 10} for a in range(11)}
        (tmp_path / name).mkdir()
        (tmp_path / name / "rift_state.json").write_text(json.dumps(
            {"source": {"sha256": sha}, "chosen": "m-lr0.01",
             "candidates": {"m-lr0.01": {"alpha": 0.1, "curve": curve}}}))
    curves.main([str(tmp_path / "a"), str(tmp_path / "b"), "--labels", "one", "two", "--out", str(tmp_path / "ab.png")])
    assert (tmp_path / "ab.png").stat().st_size > 1000
    with pytest.raises(SystemExit) as stop:
        curves.main([str(tmp_path / "a"), str(tmp_path / "c"), "--out", str(tmp_path / "ac.png")])
    assert stop.value.code == 2 and "different original models" in capsys.readouterr().err
    assert not (tmp_path / "ac.png").exists()


def test_a_bad_value_past_argparse_is_one_line_and_status_2(tmp_path, monkeypatch, capsys, one_thread):
    """`--mix-finals 1.5` passes argparse and is refused by the Generalist method: the script says so in one line, as
    the CLI does. `--epochs 0` is refused by argparse itself."""
    import sys

    from robustlab.errors import run_script
    tradeoff = load_script("generalist_tradeoff")
    argv = ["generalist_tradeoff.py", "--out", str(tmp_path), "--train-n", "64", "--epochs", "1", "--trades-betas", "1",
            "--data-dir", "/usr/share/datasets/fashion-mnist"]
    monkeypatch.setattr(sys, "argv", [*argv, "--mix-finals", "1.5", "--shard", "1/2"])  # shard 1 starts with it
    assert run_script(tradeoff.main) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("generalist_tradeoff.py: error: mix_final must be in [0, 1]"), err[-1]
    assert not any("Traceback" in line for line in err)

    monkeypatch.setattr(sys, "argv", [*argv, "--mix-finals", "0.4", "--lr", "nan"])
    with pytest.raises(SystemExit) as exited:
        run_script(tradeoff.main)
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [  # one line, as the CLI's
        "generalist_tradeoff.py: error: argument --lr: must be a finite number > 0, got nan"]




def test_masking_probe_bad_input_is_one_line_and_status_2(tmp_path, monkeypatch, capsys):
    import sys

    from robustlab.errors import run_script
    probe = load_script("masking_probe")
    missing = tmp_path / "autoattack_state.safetensors"
    monkeypatch.setattr(sys, "argv", ["masking_probe.py", str(tmp_path), str(missing)])
    assert run_script(probe.main) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("masking_probe.py: error: ") and str(missing) in err[0]


def test_aa_paired_merges_slices_image_by_image_and_refuses_unpaired_ones(robust_model, standard_model, test_batch,
                                                                           tmp_path, monkeypatch, capsys, one_thread):
    import sys

    from robustlab.attacks.autoattack import autoattack
    from robustlab.errors import run_script
    paired = load_script("aa_paired")
    x, y = test_batch
    kwargs = dict(eps=0.1, norm="linf", steps=4, queries=20, n_target_classes=2, batch_size=16, progress=False)
    states, robust = {}, {}
    for name, model in (("robust", robust_model), ("standard", standard_model)):
        results = []
        for start, stop in ((0, 20), (20, 48)):
            states[name, start] = tmp_path / f"{name}-{start}.safetensors"
            results.append(autoattack(model, x[start:stop], y[start:stop], state_path=states[name, start], **kwargs))
        robust[name] = torch.cat([r.robust for r in results])

    def compare(before, after):
        monkeypatch.setattr(sys, "argv", ["aa_paired.py", "compare", "--json", "--before", *map(str, before),
                                          "--after", *map(str, after)])
        status = run_script(paired.main)
        return status, capsys.readouterr()

    status, out = compare([states["robust", 0], states["robust", 20]], [states["standard", 0], states["standard", 20]])
    result = json.loads(out.out)
    r, s = robust["robust"], robust["standard"]
    assert status == 0 and result["n"] == 48
    assert result["before"] == pytest.approx(r.float().mean().item()) and result["after"] == pytest.approx(s.float().mean().item())
    assert (result["only_before"], result["only_after"]) == (int((r & ~s).sum()), int((s & ~r).sum()))
    assert result["only_before"] > result["only_after"]  # the robust model withstands what the standard one does not
    # slices listed in a different order on the two sides do not pair the same images
    status, out = compare([states["robust", 0], states["robust", 20]], [states["standard", 20], states["standard", 0]])
    assert status == 2 and "do not cover the same images" in out.err and "Traceback" not in out.err


def test_sign_test_is_exact():
    paired = load_script("aa_paired")
    assert paired.sign_test(0, 0) == 1.0 and paired.sign_test(11, 10) == 1.0
    assert paired.sign_test(10, 0) == pytest.approx(2 / 2 ** 10) and paired.sign_test(0, 10) == paired.sign_test(10, 0)
    assert paired.sign_test(8, 2) == pytest.approx(2 * (1 + 10 + 45) / 1024)


def test_gpu_autoattack_script_runs_and_refuses_bad_arguments(fmnist, tmp_path):
    data, run, work = "/usr/share/datasets/fashion-mnist", tmp_path / "run", tmp_path / "work"
    env = {**os.environ, "DEVICE": "cpu", "WORK": str(work), "SECONDS_LEFT": "300", "DATA": data,
           "OMP_NUM_THREADS": "1", "EXTRA": "--n 16 --aa-steps 2 --aa-queries 5 --sanity-n 16 --threads 1"}
    train = [sys.executable, "-m", "robustlab", "train", "--data-dir", data, "--train-n", "256", "--val-n", "16",
             "--epochs", "1", "--steps", "2", "--threads", "1", "--out", str(run)]
    done = subprocess.run(train, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr

    def script(*args, **more_env):
        return subprocess.run(["bash", str(ROOT / "experiments" / "gpu_autoattack.sh"), *args], capture_output=True,
                              text=True, env={**env, **more_env}, cwd=ROOT, timeout=600)

    for args, more_env, message in (([], {}, "usage"), (["x=no/such.safetensors"], {}, "no checkpoint file no/such"),
                                    ([f"x={run / 'best.safetensors'}"], {"DATA": "/no/such"}, "no dataset folder")):
        done = script(*args, **more_env)
        assert done.returncode == 2 and message in done.stderr and len(done.stderr.splitlines()) == 1
    done = script(f"tiny={run / 'best.safetensors'}")
    assert done.returncode == 0, done.stderr
    times = (work / "logs" / "times.log").read_text()
    assert "tiny rc=0" in times and "agreement test rc=0" in times  # the CUDA test skips on a CPU

    def stages():
        return json.loads((work / "tiny" / "report.json").read_text())["autoattack"]["stage_accuracy"]

    first = stages()
    assert list(first) == ["clean", "apgd-ce", "apgd-t", "fab-t", "square"] and first["square"] <= first["clean"]
    assert script(f"tiny={run / 'best.safetensors'}").returncode == 0
    assert stages() == first  # run again: the same figures, from the AutoAttack state the first run left


def reference_mnist_net():
    """The layout of `mnist_net` in locuslab/fast_adversarial (an unnamed nn.Sequential), for the import test."""
    from torch import nn
    return nn.Sequential(nn.Conv2d(1, 16, 4, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 4, stride=2, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(32 * 7 * 7, 100), nn.ReLU(), nn.Linear(100, 10))


def test_fast_at_mnist_import_gives_the_reference_network_on_raw_pixels(tmp_path, monkeypatch, capsys, one_thread):
    import sys

    from test_data import write_idx_dataset

    from robustlab import load_model
    from robustlab.errors import run_script
    script = load_script("fast_at_mnist")
    write_idx_dataset(tmp_path / "mnist")
    torch.manual_seed(0)
    reference = reference_mnist_net().eval()
    torch.save(reference.state_dict(), tmp_path / "fgsm.pth")
    out = tmp_path / "imported"
    script.import_state_dict(tmp_path / "fgsm.pth", data_dir=tmp_path / "mnist", out=out)

    model = load_model(out)
    x = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(model(x), reference(x), atol=1e-6)
    meta = model.checkpoint_meta
    assert meta["dataset"]["name"] == "mnist" and meta["dataset"]["mean"] == [0.0] and meta["dataset"]["std"] == [1.0]
    assert meta["dataset"]["data_dir"] == str((tmp_path / "mnist").resolve()) and meta["model"]["name"] == "cnn-strided"

    # another layout, and a pickle that holds more than tensors, are one-line errors
    torch.save(torch.nn.Linear(784, 10).state_dict(), tmp_path / "linear.pth")
    torch.save({"weights": reference.state_dict(), "note": object()}, tmp_path / "object.pth")
    for bad, words in (("linear.pth", "does not hold the cnn-strided layout"), ("object.pth", "cannot read")):
        monkeypatch.setattr(sys, "argv", ["fast_at_mnist.py", "import", str(tmp_path / bad), "--out", str(out),
                                          "--data-dir", str(tmp_path / "mnist")])
        assert run_script(script.main) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err


def test_trades_bf16_compares_the_three_ways_of_running_kl_pgd(fmnist, tmp_path, one_thread):
    from robustlab.training import TrainConfig, build_trainer

    run = tmp_path / "trades"
    config = TrainConfig(epochs=1, train_n=256, val_n=32, threads=1)
    build_trainer(dataset="fashion-mnist", model="cnn-small", method="trades", out=run, config=config,
                  method_kwargs={"steps": 2}, show_progress=False).fit()
    script = load_script("trades_bf16")
    script.main(["--checkpoint", str(run), "--out", str(tmp_path / "out"), "--n", "64", "--seeds", "0"])
    rows = {r["attack"]: r for r in json.loads((tmp_path / "out" / "results.json").read_text())["rows"]}
    assert set(rows) == {"KL-PGD-1", "KL-PGD-2", "KL-PGD-10", "CE-PGD-10"}
    one = rows["KL-PGD-1"]
    assert one["robustlab"] == one["fp32"]  # robustlab's first step is the fp32 one
    assert one["bf16"]["kl"] < 0.9 * one["fp32"]["kl"]  # a bf16 first step climbs less


def test_masking_probe_mnist_tabulates_the_four_validation_attacks(tmp_path, monkeypatch, capsys, one_thread):
    from robustlab.errors import run_script
    from robustlab.training import TrainConfig, build_trainer
    build_trainer(dataset="fashion-mnist", model="cnn-small", method="standard", out=tmp_path, show_progress=False,
                  data_dir="/usr/share/datasets/fashion-mnist", config=TrainConfig(epochs=1, train_n=64, val_n=10)).fit()
    probe = load_script("masking_probe_mnist")
    monkeypatch.setattr(sys, "argv", ["masking_probe_mnist.py", str(tmp_path), "--n", "20"])
    assert run_script(probe.main) == 2  # a clean-trained run records no ε
    assert "records no training ε; give --eps" in capsys.readouterr().err
    assert run_script(lambda: probe.main([str(tmp_path), "--n", "20", "--eps", "0.1"])) == 0
    row = capsys.readouterr().out.strip().splitlines()[-1].split(" | ")
    clean, pgd, _, apgd, square = (float(cell.rstrip("%")) for cell in row[1:6])
    assert 0 <= apgd <= clean and 0 <= square <= clean and 0 <= pgd <= clean


def test_ood_per_severity_prints_every_corruption_and_the_mean(standard_model, tmp_path, capsys, one_thread):
    from robustlab import checkpoint
    from robustlab.errors import run_script
    from robustlab.training.run import dataset_meta
    from robustlab.data import load_dataset
    data = load_dataset("fashion-mnist", data_dir="/usr/share/datasets/fashion-mnist", seed=0)
    meta = {"kind": "model", "model": {"name": "cnn-small", "kwargs": {}}, "dataset": dataset_meta(data)}
    checkpoint.save(tmp_path / "best.safetensors", checkpoint.prefixed("model.", standard_model.state_dict()), meta)
    script = load_script("ood_per_severity")
    assert run_script(lambda: script.main([str(tmp_path), "--n", "20"])) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    from robustlab.evaluate.corruptions import default_corruptions
    assert "OOD mean" in lines[0] and "(20 images" in lines[0] and len(lines) == 1 + len(default_corruptions(1))


FAKE_REFERENCE = '''
import os
import torch
from robustlab.attacks import fgsm


class AutoAttack:
    """Stands in for fra31/auto-attack's class: FGSM as its APGD-CE, no other stage breaks anything."""
    def __init__(self, model, norm, eps, version, seed, device, verbose):
        assert (norm, version, seed) == ("Linf", "standard", 0)
        self.model, self.eps, self.attacks_to_run = model, eps, []
        self.calls = []

    def run_standard_evaluation(self, x, y, bs):
        (stage,) = self.attacks_to_run
        with open(os.environ["FAKE_LOG"], "a") as log:
            log.write(f"{stage} {len(x)}\\n")
        if os.environ.get("FAKE_OUT_OF_BALL"):
            return (x + 2 * self.eps).clamp(0, 1)
        return fgsm(self.model, x, y, eps=self.eps) if stage == "apgd-ce" else x.clone()
'''


def test_aa_reference_compares_stage_by_stage_resumes_and_checks_both_sides(fmnist, tmp_path):
    from robustlab import load_model
    from robustlab.attacks import fgsm
    from robustlab.training import TrainConfig, build_trainer

    torch.manual_seed(0)
    run = tmp_path / "run"
    build_trainer(dataset="fashion-mnist", model="cnn-small", method="standard", out=run, data_dir="/usr/share/datasets/fashion-mnist",
                  show_progress=False, config=TrainConfig(epochs=1, train_n=512, val_n=10, threads=1)).fit()
    reference = tmp_path / "reference"
    (reference / "autoattack").mkdir(parents=True)
    (reference / "autoattack" / "__init__.py").write_text("from .autoattack import AutoAttack\n")
    (reference / "autoattack" / "autoattack.py").write_text(FAKE_REFERENCE)
    out, log = tmp_path / "out", tmp_path / "calls.log"

    def script(*args, out=out, **more_env):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "FAKE_LOG": str(log), **more_env}
        return subprocess.run([sys.executable, str(ROOT / "experiments" / "aa_reference.py"), str(run),
                               "--reference", str(reference), "--n", "16", "--out", str(out), *args],
                              capture_output=True, text=True, env=env, timeout=600)

    done = script("--only", "reference")
    assert done.returncode == 0, done.stderr
    calls = log.read_text().split()
    assert calls[0::2] == ["apgd-ce", "apgd-t", "fab-t", "square"]  # stage by stage, on fewer images each time
    model = load_model(run).eval()
    test = fmnist.test.subset(16)
    x, y = test.images.float().div(255), test.labels
    with torch.no_grad():
        clean = model(x).argmax(1) == y
        survives = clean & (model(fgsm(model, x, y, eps=0.1)).argmax(1) == y)
    assert [int(n) for n in calls[1::2]] == [int(clean.sum())] + [int(survives.sum())] * 3

    done = script()  # the reference's stages are not run again; robustlab's AutoAttack runs, then the comparison
    assert done.returncode == 0, done.stderr
    assert len(log.read_text().split()) == len(calls)
    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison["reference"]["apgd-ce"] == pytest.approx(survives.float().mean().item())
    assert comparison["reference"]["clean"] == comparison["robustlab"]["clean"] == pytest.approx(clean.float().mean().item())
    alone = comparison["each_stage_alone"]["apgd-ce"]
    assert alone["images"] == int(clean.sum()) and alone["reference"] == int((clean & ~survives).sum())
    robust = comparison["robust_both"] + comparison["robust_only_reference"]
    assert robust == pytest.approx(16 * comparison["reference"]["square"])
    assert "robust on both sides" in done.stdout

    # another model's verdicts in --out are refused, not reused (they were checked on n, ε and the norm only)
    torch.manual_seed(1)
    other = tmp_path / "other"
    build_trainer(dataset="fashion-mnist", model="cnn-small", method="standard", out=other,
                  data_dir="/usr/share/datasets/fashion-mnist", show_progress=False,
                  config=TrainConfig(epochs=1, train_n=64, val_n=10, threads=1)).fit()
    mixed = subprocess.run([sys.executable, str(ROOT / "experiments" / "aa_reference.py"), str(other), "--reference",
                            str(reference), "--n", "16", "--out", str(out), "--only", "reference"],
                           capture_output=True, text=True, env={**os.environ, "FAKE_LOG": str(log)}, timeout=600)
    assert mixed.returncode != 0 and "another model" in mixed.stderr

    # a reference whose points leave the ball is refused, in one line
    bad = script("--only", "reference", out=tmp_path / "out2", FAKE_OUT_OF_BALL="1")
    assert bad.returncode != 0 and "outside the linf ball" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_the_recorded_commit_is_robustlabs_own_and_says_when_it_has_changes(tmp_path):
    """An installed copy inside another project's repository recorded that project's commit, and a checkout with
    uncommitted changes recorded the bare commit."""
    import shutil
    src = Path(__file__).resolve().parents[1] / "src" / "robustlab"

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    def recorded():
        code = "from robustlab.provenance import commit; print(commit())"
        return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(tmp_path / "site")}).stdout.strip()
    git("init", "-q")
    git("commit", "-q", "--allow-empty", "-m", "another project")
    shutil.copytree(src, tmp_path / "site" / "robustlab", ignore=shutil.ignore_patterns("__pycache__"))
    assert recorded() == "unknown"  # untracked: not this repository's source
    git("add", "site")
    git("commit", "-q", "-m", "robustlab")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tmp_path, capture_output=True,
                          text=True).stdout.strip()
    assert recorded() == head
    (tmp_path / "site" / "robustlab" / "protocol.py").write_text("# changed\n", encoding="utf-8")
    assert recorded() == f"{head}-dirty"


def test_the_recorded_machine_names_its_gpus(monkeypatch):
    """The protocol asks for the GPU, if any; result tables named the CPU alone."""
    from robustlab import provenance
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "NVIDIA H200")
    assert ", 2× NVIDIA H200, torch " in provenance.machine()


def test_the_recorded_machine_names_the_cpu_model_where_linux_says_it():
    """"AMD EPYC 7B13, 2 cores, ...": the model name from /proc/cpuinfo, not platform's architecture ("x86_64")."""
    from robustlab import provenance
    cpuinfo = Path("/proc/cpuinfo")
    names = [l.split(":", 1)[1].strip() for l in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
             if l.startswith("model name")]
    if not names:
        pytest.skip("no model name in /proc/cpuinfo")
    assert provenance.machine().startswith(f"{names[0]}, {os.cpu_count()} cores")


@pytest.mark.parametrize("option,words", [("pgd-at.steps=0", "steps must be an integer >= 1"),
                                          ("free-at.replays=abc", "--option for free-at"),
                                          ("trades.beta=abc", "--option for trades")])
def test_compare_at_option_values_are_checked_before_training(option, words, tmp_path, capsys, monkeypatch):
    """A value of the wrong type was a traceback from deep inside build_trainer, after other methods had trained."""
    compare = load_script("compare_at")
    monkeypatch.setattr(sys, "argv", ["compare_at.py"])
    method = option.split(".")[0]
    code = compare.run_script(lambda: compare.main(["--out", str(tmp_path / "c"), "--methods", method, "--option", option,
                                                    "--train-n", "8", "--val-n", "8", "--n", "8", "--epochs", "1"]))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and words in err, err
    assert not (tmp_path / "c").exists()


def test_compare_at_out_on_a_file_is_one_line(tmp_path, capsys, monkeypatch):
    compare = load_script("compare_at")
    (tmp_path / "f").write_text("x")
    monkeypatch.setattr(sys, "argv", ["compare_at.py"])
    code = compare.run_script(lambda: compare.main(["--out", str(tmp_path / "f"), "--methods", "pgd-at"]))
    assert code == 2 and "cannot make a folder there" in capsys.readouterr().err
