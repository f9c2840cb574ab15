"""Fast-AT's published MNIST models as robustlab checkpoints: robustlab's attacks and training against a paper's own.

Wong, Rice & Kolter (2020, "Fast is better than free") released two trained MNIST models of their small network
(robustlab's `cnn-strided`) in github.com/locuslab/fast_adversarial, folder MNIST/models: `fgsm.pth`, FGSM
training from a random start (ε = 0.3, step 0.375, Adam with a cyclic learning rate up to 0.005, 10 epochs,
batch 100), and `pgd_madry.pth`, PGD-40 training with Madry et al.'s MNIST settings (step 0.01, Adam at a flat
1e-4, 100 epochs, batch 50). `import` turns such a state dict into a robustlab checkpoint, so that every
robustlab command evaluates it, and robustlab's own Fast-AT can be trained with the same recipe beside it:

    python experiments/fast_at_mnist.py import fgsm.pth --data-dir DIR --out runs/published/fgsm
    robustlab eval runs/published/fgsm --steps 50 --restarts 10 --step-size 0.01 --out runs/published/fgsm/pgd50x10

The file is read with `torch.load(weights_only=True)`, which rebuilds tensors and nothing else, so a .pth from
the web runs no code. These models take raw pixels in [0, 1]: the checkpoint's normalization is the identity
(mean 0, std 1). The data directory is recorded, as `robustlab train --data-dir` records it.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from robustlab import checkpoint
from robustlab.cli import OneLineParser
from robustlab.data import load_dataset
from robustlab.errors import RobustlabError, run_script
from robustlab.training.run import dataset_meta, model_from_meta

MODEL = "cnn-strided"


def import_state_dict(source, *, data_dir, out) -> Path:
    """Write `source` (a state dict of the reference `mnist_net`, an nn.Sequential) as OUT/best.safetensors."""
    source = Path(source)
    try:
        state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a file that is not a state dict
        raise RobustlabError(f"cannot read {source} as a PyTorch state dict ({str(exc).splitlines()[0]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RobustlabError(f"{source} holds no state dict of tensors")
    data = load_dataset("mnist", data_dir=data_dir, seed=0)
    dataset = {**dataset_meta(data, data_dir), "mean": (0.0,), "std": (1.0,)}  # the reference network reads raw pixels
    model = model_from_meta({"model": {"name": MODEL, "kwargs": {}}, "dataset": dataset})  # as load_model rebuilds it
    ours = model.net.state_dict()
    shapes = [tuple(t.shape) for t in state.values()], [tuple(t.shape) for t in ours.values()]
    if shapes[0] != shapes[1]:
        raise RobustlabError(f"{source} does not hold the {MODEL} layout: tensors {shapes[0]}, expected {shapes[1]}")
    model.net.load_state_dict(dict(zip(ours, state.values())))  # the same layers, in the same order
    meta = {"kind": "model", "epoch": None, "model": {"name": MODEL, "kwargs": {}}, "dataset": dataset,
            "method": {"name": "imported", "norm": "linf"},
            "source": {"file": source.name, "sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
                       "keys": list(state)}}
    out = Path(out)
    checkpoint.save(out / "best.safetensors", checkpoint.prefixed("model.", model.state_dict()), meta)
    return out / "best.safetensors"


def main():
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    i = sub.add_parser("import", help="a reference mnist_net state dict (.pth) as a robustlab checkpoint")
    i.add_argument("source", help="the .pth file, e.g. MNIST/models/fgsm.pth")
    i.add_argument("--data-dir", help="where the MNIST idx files are (recorded for `robustlab eval`)")
    i.add_argument("--out", required=True, help="run directory to write best.safetensors into")
    args = parser.parse_args()
    print(import_state_dict(args.source, data_dir=args.data_dir, out=args.out))


if __name__ == "__main__":
    raise SystemExit(run_script(main))
