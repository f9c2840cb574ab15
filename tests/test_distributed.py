"""torchrun with two CPU processes (gloo): sharded evaluation and DDP training give the one-process results."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

FMNIST = "/usr/share/datasets/fashion-mnist"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, nproc=2, timeout=600):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout)


def failure(proc) -> str:
    """What a failed run said: its error-like lines first (the cause of a rank's abort can sit far above
    torchrun's closing summary, and progress bars fill the space between), then the end of stderr."""
    lines = [line.rsplit("\r", 1)[-1] for line in proc.stderr.splitlines()]
    causes = [line for line in lines if re.search(r"error|exception|abort|terminate|signal", line, re.I)]
    return "\n".join(causes[-40:]) + "\n--- end of stderr ---\n" + "\n".join(lines)[-3000:]


class SimulatedRanks:
    """Ranks run one after another in this process: `active`, `rank` and `world_size` as rank r of W sees them, and
    torch.distributed's all_reduce replaced by one that keeps what each rank sends (a real SUM all-reduce returns the
    sum of the ranks' tensors) and reduces it with `others`, the other ranks' tensor, as SUM or MAX would."""

    def __init__(self, monkeypatch, world, others=None):
        import torch.distributed as dist
        from robustlab import distributed
        self.sent, self.rank, self.others = [], 0, others
        monkeypatch.setattr(distributed, "active", lambda: True)
        monkeypatch.setattr(distributed, "world_size", lambda: world)
        monkeypatch.setattr(distributed, "rank", lambda: self.rank)
        monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
        monkeypatch.setattr(dist, "all_reduce", self.all_reduce)

    def all_reduce(self, tensor, op=None, group=None, async_op=False):
        import torch.distributed as dist
        op = dist.ReduceOp.SUM if op is None else op
        self.sent.append((self.rank, tensor.clone(), op))
        if self.others is not None:
            tensor.copy_(tensor + self.others if op == dist.ReduceOp.SUM else torch.maximum(tensor, self.others))
        done = torch.futures.Future()
        done.set_result([tensor])

        class Work:
            def get_future(self):
                return done
        return Work() if async_op else None


class Bucket:
    """What DDP hands a communication hook: its flat gradient buffer."""

    def __init__(self, grad):
        self.grad = grad

    def buffer(self):
        return self.grad


@pytest.mark.parametrize("n, ranks", [(10, 3), (7, 2), (11, 4), (64, 4)])
def test_ranks_shares_of_a_batch_cover_it_once_and_their_weights_give_the_batch_mean(n, ranks, monkeypatch):
    """Without processes: each rank's slice and weight as rank r of `ranks` computes them."""
    from robustlab import distributed
    simulated, slices = SimulatedRanks(monkeypatch, ranks), []
    for r in range(ranks):
        simulated.rank = r
        slices.append(distributed.my_slice(n))
    assert [i for part in slices for i in range(n)[part]] == list(range(n))  # every example once, in order
    assert max(len(range(n)[p]) for p in slices) - min(len(range(n)[p]) for p in slices) <= 1
    # DDP sums weight·(rank's mean)/W over ranks: that must be the mean over the batch's examples, which a plain
    # mean of the ranks' means is not when W does not divide n
    values = torch.arange(n, dtype=torch.float64) ** 2
    share, total = distributed.BatchShare(), 0.0
    for part in slices:
        share.set(len(values[part]), n)
        total += share.weight * values[part].mean().item() / ranks
    assert total == pytest.approx(values.mean().item(), rel=1e-12)


@pytest.mark.parametrize("sizes", [(2, 2), (1, 2), (3, 3, 4)])
def test_ranks_gradients_reduce_to_the_mean_over_the_global_batch(sizes, monkeypatch):
    """Each rank holds the mean gradient of its share; DDP's hook and `average_gradients` (the models DDP does not
    see) scale it so that the SUM all-reduce gives the mean over all the batch's examples, however it was shared."""
    from robustlab import distributed
    n = sum(sizes)
    examples = torch.arange(1.0, n + 1, dtype=torch.float64) ** 2  # each example's gradient (one coordinate)
    parts = examples.split(list(sizes))
    ranks = SimulatedRanks(monkeypatch, len(sizes))
    share = distributed.BatchShare()
    for r, part in enumerate(parts):
        ranks.rank = r
        share.set(len(part), n)
        hooked = distributed.weighted_mean_hook(share, Bucket(part.mean().reshape(1))).wait()
        assert torch.equal(hooked, ranks.sent[-1][1])  # the hook's future gives DDP the reduced buffer
        param = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
        param.grad = part.mean().reshape(1)
        distributed.average_gradients([param, torch.nn.Parameter(torch.zeros(1))], share)  # a parameter without .grad
    assert [rank for rank, _, _ in ranks.sent] == [r for r in range(len(sizes)) for _ in range(2)]
    assert all(op == torch.distributed.ReduceOp.SUM for _, _, op in ranks.sent)
    for kind in (0, 1):  # the hook's, then average_gradients'
        total = sum(t for i, (_, t, _) in enumerate(ranks.sent) if i % 2 == kind)
        assert total.item() == pytest.approx(examples.mean().item(), rel=1e-12)


def test_all_sum_and_all_max_reduce_in_place_with_their_operation(monkeypatch):
    from robustlab import distributed
    SimulatedRanks(monkeypatch, 2, others=torch.tensor([5.0, 1.0, 0.0]))
    t = torch.tensor([1.0, 2.0, 3.0])
    assert distributed.all_sum(t) is t and t.tolist() == [6.0, 3.0, 3.0]
    t = torch.tensor([1.0, 2.0, 3.0])
    assert distributed.all_max(t) is t and t.tolist() == [5.0, 2.0, 3.0]


def test_before_the_group_is_joined_torchruns_variables_give_the_rank_and_the_processes(monkeypatch):
    """A Trainer made before `init` (the Python API) checks its data against the processes to come, and a download
    shows its progress bar on rank 0 alone."""
    from robustlab import distributed
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert not distributed.active() and distributed.planned_world_size() == 2 and not distributed.is_main()
    monkeypatch.setenv("RANK", "0")
    assert distributed.is_main()
    monkeypatch.delenv("RANK")  # not started by torchrun: one process
    assert distributed.planned_world_size() == 1 and distributed.is_main()


def test_a_script_that_never_calls_shutdown_leaves_no_process_group_at_exit(tmp_path):
    """The Python API under torchrun: `distributed.init()` registers the group's teardown with atexit, so a script
    that ends without `shutdown()` does not exit with gloo running (a rank once aborted there under load). The
    check is registered first, so it runs after robustlab's handler."""
    script = tmp_path / "no_shutdown.py"
    script.write_text(textwrap.dedent("""
        import atexit, os, sys
        import torch.distributed as dist
        from robustlab import distributed
        out = f"{sys.argv[1]}.{os.environ['RANK']}"
        atexit.register(lambda: open(out, "w").write(str(dist.is_initialized())))
        distributed.init()
        assert dist.is_initialized() and distributed.world_size() == 2
    """))
    done = torchrun(str(script), str(tmp_path / "alive"))
    assert done.returncode == 0, failure(done)
    assert [(tmp_path / f"alive.{r}").read_text() for r in (0, 1)] == ["False", "False"]


def robustlab(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "robustlab", *args], capture_output=True, text=True, env=ENV,
                          timeout=timeout)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, fmnist):
    run = tmp_path_factory.mktemp("ddp") / "run"
    done = robustlab("train", "--data-dir", FMNIST, "--train-n", "512", "--val-n", "50", "--epochs", "1",
                     "--steps", "3", "--threads", "1", "--out", str(run))
    assert done.returncode == 0, failure(done)
    return run


def test_sharded_pgd_evaluation_counts_exactly_as_one_process(tiny_run):
    # --subset, not --n: torchrun's own argument parser takes --n for an abbreviation of its options
    args = ["eval", str(tiny_run), "--data-dir", FMNIST, "--subset", "300", "--batch-size", "40", "--steps", "5",
            "--restarts", "2", "--sweep-n", "0", "--json", "--threads", "1"]
    single = robustlab(*args)
    assert single.returncode == 0, failure(single)
    sharded = torchrun("-m", "robustlab", *args)
    assert sharded.returncode == 0, failure(sharded)
    one, two = json.loads(single.stdout), json.loads(sharded.stdout.strip().splitlines()[-1])
    assert (two["clean"], two["robust"], two["n"]) == (one["clean"], one["robust"], one["n"])
    assert 0 < one["robust"] < one["clean"]


def test_sharded_transfer_evaluation_counts_exactly_as_one_process(tiny_run):
    args = ["eval", str(tiny_run), "--transfer-from", str(tiny_run / "last.safetensors"), "--data-dir", FMNIST,
            "--subset", "300", "--batch-size", "40", "--steps", "5", "--restarts", "1", "--json", "--threads", "1"]
    single = robustlab(*args)
    assert single.returncode == 0, failure(single)
    sharded = torchrun("-m", "robustlab", *args)
    assert sharded.returncode == 0, failure(sharded)
    one, two = json.loads(single.stdout), json.loads(sharded.stdout.strip().splitlines()[-1])
    assert one == {**two, "wall_s": one["wall_s"]}
    assert 0 < one["white_box"] <= one["transfer"] and one["transfer_only"] == 0  # the source is the model itself


def test_sharded_autoattack_matches_one_process(tiny_run, tmp_path):
    from robustlab import load_model
    from robustlab.attacks import autoattack_accuracy
    from robustlab.data import load_dataset

    settings = dict(eps=0.1, n=70, batch_size=16, steps=4, queries=30, progress=False)
    worker = tmp_path / "worker.py"
    worker.write_text(textwrap.dedent(f"""
        import json, sys, torch
        from robustlab import distributed, load_model
        from robustlab.attacks import autoattack_accuracy
        from robustlab.data import load_dataset
        distributed.init()
        torch.set_num_threads(1)
        model = load_model({str(tiny_run)!r})
        data = load_dataset("fashion-mnist", data_dir={FMNIST!r})
        result = autoattack_accuracy(model, data.test, state_path={str(tmp_path / 'state.safetensors')!r}, **{settings!r})
        if distributed.is_main():
            json.dump({{"broken_by": result.broken_by.tolist(), "stages": result.stage_accuracy,
                        "adv_sum": result.x_adv.double().sum().item()}}, open(sys.argv[1], "w"))
        distributed.shutdown()
    """))
    done = torchrun(str(worker), str(tmp_path / "out.json"))
    assert done.returncode == 0, failure(done)
    sharded = json.loads((tmp_path / "out.json").read_text())

    torch.set_num_threads(1)
    model = load_model(tiny_run)
    one = autoattack_accuracy(model, load_dataset("fashion-mnist", data_dir=FMNIST).test, **settings)
    assert sharded["broken_by"] == one.broken_by.tolist()
    assert sharded["stages"] == one.stage_accuracy
    assert sharded["adv_sum"] == pytest.approx(one.x_adv.double().sum().item(), rel=1e-9)
    assert len(list(tmp_path.glob("state.rank*of2.safetensors"))) == 2  # one resumable state per rank


TRAIN = ["train", "--data-dir", FMNIST, "--train-n", "384", "--val-n", "40", "--batch-size", "64", "--steps", "2",
         "--augment", "none", "--threads", "1"]


def _weights(run, name="last.safetensors"):
    from robustlab import checkpoint
    tensors, _ = checkpoint.load(run / name)
    return {k: v for k, v in tensors.items() if k.startswith("model.")}


def _one_process_and_ddp_agree(script, tmp_path):
    """Run `script OUT` in one process (OUT = tmp_path/one) and under torchrun with two (tmp_path/two); the final
    weights must agree."""
    single = subprocess.run([sys.executable, str(script), str(tmp_path / "one")], capture_output=True, text=True, env=ENV)
    assert single.returncode == 0, failure(single)
    ddp = torchrun(str(script), str(tmp_path / "two"))
    assert ddp.returncode == 0, failure(ddp)
    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5, msg=k)


def _train_script(tmp_path, method, extra, batch_size=64, train_n=384):
    """Training through the Python API: `random_start=False` is not a CLI option."""
    script = tmp_path / f"train_{method}.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        from robustlab.training import TrainConfig, build_trainer
        config = TrainConfig(epochs=1, batch_size={batch_size}, train_n={train_n}, val_n=40, augment="none", threads=1)
        trainer = build_trainer(dataset="fashion-mnist", model="cnn-small", method={method!r}, out=sys.argv[1],
                                data_dir={FMNIST!r}, config=config, show_progress=False,
                                method_kwargs=dict(steps=2, random_start=False, **{extra!r}))
        trainer.fit()
    """))
    return script


def test_ddp_training_equals_one_process_on_the_full_batch(tmp_path, fmnist):
    """Two ranks with 32 images each per step, gradients averaged, = one process with the 64-image batch.
    Without random starts: with them, each rank draws its own noise (equal in distribution only)."""
    script = _train_script(tmp_path, "pgd-at", {})
    _one_process_and_ddp_agree(script, tmp_path)
    metrics = [json.loads(l) for l in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1  # rank 0 alone writes


def test_ddp_training_weights_uneven_shares_of_a_batch_by_their_size(tmp_path, fmnist):
    """195 images in batches of 64 leave a last batch of 3, shared 1 / 2: DDP's mean of the ranks' means gave the
    one image twice the weight of each of the two (3.5e-3 from one process in the weights)."""
    script = _train_script(tmp_path, "pgd-at", {}, batch_size=64, train_n=195)
    _one_process_and_ddp_agree(script, tmp_path)


def test_ddp_text_training_shares_each_batch_out_like_images(tmp_path):
    """Token ids are held in memory like an ImageSet: each rank trains on its half of every batch (they were once
    treated as a streamed Dataset, and every rank trained on the whole batch). No dropout, so it is exact."""
    from test_text import fake_package_lists
    from robustlab.text.corpus import build_corpus
    build_corpus(tmp_path / "debian-packages.tsv", top=3, package_lists=fake_package_lists(60))
    script = tmp_path / "train_text.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        from robustlab.text.training import build_text_trainer
        from robustlab.training import TrainConfig
        config = TrainConfig(epochs=1, batch_size=32, train_n=96, val_n=16, threads=1)
        build_text_trainer(out=sys.argv[1], data_dir={str(tmp_path)!r}, model="textcnn", method="standard",
                           model_kwargs={{"dropout": 0.0}}, config=config, show_progress=False).fit()
    """))
    _one_process_and_ddp_agree(script, tmp_path)


def test_awp_weight_perturbation_under_ddp_is_the_full_batch_one(tmp_path):
    """AWP's proxy is not DDP-wrapped: its gradients are all-reduced by hand. One proxy step on two halves
    must give the perturbation of one process on the whole batch. (Whole AWP runs drift apart by ~1e-4:
    sign-based PGD steps amplify the float differences of a different summation order.)"""
    script = tmp_path / "awp.py"
    script.write_text(textwrap.dedent(f"""
        import contextlib, sys, torch
        from safetensors.torch import save_file
        from robustlab import distributed
        from robustlab.models import build_model
        from robustlab.training.awp import PGDATAWP
        from robustlab.training.methods import StepContext
        distributed.init()
        torch.manual_seed(0)
        model = build_model("cnn-small", (1, 28, 28), 10, [0.5], [0.25])
        x, y = torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,))
        x_adv = (x + 0.1 * torch.rand_like(x).sign()).clamp(0, 1)
        part = distributed.my_slice(64)
        method = PGDATAWP(steps=1, awp_warmup=0)
        ctx = StepContext(model, model, None, torch.Generator(), contextlib.nullcontext)
        v = method.weight_perturbation(ctx, x[part], x_adv[part], y[part])
        if distributed.is_main():
            save_file({{k: t.contiguous() for k, t in v.items()}}, sys.argv[1])
        distributed.shutdown()
    """))
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one.safetensors")], capture_output=True, text=True, env=ENV)
    assert one.returncode == 0, failure(one)
    two = torchrun(str(script), str(tmp_path / "two.safetensors"))
    assert two.returncode == 0, failure(two)
    from safetensors.torch import load_file
    v1, v2 = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    assert v1.keys() == v2.keys() and len(v1) >= 4
    for k in v1:
        torch.testing.assert_close(v2[k], v1[k], rtol=1e-4, atol=1e-6)


def test_killed_ddp_run_resumes_to_the_uninterrupted_result(tmp_path, fmnist):
    import signal
    import time

    args = [*TRAIN, "--epochs", "3"]
    full = torchrun("-m", "robustlab", *args, "--out", str(tmp_path / "full"))
    assert full.returncode == 0, failure(full)

    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "robustlab", *args, "--out", str(run)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not ((run / "metrics.jsonl").exists()
                                          and (run / "metrics.jsonl").read_text().count("\n") >= 1):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job, mid-epoch 2, as a machine failure would
    proc.wait()
    assert (run / "metrics.jsonl").read_text().count("\n") < 3, "the run finished before it could be killed"
    resumed = torchrun("-m", "robustlab", *args, "--out", str(run), "--resume")
    assert resumed.returncode == 0, failure(resumed)
    for k, v in _weights(tmp_path / "full").items():
        torch.testing.assert_close(_weights(run)[k], v, rtol=0, atol=0, msg=k)


def test_free_at_replays_under_ddp_equal_one_process_on_the_full_batch(tmp_path, fmnist):
    """FreeAT's m replays each take one DDP backward (parameter gradients averaged, input gradients per
    example) and carry δ between replays and minibatches: two ranks must follow one process exactly."""
    script = tmp_path / "free.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        from robustlab.training import TrainConfig, build_trainer
        config = TrainConfig(epochs=3, batch_size=64, train_n=256, val_n=40, augment="none", threads=1)
        build_trainer(dataset="fashion-mnist", model="cnn-small", method="free-at", out=sys.argv[1], data_dir={FMNIST!r},
                      config=config, show_progress=False, method_kwargs=dict(replays=3)).fit()
    """))
    _one_process_and_ddp_agree(script, tmp_path)


def test_an_early_stop_ends_training_on_every_rank(tmp_path, fmnist):
    """A method's stop (Fast-AT's overfitting check) is computed on every rank: every rank must leave the loop, not
    rank 0 alone while the others train on into a collective that no partner joins."""
    script = tmp_path / "stop.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        from robustlab.training import TrainConfig, build_trainer
        from robustlab.training.methods import Standard
        Standard.should_stop = lambda self, metrics, best: "enough" if metrics["epoch"] == 0 else None
        config = TrainConfig(epochs=3, batch_size=64, train_n=256, val_n=40, augment="none", threads=1)
        last = build_trainer(dataset="fashion-mnist", model="cnn-small", method="standard", out=sys.argv[1],
                             data_dir={FMNIST!r}, config=config, show_progress=False).fit()
        open(f"{{sys.argv[1]}}.rank{{os.environ['RANK']}}", "w").write(str(last["epoch"]))
    """))
    done = torchrun(str(script), str(tmp_path / "run"), timeout=300)
    assert done.returncode == 0, failure(done)
    assert [(tmp_path / f"run.rank{r}").read_text() for r in (0, 1)] == ["0", "0"]
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == 1


def test_a_last_batch_smaller_than_the_ranks_is_skipped(tmp_path, fmnist):
    """129 images in batches of 128 leave one image for two ranks: the rank with none had a NaN loss, which stopped
    the run as diverged (and would have put NaN into every weight through DDP's averaging)."""
    run = tmp_path / "run"
    done = torchrun("-m", "robustlab", "train", "--data-dir", FMNIST, "--train-n", "129", "--val-n", "40",
                    "--batch-size", "128", "--epochs", "1", "--augment", "none", "--threads", "1", "--method",
                    "standard", "--out", str(run))
    assert done.returncode == 0, failure(done)
    assert all(torch.isfinite(w).all() for w in _weights(run).values())


def test_ranks_validate_and_save_the_same_batchnorm_statistics(tmp_path, fmnist):
    """DDP broadcasts buffers before each forward, so after an epoch each rank's BatchNorm statistics include its
    own last batch; validation (shared out over the ranks) must use rank 0's, the ones saved."""
    script = tmp_path / "bn.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys, torch
        from robustlab.training import TrainConfig, build_trainer
        config = TrainConfig(epochs=1, batch_size=64, train_n=128, val_n=16, augment="none", threads=1)
        trainer = build_trainer(dataset="fashion-mnist", model="preact-resnet18-small", method="standard",
                                out=sys.argv[1], data_dir={FMNIST!r}, config=config, show_progress=False,
                                model_kwargs=dict(width=4))
        trainer.fit()
        stats = [b.double().sum().item() for b in trainer.model.buffers() if b.is_floating_point()]
        open(f"{{sys.argv[1]}}.rank{{os.environ['RANK']}}", "w").write(repr(stats))
    """))
    done = torchrun(str(script), str(tmp_path / "run"))
    assert done.returncode == 0, failure(done)
    rank0, rank1 = ((tmp_path / f"run.rank{r}").read_text() for r in (0, 1))
    assert rank0 == rank1


@pytest.mark.parametrize("method, options", [
    ("fast-at", []), ("yopo", ["--outer", "2", "--inner", "2"]),
    ("yopo", ["--outer", "2", "--inner", "2", "--first-layer-grad", "hamiltonian"]), ("trades", ["--steps", "2"]),
    ("mart", ["--steps", "2"]), ("trades-awp", ["--steps", "2", "--awp-warmup", "0"]),
    ("generalist", ["--steps", "2"])])
def test_every_method_trains_under_torchrun(tmp_path, fmnist, method, options):
    """Each method's own collective steps (YOPO's Hamiltonian first-layer gradient, AWP's proxy, Generalist's natural
    learner) must run under two ranks, rank 0 alone writing, and learn something."""
    run = tmp_path / method
    args = ["train", "--data-dir", FMNIST, "--train-n", "512", "--val-n", "40", "--batch-size", "64",
            "--epochs", "2", "--augment", "none", "--threads", "1", "--method", method, *options, "--out", str(run)]
    done = torchrun("-m", "robustlab", *args)
    assert done.returncode == 0, failure(done)
    metrics = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and metrics[-1]["val_clean"] > 0.3, metrics
    assert json.loads((run / "config.json").read_text())["world_size"] == 2
    assert (run / "best.safetensors").exists()


@pytest.mark.parametrize("method", ["pgd", "freelb"])
def test_text_methods_train_under_torchrun(tmp_path, method):
    """Embedding-space attacks take input gradients through the plain module while the parameter update
    goes through DDP: two ranks must train, and rank 0 alone write."""
    from test_text import fake_package_lists

    from robustlab.text.corpus import build_corpus
    build_corpus(tmp_path / "debian-packages.tsv", top=3, package_lists=fake_package_lists(60))
    run = tmp_path / "run"
    done = torchrun("-m", "robustlab", "train", "--task", "text", "--data-dir", str(tmp_path), "--method", method,
                    "--steps", "2", "--epochs", "3", "--batch-size", "32", "--optimizer", "adam", "--lr", "0.01",
                    "--weight-decay", "0", "--val-n", "13", "--threads", "1", "--out", str(run))
    assert done.returncode == 0, failure(done)
    metrics = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 3 and metrics[-1]["val_clean"] > 0.5, metrics
    # its evaluation shares the texts out over the ranks (every rank did all of them once) and counts exactly
    args = ["eval", str(run), "--batch-size", "8", "--steps", "5", "--sweep-n", "0", "--json", "--threads", "1"]
    single, sharded = robustlab(*args), torchrun("-m", "robustlab", *args)
    assert single.returncode == 0 and sharded.returncode == 0, (single.stderr + sharded.stderr)[-3000:]
    one, two = json.loads(single.stdout), json.loads(sharded.stdout.strip().splitlines()[-1])
    assert (two["clean"], two["robust"], two["n"]) == (one["clean"], one["robust"], one["n"])
    assert one["n"] > 8 and one["robust"] < one["clean"]


def test_rift_and_mrc_refuse_torchrun_once(tmp_path, fmnist):
    """They never joined the group: every rank ran the whole of RiFT and wrote the same files."""
    run = tmp_path / "robust"
    done = robustlab("train", "--data-dir", FMNIST, "--model", "cnn-small", "--train-n", "64", "--val-n", "20",
                     "--epochs", "1", "--steps", "1", "--threads", "1", "--out", str(run))
    assert done.returncode == 0, failure(done)
    for command in ("rift", "mrc"):
        args = ("--out", str(tmp_path / "rift")) if command == "rift" else ()
        proc = torchrun("-m", "robustlab", command, str(run), *args, "--threads", "1", timeout=120)
        said = [line for line in proc.stderr.splitlines() if f"robustlab {command} runs in one process" in line]
        assert proc.returncode != 0 and len(said) == 1, failure(proc)
    assert not (tmp_path / "rift").exists()


def test_bad_input_met_after_the_options_is_said_once(tmp_path, fmnist):
    """Every rank joined the group before reading its input, so every rank reported the same missing run, and a
    batch smaller than the ranks ended in a ZeroDivisionError after an epoch of skipped batches."""
    proc = torchrun("-m", "robustlab", "eval", str(tmp_path / "missing"), "--subset", "10", timeout=120)
    said = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode != 0 and len(said) == 1 and "robustlab: error:" in said[0], failure(proc)
    proc = torchrun("-m", "robustlab", "train", "--data-dir", FMNIST, "--batch-size", "1", "--train-n", "8",
                    "--epochs", "1", "--out", str(tmp_path / "x"), timeout=120)
    said = [line for line in proc.stderr.splitlines() if "batch size 1 is smaller than the 2 torchrun processes" in line]
    assert proc.returncode != 0 and len(said) == 1, failure(proc)


def test_an_error_one_rank_alone_meets_names_its_rank(tmp_path, fmnist):
    """A node without its copy of the data: rank 1 exited 2 and said nothing once ranks read their data before
    joining the group (other ranks' errors were printed only from inside the group)."""
    script = tmp_path / "one_rank.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        from robustlab.cli import main
        data = {FMNIST!r} if os.environ["RANK"] == "0" else {str(tmp_path / "no-data")!r}
        sys.exit(main(["train", "--data-dir", data, "--train-n", "64", "--epochs", "1", "--threads", "1",
                       "--out", sys.argv[1]]))
    """))
    proc = torchrun(str(script), str(tmp_path / "run"), timeout=180)
    said = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode != 0 and len(said) == 1 and said[0].startswith("robustlab (rank 1): error: fashion-mnist "
                                                                          "not found"), failure(proc)


def test_an_option_error_under_torchrun_is_said_once(tmp_path):
    """Every rank checks the options and every rank printed the same error, argparse's own included."""
    proc = torchrun("-m", "robustlab", "train", "--method", "free-at", "--steps", "3", "--out", str(tmp_path / "x"),
                    timeout=120)
    said = [line for line in proc.stderr.splitlines() if "error: --method free-at takes no --steps" in line]
    assert proc.returncode != 0 and len(said) == 1, failure(proc)
    proc = torchrun("-m", "robustlab", "train", "--epoch", "x", "--out", str(tmp_path / "x"), timeout=120)
    said = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode != 0 and len(said) == 1 and said[0].startswith("robustlab: error: argument --epochs"), \
        failure(proc)
