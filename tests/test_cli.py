"""The command line: one-line errors with status 2, and the train → eval → report path."""
import json
import os
import subprocess
import sys

import pytest
import torch

FMNIST = "/usr/share/datasets/fashion-mnist"


def robustlab(*args):
    return subprocess.run([sys.executable, "-m", "robustlab", *args], capture_output=True, text=True)


@pytest.mark.parametrize("args,words", [
    (["train", "--dataset", "imagenet-1m", "--out", "x"], ["dataset", "fashion-mnist"]),
    (["train", "--model", "vgg99", "--out", "x"], ["model", "cnn-small"]),
    (["train", "--method", "magic", "--out", "x"], ["method", "pgd-at"]),
    (["train", "--eps", "-0.1", "--out", "x"], ["eps"]),
    (["train", "--steps", "0", "--out", "x"], ["steps"]),
    (["train", "--batch-size", "0", "--out", "x"], ["batch-size"]),
    (["train", "--norm", "l7", "--out", "x"], ["norm", "linf"]),
    (["train", "--lr", "nan", "--out", "x"], ["--lr", "finite", "nan"]),  # nan <= 0 is False: once let through
    (["train", "--eps", "inf", "--out", "x"], ["--eps", "finite", "inf"]),
    (["train", "--momentum", "-0.9", "--out", "x"], ["--momentum", "from 0 to below 1"]),
    # argparse said "invalid parse value", naming the type function
    (["train", "--epochs", "ten", "--out", "x"], ["--epochs: must be a whole number > 0, got ten"]),
    (["train", "--method", "pgd-at", "--init-mag", "0.5", "--out", "x"], ["--method pgd-at takes no --init-mag"]),
    (["train", "--task", "text", "--norm", "linf", "--out", "x"], ["--norm linf needs --eps", "text run"]),  # as eval
    # a mistyped text data folder was made, and a corpus built in it
    (["train", "--task", "text", "--data-dir", "/nonexistent-robustlab", "--out", "x"],
     ["/nonexistent-robustlab does not exist"]),
    (["train", "--method", "pgd-at", "--clip-start", "--out", "x"], ["pgd-at", "--clip-start", "--attack-train-mode"]),
    (["train", "--method", "trades", "--attack-train-mode", "--out", "x"], ["trades", "--attack-train-mode", "--beta"]),
    (["train", "--method", "pgd-at", "--separate-batches", "--out", "x"], ["takes no --separate-batches", "--steps"]),
    # ignored without a word: standard training has no attack for them to change
    (["train", "--method", "standard", "--eps", "0.2", "--steps", "5", "--out", "x"],
     ["--method standard trains without attacks", "--eps, --steps"]),
    (["train", "--eps", "2", "--out", "x"], ["--eps 2", "at most 1"]),  # an L∞ radius beyond the pixel range
    (["bench", "--eps", "8"], ["--eps 8", "at most 1"]),
    (["train", "--step-size", "0", "--out", "x"], ["--step-size", "> 0"]),  # a PGD that never moves
    (["train", "--seed", str(2 ** 64), "--out", "x"], ["--seed", "2**63 - 1"]),  # torch.manual_seed overflowed
    (["eval", "no/such/run", "--step-size", "0"], ["--step-size", "> 0"]),
    (["train", "--schedule", "cos", "--out", "x"], ["schedule", "one-cycle"]),  # once after the first epoch's bar
    (["train", "--augment", "rotate", "--out", "x"], ["augment", "crop-flip"]),
    (["eval", "no/such/run", "--checkpoint", "epoch-003"], ["checkpoint", "best, last", "epoch-NNN.safetensors"]),
    (["rift", "no/such/run", "--out", "x", "--lrs", "0.01,nan"], ["--lrs", "> 0", "nan"]),
    (["eval", "no/such/run", "--sweep-n", "-5"], ["--sweep-n", ">= 0"]),  # ran, and wrote a report, before
    (["rift", "no/such/run", "--out", "x", "--auto", "-1"], ["--auto", ">= 0"]),
    (["rift", "no/such/run", "--out", "x", "--tolerance", "150"], ["--tolerance", "0 to 100"]),
    (["eval", "no/such/run"], ["no/such/run"]),
    # a one-step attack ran in its own norm and budget whatever was asked, under the asked-for name
    (["eval", "no/such/run", "--attack", "fgm", "--norm", "linf"], ["fgm", "l2", "--attack fgsm"]),
    (["eval", "no/such/run", "--attack", "fgsm", "--steps", "10", "--restarts", "2"], ["--steps, --restarts", "pgd"]),
    (["eval", "no/such/run", "--tau", "0.5"], ["--tau", "pgd-smooth"]),
    (["eval", "no/such/run", "--attack", "apgd-ce", "--step-size", "0.01"], ["apgd-ce", "own step sizes", "--step-size"]),
    (["eval", "no/such/run", "--no-ood", "--sanity-n", "100"], ["--sanity-n, --no-ood", "--suite standard"]),
    (["eval", "no/such/run", "--suite", "standard", "--eps", "0"], ["--suite standard", "--eps > 0"]),
    (["eval", "no/such/run", "--split", "val", "--out", "x"], ["--split val", "drop --out"]),
    (["eval", "no/such/run", "--aa-n", "10"], ["--aa-n applies to --suite standard"]),  # "--aa-n apply"
    (["eval", "no/such/run", "--cifar-c-dir", "x"], ["--cifar-c-dir applies to --suite standard"]),
    (["eval", "no/such/run", "--suite", "standard", "--no-ood", "--cifar-c-dir", "x"], ["--cifar-c-dir", "--no-ood skips"]),
    (["eval", "no/such/run", "--split", "val", "--sweep-n", "100"], ["--split val", "drop --sweep-n"]),
    (["train", "--task", "text", "--augment", "crop", "--grayscale", "--out", "x"], ["--augment, --grayscale", "text"]),
    (["eval", "no/such/run", "--device", "tpu"], ["device", "cpu, cuda"]),
    (["rift", "no/such/run", "--out", "x", "--device", "gpu0"], ["device", "cpu, cuda"]),
    (["mrc", "no/such/run", "--device", "mps"], ["device", "cpu, cuda"]),
    # a method's own range checks, once named by their keywords (co_ratio) rather than their flags
    (["train", "--method", "fast-at", "--co-ratio", "2", "--out", "x"], ["--co-ratio", "(0, 1]"]),
    (["train", "--method", "generalist", "--global-decay", "1", "--out", "x"], ["--global-decay", "(0, 1)"]),
    (["train", "--method", "pgd-at-awp", "--awp-warmup", "2", "--out", "x"], ["--awp-warmup", "[0, 1]"]),
    (["train", "--method", "generalist", "--nat-schedule", "cos", "--out", "x"], ["unknown --nat-schedule", "one-cycle"]),
    (["train", "--method", "yopo", "--first-layer-grad", "some", "--out", "x"], ["unknown --first-layer-grad"]),
    (["train", "--model", "cnn-small", "--width", "8", "--train-n", "8", "--out", "x"],  # once a TypeError
     ["--width applies to preact-resnet18", "not cnn-small"]),
    (["train", "--model", "wrn-28-10", "--width", "4", "--out", "x"],  # named its builder's depth and widen
     ["--width applies to", "resnet18", "not wrn-28-10"]),
    # an empty value meant the default (--method '' trained PGD-AT) or the current folder (--out '' wrote there)
    (["train", "--method", "", "--out", "x"], ["--method is empty"]),
    (["train", "--out", ""], ["--out is empty"]),
    (["eval", ""], ["RUN is empty"]),
    (["train", "--method", "yopo", "--first-layer", "", "--out", "x"], ["--first-layer is empty"]),
    # failed at the first training step, naming the keyword (first_layer) and no layer the model has
    (["train", "--method", "yopo", "--model", "mlp", "--train-n", "64", "--out", "x"],
     ["--first-layer 'net.conv1' is no layer of the model", "'net.fc1'"]),
    # momentum 5 trained until the loss diverged, then advised a smaller --lr
    (["train", "--momentum", "1", "--out", "x"], ["--momentum", "from 0 to below 1", "got 1"]),
    (["rift", "no/such/run", "--out", "x", "--momentum", "5"], ["--momentum", "below 1"]),
    # counts beyond the data were cut down to it without a word (60,000 trained on the 55,000 training images)
    (["train", "--data-dir", FMNIST, "--train-n", "60000", "--epochs", "1", "--steps", "1", "--val-n", "16",
      "--out", "x"],
     ["--train-n 60000 is more than the 55000 training images (the 5000 validation images are not among them); "
      "give at most 55000, or leave out --train-n for all of them"]),
    (["train", "--data-dir", FMNIST, "--val-n", "5001", "--train-n", "64", "--epochs", "1", "--out", "x"],
     ["--val-n 5001 is more than the 5000 validation images; give at most 5000"]),
    (["train", "--data-dir", FMNIST, "--train-n", "64", "--keep-every", "3", "--epochs", "2", "--out", "x"],
     ["--keep-every 3 keeps no epoch of a run of 2 epochs; give at most 2"]),  # it kept none
    # an L2 radius beyond the distance between a black and a white image reaches every image, as ε > 1 in L∞
    (["train", "--data-dir", FMNIST, "--norm", "l2", "--eps", "28.5", "--train-n", "64", "--epochs", "1", "--val-n",
      "16", "--out", "x"],
     ["--eps 28.5: an L2 radius above 28 exceeds", "1×28×28", "give at most 28"]),
    (["train", "--ema", "1.5", "--out", "x"], ["--ema: must be a number above 0 and below 1", "got 1.5"]),  # "ema decay"
    # the global learner's BatchNorm statistics, on cnn-small, which has none: ignored without a word
    (["train", "--data-dir", FMNIST, "--method", "generalist", "--global-bn", "own", "--train-n", "64", "--epochs", "1",
      "--steps", "1", "--val-n", "16", "--out", "x"],
     ["--global-bn own", "no BatchNorm layers", "leave it out"]),
])
def test_bad_input_is_one_line_and_status_2(args, words, tmp_path, run_cli):
    if "--out" in args and args[args.index("--out") + 1] == "x":
        args[args.index("--out") + 1] = str(tmp_path / "run")
    result = run_cli(*args)  # in this process; test_python_m_robustlab_cli_runs_the_cli_too runs a subprocess
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("robustlab: error:"), result.stderr
    assert all(w in lines[0] for w in words)


def test_python_m_robustlab_cli_runs_the_cli_too():  # it ran nothing and exited 0
    result = subprocess.run([sys.executable, "-m", "robustlab.cli", "train", "--epochs", "x"], capture_output=True,
                            text=True)
    assert result.returncode == 2 and "--epochs: must be a whole number > 0, got x" in result.stderr


@pytest.mark.parametrize("option", [["--dataset", "fmnist"], ["--model", "resnet"],
                                    ["--task", "text", "--model", "cnn"], ["--task", "text", "--dataset", "debian"],
                                    ["--backend", "tinygrad", "--model", "resnet"],
                                    ["--backend", "tinygrad", "--dataset", "fmnist"]])
def test_a_mistyped_name_leaves_no_run_folder(option, tmp_path, run_cli):
    result = run_cli("train", *option, "--out", str(tmp_path / "run"))
    assert result.returncode == 2 and not (tmp_path / "run").exists(), result.stderr


@pytest.mark.parametrize("method", ["pgd-at", "pgd-at-awp"])
def test_attack_train_mode_reaches_the_method(method):
    """methods.md offers PGD-AT's examples in train mode (Madry's and the AWP code); the CLI once had no way to ask."""
    from robustlab import cli
    from robustlab.training.run import make_method

    def built(*flags):
        args = cli.build_parser().parse_args(["train", "--method", method, *flags, "--out", "x"])
        return make_method(method, "fashion-mnist", "linf", **{k: getattr(args, k) for k in cli.METHOD_OPTIONS})
    assert built().attack_in_eval is True
    assert built("--attack-train-mode").attack_in_eval is False


@pytest.mark.parametrize("task", ["image", "text"])
def test_train_out_on_a_file_is_one_line(task, tmp_path, run_cli):
    (tmp_path / "file").write_text("")
    result = run_cli("train", "--task", task, "--data-dir", FMNIST if task == "image" else str(tmp_path),
                       "--train-n", "40", "--out", str(tmp_path / "file" / "run"))
    last = result.stderr.strip().splitlines()[-1]  # after the text corpus's "building ... (once)"
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert last.startswith("robustlab: error: --out") and "cannot make a folder" in last


def test_missing_data_is_one_line(tmp_path, run_cli):
    result = run_cli("train", "--data-dir", str(tmp_path), "--out", str(tmp_path / "run"))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert str(tmp_path) in result.stderr


def test_ctrl_c_says_what_the_command_keeps(monkeypatch, capsys):
    from robustlab import cli
    commands = cli.build_parser()._subparsers._group_actions[0].choices
    assert set(commands) == set(cli.INTERRUPTED)  # a new command must say it too, not fail inside the handler

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr("robustlab.evaluate.cli.cmd_eval", interrupted)
    assert cli.main(["eval", "runs/x"]) == 130
    assert "AutoAttack's finished batches are saved" in capsys.readouterr().err


def test_train_then_eval_writes_a_report(tmp_path, run_cli):
    """The first training and evaluation run as a user runs them; the commands after them in this process."""
    run = tmp_path / "run"
    trained = robustlab("train", "--data-dir", FMNIST, "--train-n", "256", "--val-n", "50", "--epochs", "1",
                        "--steps", "2", "--threads", "1", "--out", str(run))
    assert trained.returncode == 0, trained.stderr
    # two steps of the protocol's 0.025 would reach half of ε: the step follows --steps, 2.5·ε/steps, as eval's does
    assert json.loads((run / "config.json").read_text())["method"]["step_size"] == pytest.approx(0.125)
    umask = os.umask(0o022)
    os.umask(umask)
    assert (run / "best.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # not owner-only, as its .json
    # --precision auto (the default) is recorded as what it resolved to on this machine
    from robustlab.training.trainer import resolve_precision
    assert json.loads((run / "config.json").read_text())["config"]["precision"] == resolve_precision("auto", "cpu")
    again = robustlab("train", "--data-dir", FMNIST, "--out", str(run))
    assert again.returncode == 2 and "--resume" in again.stderr
    evaluated = robustlab("eval", str(run), "--data-dir", FMNIST, "--n", "100", "--steps", "3", "--restarts", "1",
                          "--sweep-n", "50", "--json", "--threads", "1")
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads(evaluated.stdout)
    assert result["n"] == 100 and 0 <= result["robust"] <= result["clean"] <= 1
    for share in (result["clean"], result["robust"]):  # exact k/n, not float32's 0.70999998 for 71/100
        assert share == round(share * 100) / 100
    report = (run / "report.md").read_text()
    assert "method: `pgd-at`, epoch 1 of 1" in report  # counted from 1 for people; the files count from 0
    assert "accuracy_vs_eps.png" in report and (run / "accuracy_vs_eps.png").stat().st_size > 1000
    assert "training_curves.png" in report and (run / "training_curves.png").stat().st_size > 1000
    assert "adversarial_examples.png" in report and (run / "adversarial_examples.png").stat().st_size > 1000
    assert json.loads((run / "report.json").read_text())["attack"]["steps"] == 3
    # the adversarial examples behind the figure, on request: the same seeds, so the same verdict per image
    saved = run_cli("eval", str(run), "--data-dir", FMNIST, "--n", "100", "--steps", "3", "--restarts", "1",
                      "--sweep-n", "0", "--json", "--threads", "1", "--out", str(tmp_path / "again"),
                      "--save-adversarial", str(tmp_path / "adv.safetensors"))
    assert saved.returncode == 0, saved.stderr
    from robustlab.evaluate import load_adversarial
    tensors, meta = load_adversarial(tmp_path / "adv.safetensors")
    assert (tensors["predictions"] == tensors["labels"]).float().mean().item() == pytest.approx(result["robust"])
    assert meta["model"] == str((run / "best.safetensors").resolve()) and meta["split"] == "test"
    assert meta["command"].startswith("robustlab eval ") and meta["batch_size"] == 500
    for file, extra, words in ((tmp_path / "x.safetensors", ["--eps", "0"], "needs ε > 0"),
                               (tmp_path / "x.safetensors", ["--transfer-from", str(run)], "--save-adversarial"),
                               (run / "best.safetensors", [], "exists and holds no adversarial examples")):
        refused = run_cli("eval", str(run), "--save-adversarial", str(file), *extra)
        assert refused.returncode == 2 and words in refused.stderr, refused.stderr
    bad_attack = run_cli("eval", str(run), "--attack", "cw")
    assert bad_attack.returncode == 2 and "fgsm" in bad_attack.stderr

    # the validation split, for choices that must not see the test set: figures only, the test report untouched
    report_json = (run / "report.json").read_text()
    on_val = run_cli("eval", str(run), "--split", "val", "--data-dir", FMNIST, "--n", "60", "--steps", "3",
                       "--restarts", "1", "--json", "--threads", "1")
    assert on_val.returncode == 0, on_val.stderr
    val = json.loads(on_val.stdout)
    assert val["split"] == "val" and val["n"] == 60 and 0 <= val["robust"] <= val["clean"] <= 1
    assert (run / "report.json").read_text() == report_json
    bad_split = run_cli("eval", str(run), "--split", "train")
    assert bad_split.returncode == 2 and "test, val" in bad_split.stderr

    # a second evaluation written elsewhere keeps the first report
    second = run_cli("eval", str(run), "--attack", "fgsm", "--data-dir", FMNIST, "--n", "60", "--sweep-n", "0",
                       "--threads", "1", "--out", str(run / "fgsm"))
    assert second.returncode == 0, second.stderr
    assert (run / "report.json").read_text() == report_json
    fgsm = json.loads((run / "fgsm" / "report.json").read_text())["attack"]
    assert (fgsm["name"], fgsm["steps"], fgsm["step_size"], fgsm["restarts"]) == ("fgsm", 1, 0.1, 1)  # not PGD's
    assert (run / "fgsm" / "report.md").read_text().startswith("# Evaluation of `run`")
    assert (run / "fgsm" / "training_curves.png").exists()
    # another checkpoint's report goes beside the run's by default, not over it
    last = run_cli("eval", str(run), "--checkpoint", "last", "--attack", "fgsm", "--data-dir", FMNIST, "--n", "60",
                     "--sweep-n", "0", "--threads", "1")
    assert last.returncode == 0, last.stderr
    assert (run / "report.json").read_text() == report_json
    assert (run / "eval-last" / "report.md").read_text().startswith("# Evaluation of `run/last.safetensors`")
    smooth = run_cli("eval", str(run), "--attack", "pgd-smooth", "--tau", "0.5", "--data-dir", FMNIST, "--n", "60",
                       "--steps", "3", "--restarts", "1", "--sweep-n", "0", "--threads", "1", "--json",
                       "--out", str(run / "smooth"))
    assert smooth.returncode == 0, smooth.stderr
    assert 0 <= json.loads(smooth.stdout)["robust"] <= json.loads(smooth.stdout)["clean"]
    assert "smooth ReLU gradients τ=0.5" in (run / "smooth" / "report.md").read_text()
    apgd = run_cli("eval", str(run), "--attack", "apgd-ce", "--steps", "5", "--split", "val", "--data-dir", FMNIST,
                     "--n", "40", "--threads", "1", "--json")
    assert apgd.returncode == 0, apgd.stderr
    apgd = json.loads(apgd.stdout)
    assert apgd["attack"]["name"] == "apgd-ce" and apgd["attack"]["step_size"] is None
    assert apgd["attack"]["steps"] == 5 and 0 <= apgd["robust"] <= apgd["clean"]
    # a run that its method stopped early (Fast-AT's overfitting check) says so in its report
    metrics_file = run / "metrics.jsonl"
    kept = metrics_file.read_text()
    last = json.loads(kept.splitlines()[-1])
    stopped_last = json.dumps({**last, "stopped_early": "catastrophic overfitting"})
    metrics_file.write_text(kept.replace(json.dumps(last), stopped_last))
    stopped = run_cli("eval", str(run), "--attack", "fgsm", "--data-dir", FMNIST, "--n", "20", "--sweep-n", "0",
                        "--threads", "1", "--out", str(tmp_path / "stopped"))
    metrics_file.write_text(kept)
    assert stopped.returncode == 0, stopped.stderr
    report_md = (tmp_path / "stopped" / "report.md").read_text()
    assert "- training stopped early after epoch 1: catastrophic overfitting\n" in report_md
    # a larger ε gets a step scaled with it (the protocol's 0.01 is for ε = 0.1), as the report's ε sweep does
    wider = run_cli("eval", str(run), "--eps", "0.2", "--data-dir", FMNIST, "--n", "20", "--restarts", "1",
                      "--sweep-n", "0", "--threads", "1", "--json", "--out", str(tmp_path / "wider"))
    assert wider.returncode == 0 and json.loads(wider.stdout)["attack"]["step_size"] == pytest.approx(0.02)
    for args, words in ([str(run / "best.safetensors"), "--checkpoint", "last"], "is a checkpoint file"), \
                       ([str(run / "report.json")], "not a readable safetensors"):
        refused = run_cli("eval", *args)
        assert refused.returncode == 2 and words in refused.stderr and len(refused.stderr.splitlines()) == 1
    on_a_file = run_cli("eval", str(run), "--out", str(run / "report.json"))
    assert on_a_file.returncode == 2 and len(on_a_file.stderr.strip().splitlines()) == 1
    assert "--out" in on_a_file.stderr

    # the reports side by side
    summary = run_cli("summary", str(run), str(run / "eval-last"), str(run / "fgsm" / "report.json"),
                        "--plot", str(tmp_path / "plots" / "runs.png"))
    assert summary.returncode == 0, summary.stderr
    lines = summary.stdout.splitlines()
    assert lines[2].startswith(f"| run | cnn-small | pgd-at | 1/1 | 100 | {100 * result['clean']:.2f} | "
                               f"{100 * result['robust']:.2f} | – | – |"), lines[2]
    assert lines[3].startswith("| run/eval-last | cnn-small | pgd-at | 1/1 | 60 |") and lines[4].startswith("| fgsm |")
    assert "different attacks" in summary.stdout and "different numbers of images" in summary.stdout
    assert (tmp_path / "plots" / "runs.png").stat().st_size > 1000
    rows = json.loads(run_cli("summary", str(run), "--json").stdout)
    assert (rows[0]["clean"], rows[0]["robust"], rows[0]["n"]) == (result["clean"], result["robust"], 100)
    trained_s = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["elapsed_s"]
    assert rows[0]["train_s"] == trained_s
    away = tmp_path / "away" / "report.json"  # a report moved away from its run still knows the training time
    away.parent.mkdir()
    away.write_text((run / "fgsm" / "report.json").read_text())
    assert json.loads(run_cli("summary", str(away), "--json").stdout)[0]["train_s"] == trained_s
    gone = subprocess.Popen([sys.executable, "-m", "robustlab", "summary", str(run)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    gone.stdout.close()  # `| head` that has read enough
    assert gone.wait() in (0, 141) and b"Traceback" not in gone.stderr.read()
    none = run_cli("summary", str(run), str(tmp_path))
    assert none.returncode == 2 and none.stderr.count("\n") == 1 and "no report.json in" in none.stderr
    # another dataset is said; edited or damaged reports are one line, not an AttributeError or KeyError
    report = json.loads((run / "fgsm" / "report.json").read_text())
    other = tmp_path / "other" / "report.json"
    other.parent.mkdir()
    other.write_text(json.dumps({**report, "run": {**report["run"], "dataset": "cifar10"}}))
    assert "the reports are of different datasets" in run_cli("summary", str(run / "fgsm"), str(other)).stdout
    for damaged in ({**report, "run": None}, {**report, "rows": [{"accuracy": 0.5}]}, {**report, "robust": None}):
        other.write_text(json.dumps(damaged))
        refused = run_cli("summary", str(other), "--plot", str(tmp_path / "p.png"))
        assert refused.returncode == 2 and "is not a robustlab evaluation report" in refused.stderr, refused.stderr


def test_eval_transfer_from_another_run(tmp_path, run_cli):
    runs = [tmp_path / "a", tmp_path / "b"]
    for seed, run in enumerate(runs):
        assert run_cli("train", "--data-dir", FMNIST, "--train-n", "256", "--val-n", "50", "--epochs", "1", "--steps",
                         "2", "--seed", str(seed), "--threads", "1", "--out", str(run)).returncode == 0
    common = ["--data-dir", FMNIST, "--n", "100", "--steps", "3", "--restarts", "1", "--threads", "1", "--json"]
    # From the model itself, with the same seed, the transferred last iterate is the white-box attack's own last
    # iterate, so it breaks nothing the white-box attack left.
    itself = run_cli("eval", str(runs[0]), "--transfer-from", str(runs[0]), *common)
    assert itself.returncode == 0, itself.stderr
    itself = json.loads(itself.stdout)
    assert itself["transfer_only"] == 0 and itself["worst_case"] == itself["white_box"] <= itself["transfer"]
    other = run_cli("eval", str(runs[1]), "--transfer-from", str(runs[0]), *common)
    assert other.returncode == 0, other.stderr
    other = json.loads(other.stdout)
    assert other["n"] == 100 and other["transfer"] < other["clean"] and other["source"] == str(runs[0])
    assert not (runs[1] / "report.json").exists()  # figures only
    at_zero = run_cli("eval", str(runs[1]), "--transfer-from", str(runs[0]), *common, "--eps", "0")
    assert at_zero.returncode == 0, at_zero.stderr  # the step scaled by e/ε once divided by zero

    refused = run_cli("eval", str(runs[1]), "--transfer-from", str(runs[0]), "--suite", "standard")
    assert refused.returncode == 2 and "--transfer-from" in refused.stderr, refused.stderr
    from robustlab import checkpoint
    tensors, meta = checkpoint.load(runs[0] / "best.safetensors")
    meta["dataset"]["name"] = "mnist"
    checkpoint.save(tmp_path / "mnist.safetensors", tensors, meta)
    refused = run_cli("eval", str(runs[1]), "--transfer-from", str(tmp_path / "mnist.safetensors"), *common)
    assert refused.returncode == 2 and "same data" in refused.stderr and len(refused.stderr.splitlines()) == 1
    missing = run_cli("eval", str(runs[1]), "--transfer-from", str(tmp_path / "nope"), *common)
    assert missing.returncode == 2 and missing.stderr.startswith("robustlab: error: --transfer-from: no run directory")
    early = run_cli("eval", str(runs[1]), "--transfer-from", str(tmp_path / "nope"), "--data-dir", str(tmp_path / "x"))
    assert "--transfer-from: no run directory" in early.stderr  # before the test data is looked for


def _published_corruptions(folder, n):
    """A CIFAR-10-C-style folder for the first n Fashion-MNIST test images: `identity.npy` holds the images
    themselves at every severity, `inverted.npy` their negatives."""
    import numpy as np
    from robustlab.data import load_dataset
    test = load_dataset("fashion-mnist", FMNIST).test.subset(n)
    folder.mkdir()
    images = test.images.numpy().transpose(0, 2, 3, 1)
    np.save(folder / "labels.npy", np.tile(test.labels.numpy(), 5))
    np.save(folder / "identity.npy", np.concatenate([images] * 5))
    np.save(folder / "inverted.npy", np.concatenate([255 - images] * 5))
    return test


def test_standard_suite_reads_published_corruption_files_when_named(tmp_path, run_cli):
    """--cifar-c-dir: the OOD rows come from the files as they are (a file of the clean images scores the clean
    accuracy), and a folder that does not fit the test images is refused before any attack."""
    run = tmp_path / "run"
    assert run_cli("train", "--data-dir", FMNIST, "--train-n", "128", "--val-n", "20", "--epochs", "1",
                     "--steps", "1", "--threads", "1", "--out", str(run)).returncode == 0
    _published_corruptions(tmp_path / "c", 20)
    common = ["--suite", "standard", "--attack", "fgsm", "--data-dir", FMNIST, "--aa-steps", "2", "--aa-queries",
              "10", "--sanity-n", "20", "--sweep-n", "0", "--threads", "1"]
    result = run_cli("eval", str(run), "--n", "20", "--cifar-c-dir", str(tmp_path / "c"), *common)
    assert result.returncode == 0, result.stderr
    report = json.loads((run / "report.json").read_text())
    rows = {row["name"]: row["accuracy"] for row in report["rows"]}
    ood = report["ood"]
    assert "OOD mean over 2 corruptions × 5 severities (the published CIFAR-C files)" in rows
    assert set(ood["accuracy"]) == {"identity", "inverted"} and "CIFAR-C files in" in ood["source"]
    assert all(a == rows["clean"] for a in ood["accuracy"]["identity"].values())
    # more test images than the files hold, or other labels: refused before the clean pass, and nothing written
    before = (run / "report.json").read_text()
    for n, words in (("21", "holds 20 images of shape (1, 28, 28) per severity; the test set has 21"),
                     ("20", "labels in")):
        if words == "labels in":
            import numpy as np
            labels = np.load(tmp_path / "c" / "labels.npy")
            np.save(tmp_path / "c" / "labels.npy", (labels + 1) % 10)
        refused = run_cli("eval", str(run), "--n", n, "--cifar-c-dir", str(tmp_path / "c"), *common)
        assert refused.returncode == 2 and words in refused.stderr and len(refused.stderr.splitlines()) == 1, \
            refused.stderr
    assert (run / "report.json").read_text() == before


def test_standard_suite_reports_autoattack_sanity_and_ood(tmp_path, run_cli):
    run = tmp_path / "run"
    assert run_cli("train", "--data-dir", FMNIST, "--train-n", "256", "--val-n", "50", "--epochs", "1",
                     "--steps", "2", "--threads", "1", "--out", str(run)).returncode == 0
    result = run_cli("eval", str(run), "--suite", "standard", "--data-dir", FMNIST, "--n", "40", "--aa-n", "24",
                       "--steps", "3", "--restarts", "1", "--aa-steps", "5", "--aa-queries", "50", "--sanity-n", "40",
                       "--sweep-n", "0", "--threads", "1")
    assert result.returncode == 0, result.stderr
    assert "AutoAttack after square (off-protocol: 5 steps, 50 queries) (first 24 test images)" in result.stdout, \
        result.stdout
    report = json.loads((run / "report.json").read_text())
    assert report["run"]["checkpoint"] == str((run / "best.safetensors").resolve())
    names = [row["name"] for row in report["rows"]]
    # --aa-n: AutoAttack on the first 24 images, everything else on all 40
    assert {row["n"] for row in report["rows"] if row["name"].startswith("AutoAttack")} == {24}
    assert {row["n"] for row in report["rows"] if not row["name"].startswith("AutoAttack")} == {40}
    assert any("after square" in n and "off-protocol" in n for n in names)
    assert any(n.startswith("OOD mean") for n in names)
    accs = [row["accuracy"] for row in report["rows"] if row["name"].startswith("AutoAttack")]
    assert accs == sorted(accs, reverse=True) and accs[-1] <= report["rows"][0]["accuracy"]
    assert report["sanity"]["verdict"] and (run / "corruptions.png").exists() and (run / "per_class.png").exists()
    assert report["sanity"]["checks"][-1]["name"] == "autoattack_square"  # read off AutoAttack's own stages
    assert "Gradient-masking sanity checks" in (run / "report.md").read_text()
    assert report["sanity"]["n"] == 40 and "On the first 40 of the evaluated images" in (run / "report.md").read_text()
    row, = json.loads(run_cli("summary", str(run), "--json").stdout)
    assert row["autoattack"] == accs[-1] and row["autoattack_n"] == 24 and row["ood"] is not None
    # with a one-step attack too: its sanity checks called it at other ε, which it did not take (a traceback)
    fgsm = run_cli("eval", str(run), "--suite", "standard", "--attack", "fgsm", "--data-dir", FMNIST, "--n", "20",
                     "--aa-steps", "2", "--aa-queries", "10", "--sanity-n", "20", "--no-ood", "--sweep-n", "0",
                     "--threads", "1", "--out", str(tmp_path / "fgsm"), "--json")
    assert fgsm.returncode == 0, fgsm.stderr
    assert json.loads((tmp_path / "fgsm" / "report.json").read_text())["sanity"]["verdict"]
    printed = json.loads(fgsm.stdout)  # --json printed clean and FGSM only: no AutoAttack, no verdict
    assert printed["sanity"] and any(row["name"].startswith("AutoAttack") for row in printed["rows"])
    assert any(row["name"] == "FGSM linf ε=0.1" for row in printed["rows"])  # the one-step rows name their norm too
    # --out over another checkpoint's report, or into another run's folder, replaced it without a word
    (tmp_path / "other-run").mkdir()
    (tmp_path / "other-run" / "config.json").write_text("{}")
    for out, words in ((run, "holds the report of"), (tmp_path / "other-run", "another run's folder")):
        refused = run_cli("eval", str(run), "--checkpoint", "last", "--out", str(out), "--data-dir", FMNIST)
        assert refused.returncode == 2 and words in refused.stderr, refused.stderr


def test_auto_precision_is_bf16_only_where_the_device_has_bf16_units(monkeypatch):
    from robustlab.training import trainer
    monkeypatch.setattr(trainer, "fast_bf16", lambda device: True)
    assert trainer.resolve_precision("auto", "cpu") == "bf16"
    assert trainer.resolve_precision("fp32", "cpu") == "fp32"
    assert trainer.resolve_precision("auto", "tpu") == "fp32"  # left for TrainConfig.validate to reject
    monkeypatch.setattr(trainer, "fast_bf16", lambda device: False)
    assert trainer.resolve_precision("auto", "cpu") == "fp32"
    assert trainer.resolve_precision("bf16", "cpu") == "bf16"  # asked for: given, however slow


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_eval_on_cuda_agrees_with_cpu(tmp_path):
    run = tmp_path / "run"
    assert robustlab("train", "--data-dir", FMNIST, "--train-n", "256", "--val-n", "50", "--epochs", "1",
                     "--steps", "2", "--threads", "1", "--out", str(run)).returncode == 0
    results = {}
    for device in ("cpu", "cuda"):
        out = robustlab("eval", str(run), "--data-dir", FMNIST, "--n", "200", "--steps", "10", "--restarts", "1",
                        "--sweep-n", "0", "--json", "--device", device, "--out", str(tmp_path / device))
        assert out.returncode == 0, out.stderr
        results[device] = json.loads(out.stdout)
    assert results["cuda"]["clean"] == results["cpu"]["clean"]  # fp32 on both (TF32 off on the GPU)
    # the random starts differ (each device has its own generator); the attack's strength does not
    assert abs(results["cuda"]["robust"] - results["cpu"]["robust"]) <= 0.03


def test_summary_table_names_what_differs_and_prints_no_nan(tmp_path):
    """AutoAttack on fewer images than clean, and an OOD mean of NaN, once passed without a word (and printed `nan`)."""
    from robustlab.evaluate.summary import plot, table
    row = {"name": "a", "model": "cnn-small", "method": "pgd-at", "epoch": "10/10", "n": 1000, "clean": 0.85,
           "attack": "PGD", "robust": 0.75, "autoattack": 0.74, "autoattack_n": 1000, "autoattack_stage": "x",
           "ood": float("nan"), "train_s": 100.0, "sanity": None}
    rows = [row, {**row, "name": "b", "autoattack_n": 500}]
    text = table(rows)
    assert "nan" not in text and "different numbers of images" in text
    # a report whose masking checks failed stood in the table as the most robust run, without a word
    masked = {**row, "name": "c", "robust": 0.9, "sanity": "suspicious: gradients, large_eps"}
    skipped = {**row, "name": "d", "sanity": "trustworthy (smooth_gradients not run)", "sanity_not_run": 1}
    text = table([{**row, "sanity": "trustworthy"}, masked, skipped])
    assert "| 85.00 | 75.00 | 74.00 | – | pass | 100 s |" in text
    assert "| 90.00 | 74.00 | – | **suspicious** |" in text
    assert "| 85.00 | 75.00 | 74.00 | – | pass, 1 not run | 100 s |" in text
    assert "gradient masking suspected, so their robust figures may overstate robustness: c (suspicious: " \
           "gradients, large_eps)" in text
    assert "AutoAttack on fewer images than clean" == plot(rows, tmp_path / "p.png")
    assert "AutoAttack on the first 500 images" == plot([rows[1]], tmp_path / "q.png")
    # OOD means over generated corruptions and over the published files, side by side without a word
    generated = {**row, "ood": 0.7, "ood_set": "OOD mean over 25 corruptions × 5 severities"}
    published = {**generated, "name": "e", "ood_set": "OOD mean over 19 corruptions × 5 severities (the published "
                                                      "CIFAR-C files)"}
    assert "corruption sets" not in table([generated, {**generated, "name": "f"}, row])
    assert ("the reports' OOD means are over different corruption sets, so that column does not compare: a: OOD "
            "mean over 25 corruptions × 5 severities; e: OOD mean over 19 corruptions × 5 severities (the published "
            "CIFAR-C files)") in table([generated, published, row])


def test_summary_table_gives_long_trainings_in_minutes_and_names_only_what_differs():
    from robustlab.evaluate.summary import table
    row = {"name": "a", "dataset": "fashion-mnist", "model": "cnn-small", "method": "pgd-at", "epoch": "10/10",
           "n": 100, "clean": 0.85, "attack": "PGD", "robust": 0.75, "autoattack": 0.74, "autoattack_n": 100,
           "autoattack_stage": "AutoAttack after square", "ood": None, "train_s": 600.0, "sanity": None}
    text = table([row, {**row, "name": "b", "train_s": 90.0}])
    assert "| – | 10.0 min |" in text and "| – | 90 s |" in text
    assert text.splitlines()[4:] == ["", "attack: PGD"]  # alike in all else: nothing more to say
    lowered = {**row, "name": "c", "autoattack_stage": "AutoAttack after square (off-protocol: 5 steps, 50 queries)"}
    assert "AutoAttack ran with a lowered budget (off-protocol) in some reports" in table([row, lowered])


def test_summary_plot_takes_the_reports_attack_where_one_report_lacks_autoattack(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from robustlab.evaluate.summary import plot
    monkeypatch.setattr(Figure, "savefig", lambda self, path, **kw: None)
    row = {"name": "a", "n": 100, "clean": 0.85, "attack": "PGD-50×3", "robust": 0.75, "autoattack": 0.74,
           "autoattack_n": 100, "sanity": None}
    assert plot([row, {**row, "name": "b", "autoattack": None, "autoattack_n": None}], tmp_path / "p.png") == "PGD-50×3"


def test_checkpoint_choice_and_non_model_files_are_one_line_errors(tmp_path, run_cli):
    """--checkpoint with a file was ignored, a RiFT folder's missing last.safetensors was reported as no checkpoint at
    all, and a robustlab file that holds no model (an AutoAttack state) failed with KeyError: 'dataset'."""
    from robustlab import checkpoint, load_model
    from robustlab.errors import RobustlabError
    from robustlab.training.run import resolve_checkpoint
    rift = tmp_path / "rift"
    checkpoint.save(rift / "best.safetensors", {"w": torch.zeros(1)}, {"kind": "model"})
    assert resolve_checkpoint(rift) == rift / "best.safetensors"
    with pytest.raises(RobustlabError, match="has no last.safetensors .a RiFT result keeps best.safetensors only"):
        resolve_checkpoint(rift, "last")
    with pytest.raises(RobustlabError, match="--checkpoint best: .* is a checkpoint file"):
        resolve_checkpoint(rift / "best.safetensors", "best")
    state = tmp_path / "autoattack_state.safetensors"
    checkpoint.save(state, {"x": torch.zeros(1)}, {"kind": "autoattack-state"})
    with pytest.raises(RobustlabError, match="not a robustlab model checkpoint .it holds 'autoattack-state'.: its "
                                             "metadata lacks model.name, dataset.input_shape"):
        load_model(state)
    result = run_cli("mrc", str(state))
    assert result.returncode == 2 and "not a robustlab model checkpoint" in result.stderr, result.stderr


def test_damaged_checkpoint_metadata_and_a_failed_write_are_one_line_errors(tmp_path, run_cli):
    """Metadata that is no JSON object was a JSONDecodeError or AttributeError traceback (eval, --resume, rift);
    a full disk while saving was a SafetensorError traceback."""
    import errno

    from safetensors.torch import save_file

    from robustlab import checkpoint
    from robustlab.errors import RobustlabError
    for text in ("{not json", "[1, 2]", '"x"'):
        save_file({"a": torch.zeros(2)}, str(tmp_path / "bad.safetensors"), metadata={"robustlab": text})
        with pytest.raises(RobustlabError, match="its robustlab metadata is not a JSON object; the file is damaged"):
            checkpoint.read_metadata(tmp_path / "bad.safetensors")
    result = run_cli("eval", str(tmp_path / "bad.safetensors"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "damaged" in result.stderr, result.stderr
    checkpoint.save(tmp_path / "bad.safetensors", {"a": torch.zeros(2)}, {"config": "x"})  # failed after the attacks
    from robustlab import load_model
    with pytest.raises(RobustlabError, match="its metadata field config is not a JSON object; the file is damaged"):
        load_model(tmp_path / "bad.safetensors")

    path = tmp_path / "run" / "last.safetensors"
    checkpoint.save(path, {"w": torch.ones(3)}, {"epoch": 0})

    def full_disk(tmp):
        tmp.write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(RobustlabError, match=r"cannot write .*last.safetensors \(No space left on device\); the "
                                             "previous file is kept"):
        checkpoint.atomic_write(path, full_disk)
    assert checkpoint.load(path)[1]["epoch"] == 0 and sorted(p.name for p in path.parent.iterdir()) == [
        "last.json", "last.safetensors"]


def test_a_damaged_rift_cache_is_a_one_line_error(tmp_path):
    from robustlab.errors import RobustlabError
    from robustlab.rift.mrc import read_json
    (tmp_path / "mrc.json").write_text('{"x')
    with pytest.raises(RobustlabError, match="mrc.json is damaged .not JSON.; delete it"):
        read_json(tmp_path / "mrc.json")
    assert read_json(tmp_path / "none.json") == {}


@pytest.mark.parametrize("overrides,step", [({}, 0.025), ({"steps": 3}, 2.5 * 0.1 / 3), ({"eps": 0.2}, 0.05),
                                            ({"eps": 0.2, "steps": 5}, 0.1), ({"steps": 3, "step_size": 0.01}, 0.01)])
def test_training_step_follows_changed_eps_and_steps(overrides, step):
    """--steps 3 kept the protocol's 0.025, which cannot cross ε = 0.1 in three steps; eval already scaled it."""
    from robustlab.training.run import make_method
    assert make_method("pgd-at", "fashion-mnist", "linf", **overrides).step_size == pytest.approx(step)


def test_demo_of_another_length_and_ctrl_c_in_the_first_epoch_say_what_is_true(tmp_path, monkeypatch, capsys):
    from robustlab import checkpoint, cli
    out = tmp_path / "demo"
    demo = {"method": {"name": "pgd-at", "steps": 5, "step_size": 0.05}, "model": {"name": "cnn-small"},
            "dataset": {"name": "fashion-mnist"}}
    config = {"epochs": 1, "ema": 0.999, "val_n": 500, "train_n": None}
    checkpoint.save(out / "last.safetensors", {"w": torch.zeros(1)}, {"kind": "last", "config": config, **demo})
    assert cli.main(["demo", "--out", str(out), "--epochs", "2"]) == 2
    assert "holds a demo run of 1 epoch: `robustlab demo --epochs 1` continues it" in capsys.readouterr().err
    # a PGD-AT run of the demo's model and data but not the demo's: "continues it" was not true
    checkpoint.save(out / "last.safetensors", {"w": torch.zeros(1)},
                    {"kind": "last", "config": {**config, "ema": None}, **demo})
    assert cli.main(["demo", "--out", str(out), "--epochs", "1"]) == 2
    assert "holds a PGD-AT run of cnn-small on Fashion-MNIST that the demo did not train" in capsys.readouterr().err
    # another command's run: train's "--resume: ... other settings" named options the user never gave
    checkpoint.save(out / "last.safetensors", {"w": torch.zeros(1)},
                    {"kind": "last", "config": {"epochs": 2}, **demo, "method": {"name": "trades"}})
    assert cli.main(["demo", "--out", str(out), "--epochs", "2"]) == 2
    assert "holds a run the demo did not train (trades, cnn-small, fashion-mnist); choose another --out" in \
        capsys.readouterr().err

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "cmd_train", interrupted)
    assert cli.main(["train", "--out", str(tmp_path / "fresh")]) == 130
    assert "no epoch had finished, so nothing is saved" in capsys.readouterr().err


def test_free_at_says_that_it_divides_the_epochs(tmp_path, run_cli):
    result = run_cli("train", "--method", "free-at", "--replays", "2", "--epochs", "2", "--data-dir", FMNIST,
                       "--train-n", "64", "--val-n", "20", "--threads", "1", "--out", str(tmp_path / "free"))
    assert result.returncode == 0, result.stderr
    assert "--method free-at trains 1 epoch for --epochs 2: it replays each minibatch 2 times" in result.stderr
    assert "(first 20)" in result.stdout + result.stderr  # robust on --val-n images, clean on all 5,000: say so


def test_summary_rows_of_same_named_folders_get_distinct_names(tmp_path):
    from robustlab.evaluate.summary import distinct_names
    folders = [tmp_path / "standard", tmp_path / "pgd" / "standard", tmp_path / "other"]
    rows = distinct_names([{"name": "standard"}, {"name": "standard"}, {"name": "other"}], folders)
    assert [r["name"] for r in rows] == [f"{tmp_path.name}/standard", "pgd/standard", "other"]


def test_the_protocols_own_step_count_keeps_its_step():
    """`--steps 50` spelled out ran PGD-50 with 2.5·ε/50 = 0.005, half the protocol's PGD-50 step (0.01)."""
    from robustlab.protocol import step_for, threat_defaults
    evaluation = threat_defaults("fashion-mnist", "linf").eval
    assert step_for(evaluation, None, 50) == step_for(evaluation) == 0.01
    assert step_for(evaluation, 0.2, 50) == pytest.approx(0.02)  # scaled with ε, as without --steps
    assert step_for(evaluation, None, 20) == pytest.approx(2.5 * 0.1 / 20)  # another count: Madry's rule
    assert step_for(threat_defaults("fashion-mnist", "l2").eval, None, 50) == pytest.approx(0.15)


def test_a_count_where_there_is_nothing_to_count_says_so():
    """"give at most 0" to an option that takes 1 or more is no advice."""
    from robustlab.errors import RobustlabError, check_at_most
    with pytest.raises(RobustlabError, match="^--val-n 10: there are no validation images; leave out --val-n$"):
        check_at_most("--val-n", 10, 0, "validation images (the split is empty)")
    check_at_most("--val-n", None, 0, "validation images")


def test_a_radius_runs_from_0_to_the_one_that_reaches_every_image_and_is_a_number():
    """ε = 0 (the clean point of a sweep) and ε = 1 in L∞ (the whole pixel range) are radii; True, which Python
    counts as 1, is none."""
    from robustlab.errors import RobustlabError
    from robustlab.protocol import check_eps
    for eps in (0, 0.0, 8 / 255, 1, 1.0):
        check_eps(eps, "linf", "--eps")
    check_eps(0.0, "l2", "--eps", (1, 28, 28))
    for eps in (True, False, -0.01, float("nan"), "0.1", 1.001):
        with pytest.raises(RobustlabError, match="^--eps "):
            check_eps(eps, "linf", "--eps")


def test_a_run_too_short_for_awp_says_it_trains_without_it(tmp_path, run_cli):
    """AWP starts at epoch ⌈0.045·E⌉ (0-based): a one-epoch trades-awp run was plain TRADES, without a word."""
    done = run_cli("train", "--method", "trades-awp", "--epochs", "1", "--train-n", "64", "--val-n", "16",
                     "--steps", "1", "--data-dir", FMNIST, "--threads", "1", "--out", str(tmp_path / "short"))
    assert done.returncode == 0, done.stderr
    assert "perturbs the weights in none of its 1 epochs, so it trains as trades" in done.stderr
    done = run_cli("train", "--method", "pgd-at-awp", "--awp-warmup", "0.5", "--epochs", "3", "--train-n", "64",
                     "--val-n", "16", "--steps", "1", "--data-dir", FMNIST, "--threads", "1", "--out", str(tmp_path / "later"))
    assert done.returncode == 0 and "perturbs the weights from epoch 3 of 3" in done.stderr, done.stderr
    done = run_cli("train", "--method", "pgd-at-awp", "--awp-gamma", "0", "--epochs", "1", "--train-n", "64",
                     "--val-n", "16", "--steps", "1", "--data-dir", FMNIST, "--threads", "1", "--out", str(tmp_path / "off"))
    assert done.returncode == 0 and "so it trains as pgd-at (--awp-gamma 0)" in done.stderr, done.stderr


def test_bench_takes_the_same_options_from_the_cli_and_the_script():
    """`robustlab bench --bf16` was refused though the docs offered it, and `python benchmarks/bench.py` exited 1 after
    a good run, printing its results dict to stderr."""
    tiny = ["--iters", "1", "--batch-size", "4", "--threads", "1", "--no-bf16", "--json"]
    cli = robustlab("bench", *tiny)
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert set(json.loads(cli.stdout.splitlines()[-1])) == {"textbook", "robustlab-fp32", "robustlab-fp32-cl"}
    root = os.path.join(os.path.dirname(__file__), "..")
    script = subprocess.run([sys.executable, "benchmarks/bench.py", *tiny[:-2]], cwd=root, capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": os.path.join(root, "src")})
    assert script.returncode == 0 and "textbook" in script.stdout and "{" not in script.stderr, script.stderr[-2000:]


def test_summary_plot_without_a_format_is_refused(tmp_path):
    """matplotlib wrote FILE.png (`--plot /etc` wrote /etc.png) while the command said "plot: FILE"."""
    from types import SimpleNamespace

    from robustlab.errors import RobustlabError
    from robustlab.evaluate import summary
    for plot in (str(tmp_path / "summary"), str(tmp_path), ""):
        with pytest.raises(RobustlabError, match="names no file with a format"):
            summary.cmd_summary(SimpleNamespace(runs=[], plot=plot, json=False))
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("field,value", [("num_classes", "ten"), ("mean", "x"), ("input_shape", "1x28x28")])
def test_checkpoint_metadata_of_the_wrong_type_is_a_one_line_error(field, value, tmp_path):
    """Hand-edited metadata whose fields exist but have the wrong type was a TypeError traceback from torch."""
    from robustlab.errors import RobustlabError
    from robustlab.training.run import model_from_meta
    meta = {"model": {"name": "cnn-small", "kwargs": {}},
            "dataset": {"input_shape": [1, 28, 28], "num_classes": 10, "mean": [0.5], "std": [0.5]}}
    meta["dataset"][field] = value
    with pytest.raises(RobustlabError, match="its metadata describes no model that can be built.*damaged"):
        model_from_meta(meta, "x.safetensors")


@pytest.mark.parametrize("steps", [0, "abc", -3])
def test_make_method_checks_steps_before_dividing_by_it(steps):
    """ZeroDivisionError or TypeError in protocol.step_for (Python API, compare_at.py --option pgd-at.steps=0)."""
    from robustlab.errors import RobustlabError
    from robustlab.training.run import make_method
    with pytest.raises(RobustlabError, match="steps must be an integer >= 1"):
        make_method("pgd-at", "fashion-mnist", "linf", steps=steps)


def test_a_checkpoint_with_nan_weights_is_refused_before_any_attack(tmp_path):
    """NaN weights gave logits of NaN, read as class 0: `eval` reported 6.25% clean and robust and exited 0."""
    from robustlab import checkpoint
    from robustlab.errors import RobustlabError
    from robustlab.models import build_model
    from robustlab.training.run import load_model
    model = build_model("cnn-small", (1, 28, 28), 10, (0.5,), (0.25,))
    tensors = checkpoint.prefixed("model.", model.state_dict())
    tensors["model.net.conv1.weight"][0, 0, 0, 0] = float("nan")
    meta = {"model": {"name": "cnn-small", "kwargs": {}},
            "dataset": {"name": "fashion-mnist", "input_shape": [1, 28, 28], "num_classes": 10, "mean": [0.5], "std": [0.25]}}
    checkpoint.save(tmp_path / "best.safetensors", tensors, meta)
    with pytest.raises(RobustlabError, match=r"best.safetensors: model.net.conv1.weight hold NaN or infinite values"):
        load_model(tmp_path)
    tensors["model.net.conv1.weight"][0, 0, 0, 0] = 0.0
    checkpoint.save(tmp_path / "best.safetensors", tensors, meta)
    assert load_model(tmp_path).training is False


def test_momentum_of_one_or_more_is_refused_from_python_too():
    from robustlab.errors import RobustlabError
    from robustlab.training import TrainConfig
    for value in (1.0, 5.0, -0.1):
        with pytest.raises(RobustlabError, match="momentum must be from 0 to below 1"):
            TrainConfig(momentum=value).validate()
    TrainConfig(momentum=0.0).validate()


class _ByPixel(torch.nn.Module):
    """Two classes read off pixel (0, 0): decisions a test can script exactly."""

    def forward(self, x):
        p = x[:, 0, 0, 0]
        return 10 * torch.stack([1 - p, p], 1)


def test_transfer_quotes_the_worst_of_the_two_attacks_per_image(capsys):
    """The white-box attack breaks images 0-2, the examples made on the source 2 and 3: the worst case leaves 6 of 10,
    and image 3 is the one that only the transferred examples broke."""
    from types import SimpleNamespace

    from robustlab.data import ImageSet
    from robustlab.evaluate.cli import _eval_transfer
    target, source = _ByPixel(), _ByPixel()
    labels = torch.tensor([0, 1] * 5)
    images = torch.zeros(10, 1, 2, 2, dtype=torch.uint8)
    images[:, 0, 0, 0] = 255 * labels
    images[[0, 1, 2], 0, 0, 1] = 255  # what an attack on the target breaks
    images[[2, 3], 0, 1, 0] = 255  # what an attack on the source breaks

    def breaks_the_marked(model, x, y, generator=None):
        marked = (x[:, 0, 0, 1] if model is target else x[:, 0, 1, 0]) > 0.5
        out = x.clone()
        out[marked, 0, 0, 0] = 1 - y[marked].float()
        return out
    args = SimpleNamespace(attack="fgsm", batch_size=4, seed=0, split="test", transfer_from="source-run", json=True)
    assert _eval_transfer(args, target, source, ImageSet(images, labels), breaks_the_marked, "stand-in") == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["clean"], result["white_box"], result["transfer"]) == (1.0, 0.7, 0.8)
    assert result["worst_case"] == 0.6 and result["transfer_only"] == 1


def test_summary_row_takes_autoattacks_last_stage_the_checks_not_run_and_the_runs_training_time(tmp_path):
    """A report that records no training time (evaluate_model's, older ones) takes the run's from its metrics' last
    line, the whole run's; AutoAttack's figure is its last stage's."""
    from robustlab.evaluate.summary import read_report, summarize, table
    run = tmp_path / "run"
    (run / "eval-last").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "elapsed_s": 10.0 * (e + 1)}) + "\n"
                                               for e in range(3)))
    stages = (("apgd-ce", 0.45), ("apgd-t", 0.43), ("fab-t", 0.43), ("square", 0.42))
    rows = [{"name": "clean", "n": 50, "accuracy": 0.8}, {"name": "PGD", "n": 50, "accuracy": 0.5},
            *({"name": f"AutoAttack after {stage}", "n": 40, "accuracy": acc} for stage, acc in stages)]
    checks = [{"name": "gradients", "passed": True, "ran": True},
              {"name": "black_box", "passed": True, "ran": True},
              {"name": "smooth_gradients", "passed": True, "ran": False}]
    report = {"run": {"model": "cnn-small", "dataset": "fashion-mnist"}, "label": "PGD", "clean": 0.8, "robust": 0.5,
              "n": 50, "rows": rows, "sanity": {"verdict": "trustworthy (smooth_gradients not run)", "checks": checks}}
    (run / "eval-last" / "report.json").write_text(json.dumps(report))
    row = summarize(*read_report(run / "eval-last"))
    assert row["name"] == "run/eval-last" and row["train_s"] == 30.0
    assert (row["autoattack"], row["autoattack_n"], row["autoattack_stage"]) == (0.42, 40, "AutoAttack after square")
    assert row["sanity_not_run"] == 1
    assert "| 80.00 | 50.00 | 42.00 (40) | – | pass, 1 not run | 30 s |" in table([row])


def test_summary_plot_marks_the_runs_whose_masking_checks_failed(tmp_path, monkeypatch):
    """A masked run's point sits highest on the plot: its legend must say that its figure may overstate robustness."""
    from matplotlib.figure import Figure

    from robustlab.evaluate.summary import plot
    drawn = []
    monkeypatch.setattr(Figure, "savefig", lambda self, path, **kw: drawn.append(self))
    row = {"name": "a", "n": 100, "clean": 0.85, "attack": "PGD", "robust": 0.75, "autoattack": 0.74,
           "autoattack_n": 100, "sanity": "trustworthy"}
    masked = {**row, "name": "b", "robust": 0.9, "autoattack": 0.88, "sanity": "suspicious: gradients"}
    assert plot([row, masked], tmp_path / "p.png") == "AutoAttack"
    legend = [text.get_text() for text in drawn[0].axes[0].get_legend().get_texts()]
    assert legend == ["a", "b (masking suspected)"]


def test_eval_counts_beyond_the_data_and_an_l2_radius_beyond_the_images_are_refused(tmp_path, run_cli):
    """--n 100000 evaluated the 10,000 test images, --aa-n, --sanity-n and --sweep-n beyond --n took the --n images,
    and an L2 ε beyond the distance between an all-black and an all-white image (28 for 1×28×28) ran, each
    without a word; the ε sweep went beyond that distance too."""
    run = tmp_path / "run"
    trained = run_cli("train", "--data-dir", FMNIST, "--train-n", "64", "--val-n", "16", "--epochs", "1", "--steps",
                      "1", "--threads", "1", "--out", run)
    assert trained.returncode == 0, trained.stderr
    for extra, message in [
        (["--n", "10001"], "--n 10001 is more than the 10000 test images; give at most 10000, or leave out --n for "
                           "all of them"),
        (["--split", "val", "--n", "5001"], "--n 5001 is more than the 5000 validation images"),
        (["--n", "20", "--sweep-n", "21"], "--sweep-n 21 is more than the 20 test images evaluated (--n 20); give at "
                                           "most 20"),
        (["--sweep-n", "10001"], "--sweep-n 10001 is more than the 10000 test images evaluated; give at most 10000"),
        (["--n", "20", "--suite", "standard", "--aa-n", "21"], "--aa-n 21 is more than the 20 test images evaluated "
                                                               "(--n 20); give at most 20, or leave out --aa-n"),
        (["--n", "20", "--suite", "standard", "--sanity-n", "21"], "--sanity-n 21 is more than the 20 test images"),
        (["--norm", "l2", "--eps", "28.5"], "--eps 28.5: an L2 radius above 28 exceeds the distance between an "
                                            "all-black and an all-white 1×28×28 image"),
        (["--attack", "fgm", "--eps", "29"], "--eps 29: an L2 radius above 28"),
    ]:
        result = run_cli("eval", run, "--data-dir", FMNIST, "--threads", "1", *extra)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and message in lines[0], (extra, result.stderr)
    assert not (run / "report.json").exists()
    # at 28 itself it runs, and its sweep stops there (20 × 1.5 and 20 × 2 reach every image), as at 1 in L∞
    result = run_cli("eval", run, "--data-dir", FMNIST, "--threads", "1", "--norm", "l2", "--eps", "20", "--n", "8",
                     "--sweep-n", "8", "--steps", "1", "--restarts", "1")
    assert result.returncode == 0, result.stderr
    assert [e for e, _ in json.loads((run / "report.json").read_text())["sweep"]["points"]] == [0, 5, 10, 15, 20]
    assert run_cli("eval", run, "--data-dir", FMNIST, "--threads", "1", "--norm", "l2", "--eps", "28", "--n", "8",
                   "--sweep-n", "0", "--steps", "1", "--restarts", "1", "--out", tmp_path / "at28").returncode == 0


def test_summary_plot_under_a_file_says_it_cannot_make_the_folder(tmp_path, run_cli):
    """It said only "--plot .../file/p.png: File exists"."""
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "report.json").write_text('{"rows": [], "label": "PGD", "clean": 0.5, "robust": 0.3, "n": 10}')
    (tmp_path / "file").write_text("")
    result = run_cli("summary", tmp_path / "r", "--plot", tmp_path / "file" / "p.png")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"--plot {tmp_path / 'file'}: cannot make a folder there" in result.stderr
