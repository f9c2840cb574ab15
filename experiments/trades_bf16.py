"""TRADES's inner maximization under bf16 autocast: all steps in bf16, against fp32 and robustlab's mixed form.

    python experiments/trades_bf16.py --out runs/trades-bf16

TRADES climbs KL(p(x) ‖ p(x')) from x' = x + 0.001·N(0, 1). There the logits differ from the clean ones by less
than bf16 resolves, so a first step computed in bf16 follows rounding noise. This script trains a small
cnn-small with TRADES (3 epochs on 8,000 training images, bf16, seed 0; or reads `--checkpoint`), then on the
first 1,024 validation images runs the same 1-, 2- and 10-step KL-PGD from the same starts three ways: in fp32,
wholly in bf16 (robustlab's TRADES before commit 84fdc1f), and as robustlab's TRADES does it now under bf16
(first step and target in fp32). Each result is scored in fp32: the mean KL reached and the model's accuracy on
the examples (lower is a stronger attack). PGD-10 on the cross-entropy (PGD-AT's attack) is compared the same way.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from robustlab import checkpoint, load_model
from robustlab.attacks import make_threat, perturb
from robustlab.cli import OneLineParser, positive
from robustlab.data import load_dataset
from robustlab.errors import run_script
from robustlab.training import TrainConfig, build_trainer
from robustlab.training.methods import StepContext
from robustlab.training.trades import TRADES, kl_to_target


def bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def main(argv=None):
    parser = OneLineParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for the trained model and results.json")
    parser.add_argument("--checkpoint", help="a TRADES run to attack instead of training one")
    parser.add_argument("--n", type=positive(int), default=1024, help="validation images attacked")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds of the random starts")
    parser.add_argument("--threads", type=positive(int), default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    run = args.checkpoint
    if run is None:
        run = out / "trades"
        config = TrainConfig(epochs=3, train_n=8000, val_n=200, lr=0.05, threads=args.threads, precision="bf16")
        trainer = build_trainer(dataset="fashion-mnist", model="cnn-small", method="trades", out=run, config=config)
        trainer.resume()  # a run killed after an epoch goes on; a finished one trains no more
        trainer.fit()
    model = load_model(run, "last").eval()
    data = load_dataset("fashion-mnist", seed=0)
    x = data.val.subset(args.n).as_float().contiguous(memory_format=torch.channels_last)
    y = data.val.labels[:args.n]
    threat = make_threat("linf", 0.1, 0.025)  # the protocol's training attack: PGD-10, step 0.025
    with torch.no_grad():
        target = F.softmax(model(x), dim=1)

    def score(x_adv):
        with torch.no_grad():
            logits = model(x_adv)
        return {"kl": kl_to_target(logits, target).mean().item(), "acc": (logits.argmax(1) == y).float().mean().item()}

    rows = []
    for seed in args.seeds:
        start = x + 0.001 * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
        for steps in (1, 2, 10):
            fp32 = perturb(model, x, target, threat, steps, loss_fn=kl_to_target, x_init=start)
            with bf16():
                with torch.no_grad():
                    target_bf16 = F.softmax(model(x), dim=1)
                all_bf16 = perturb(model, x, target_bf16, threat, steps, loss_fn=kl_to_target, x_init=start)
                ctx = StepContext(model, model, None, torch.Generator().manual_seed(seed), bf16)
                mixed = TRADES(steps=steps).adversarial_examples(ctx, x, y)  # draws the same start
            rows.append({"attack": f"KL-PGD-{steps}", "seed": seed, "fp32": score(fp32), "bf16": score(all_bf16),
                         "robustlab": score(mixed)})
        ce_fp32 = perturb(model, x, y, threat, 10, generator=torch.Generator().manual_seed(seed))
        with bf16():
            ce_bf16 = perturb(model, x, y, threat, 10, generator=torch.Generator().manual_seed(seed))
        rows.append({"attack": "CE-PGD-10", "seed": seed, "fp32": score(ce_fp32), "bf16": score(ce_bf16)})
    for r in rows:
        line = f"{r['attack']:>10} seed {r['seed']}: " + " | ".join(
            f"{k} KL {r[k]['kl']:.4f} acc {r[k]['acc']:.1%}" for k in ("fp32", "bf16", "robustlab") if k in r)
        print(line)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint.write_json(out / "results.json", {"checkpoint": str(run), "n": args.n, "rows": rows})


if __name__ == "__main__":
    sys.exit(run_script(main))
