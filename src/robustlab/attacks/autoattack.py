"""AutoAttack-standard (Croce & Hein, ICML 2020): APGD-CE, APGD-T, FAB-T and Square, in this order.

Each attack runs only on the examples that every earlier one left classified correctly, so an example
counts as robust only if it withstands all attacks so far, and the reported accuracy can only go down
from stage to stage. Defaults are the published ones: 100 iterations for
APGD and FAB, 9 target classes for APGD-T and FAB-T (fewer when the model has fewer classes), 5000
queries and p_init = 0.8 for Square, one run each.

Long evaluations can be resumed: with `state_path`, the robust mask and the adversarial examples
found so far are written (safetensors + JSON, no pickle) after every (stage, batch), and a later call
with the same arguments continues where the last one stopped. Every batch of every stage draws its
randomness from its own generator, seeded from (seed, stage, batch), so a resumed evaluation gives the
same result as an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from robustlab import checkpoint, distributed
from robustlab.attacks.apgd import apgd_attack, check_attack_args, check_targets, min_classes
from robustlab.attacks.fab import fab_targeted_attack
from robustlab.attacks.pgd import attack_mode
from robustlab.attacks.square import square_attack
from robustlab.attacks.threat import check_batch, check_labels, within_ball
from robustlab.data.datasets import images_and_labels
from robustlab.errors import RobustlabError, check_choice, check_integer
from robustlab.models import model_device

STAGES = ("clean", "apgd-ce", "apgd-t", "fab-t", "square")
VERSIONS = ("standard",)
ROBUST = -1  # broken_by value of an example that no stage broke


@dataclass
class AutoAttackResult:
    """What an AutoAttack evaluation found.

    x_adv: per example, the adversarial input of the stage that broke it, else the clean input.
    broken_by: int8 per example, the index in STAGES of the stage that broke it (0 = misclassified
    without attack), or -1 (ROBUST). stage_accuracy: accuracy after each stage, in STAGES order.
    """
    x_adv: torch.Tensor
    broken_by: torch.Tensor
    stage_accuracy: dict[str, float]
    seconds: dict[str, float]
    config: dict = field(default_factory=dict)

    @property
    def robust(self) -> torch.Tensor:
        return self.broken_by == ROBUST

    @property
    def clean_accuracy(self) -> float:
        return self.stage_accuracy["clean"]

    @property
    def robust_accuracy(self) -> float:
        return self.stage_accuracy[STAGES[-1]]

    def broken_by_names(self) -> list[str | None]:
        """Per example, the name of the stage that broke it, or None if it stayed robust."""
        return [None if int(b) == ROBUST else STAGES[int(b)] for b in self.broken_by]

    def summary(self) -> str:
        c = self.config
        stages = " → ".join(f"{k} {v:.2%}" for k, v in self.stage_accuracy.items())
        budget = "" if (c.get("steps"), c.get("queries")) == (100, 5000) else \
            f" [off-protocol budget: steps={c.get('steps')}, queries={c.get('queries')}]"
        return f"AutoAttack-{c.get('version')} {c.get('norm')} ε={c.get('eps')} on {len(self.broken_by)} examples" \
               f"{budget}: {stages} ({sum(self.seconds.values()):.0f} s)"


def _stage_seed(seed: int, stage: int, batch: int) -> int:
    return ((seed * len(STAGES) + stage) << 24 | batch) & (2 ** 63 - 1)


def _fingerprint(x: torch.Tensor, y: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update(x.detach().cpu().contiguous().numpy().tobytes())
    h.update(y.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class _State:
    """Progress of one evaluation: the next (stage, batch) to run and everything found so far."""

    def __init__(self, x: torch.Tensor, config: dict, path, replace_other: bool = False):
        self.path = Path(path) if path is not None else None
        self.replace_other = replace_other
        self.config = config
        self.x_adv = x.clone()
        self.broken_by = torch.full((len(x),), ROBUST, dtype=torch.int8, device=x.device)
        self.stage, self.batch = 0, 0
        self.stage_accuracy: dict[str, float] = {}
        self.seconds = {s: 0.0 for s in STAGES}
        if self.path is not None:
            # of an evaluation killed while saving
            checkpoint.remove_stale_temporaries(self.path.parent, [self.path.name, self.path.with_suffix(".json").name])
            if self.path.exists():
                self._load()

    def _load(self):
        tensors, meta = _load_state(self.path)
        if meta["config"] != self.config:
            diff = sorted(k for k in set(meta["config"]) | set(self.config) if meta["config"].get(k) != self.config.get(k))
            if self.replace_other:  # overwritten by this evaluation's first save
                if distributed.is_main():
                    tqdm.write(f"{self.path} held another evaluation (it differs in {', '.join(diff)}); "
                               "AutoAttack starts afresh", file=sys.stderr)
                return
            raise RobustlabError(f"{self.path} holds the state of a different evaluation (differs in {', '.join(diff)}); "
                                 "delete it or pass another state path")
        index = tensors["adv_index"].to(self.x_adv.device)
        self.x_adv[index] = tensors["adv_rows"].to(self.x_adv)
        self.broken_by = tensors["broken_by"].to(self.broken_by.device)
        self.stage, self.batch = meta["stage"], meta["batch"]
        # JSON keeps keys sorted; put the stages back in their order.
        self.stage_accuracy = {s: meta["stage_accuracy"][s] for s in STAGES if s in meta["stage_accuracy"]}
        self.seconds = {s: meta["seconds"].get(s, 0.0) for s in STAGES}

    def save(self):
        if self.path is None:
            return
        # Only rows that an attack changed need storing; every other row of x_adv is the clean input.
        index = (self.broken_by > 0).nonzero().squeeze(1)
        tensors = {"broken_by": self.broken_by, "adv_index": index, "adv_rows": self.x_adv[index]}
        checkpoint.save(self.path, tensors, {"kind": "autoattack-state", "config": self.config, "stage": self.stage,
                                             "batch": self.batch, "stage_accuracy": self.stage_accuracy,
                                             "seconds": self.seconds})


def _load_state(path) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, meta = checkpoint.load(path)
    if meta.get("kind") != "autoattack-state":
        raise RobustlabError(f"{path} is a robustlab checkpoint but not an AutoAttack state")
    return tensors, meta


def load_finished_state(path, model=None, x=None, y=None) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors (broken_by, adv_index, adv_rows) and metadata of a state file whose evaluation ran to the end;
    given the model and the images (x in [0, 1], its first config["n"]) it is read against, checked to be theirs."""
    tensors, meta = _load_state(path)
    if meta["stage"] != len(STAGES):
        raise RobustlabError(f"{path} is unfinished (stage {meta['stage']} of {len(STAGES)}); run it to the end")
    check_state_belongs(path, meta, model, x, y)
    return tensors, meta


def check_state_belongs(path, meta: dict, model=None, x=None, y=None) -> None:
    """A state's metadata (`meta`) checked to be of `model`'s weights (states written before they were recorded
    pass) and of the first config["n"] of the images x (in [0, 1]) with labels y."""
    config = meta["config"]
    if model is not None and config.get("model", digest := checkpoint.weights_digest(model)) != digest:
        raise RobustlabError(f"{path} is the AutoAttack state of another model's weights")
    if x is not None and _fingerprint(x[:config["n"]], y[:config["n"]].long()) != config["data"]:
        raise RobustlabError(f"{path} is the AutoAttack state of other images than the first {config['n']} given")


def _attacks(eps, norm, n_target_classes, steps, queries) -> dict:
    """The four members with AutoAttack-standard's settings; each maps (model, x, y, generator) to (x_adv, fooled)."""
    return {
        "apgd-ce": partial(apgd_attack, eps=eps, norm=norm, steps=steps, loss="ce"),
        "apgd-t": partial(apgd_attack, eps=eps, norm=norm, steps=steps, loss="dlr-targeted",
                          n_target_classes=n_target_classes),
        "fab-t": partial(fab_targeted_attack, eps=eps, norm=norm, steps=steps, n_target_classes=n_target_classes),
        "square": partial(square_attack, eps=eps, norm=norm, queries=queries, p_init=0.8),
    }


def _check_inputs(model, x, y, eps, norm, batch_size):
    check_attack_args(eps, norm, steps=1)
    if batch_size < 1:
        raise RobustlabError(f"batch_size must be >= 1, got {batch_size}")
    if x.dim() != 4:
        raise RobustlabError(f"AutoAttack needs images N×C×H×W, got shape {tuple(x.shape)}")
    return check_batch(x, y, model=model)


def autoattack(model, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str = "linf", version: str = "standard",
               n_target_classes: int = 9, seed: int = 0, batch_size: int = 250, progress: bool | None = True,
               state_path=None, replace_other_state: bool = False, steps: int = 100,
               queries: int = 5000) -> AutoAttackResult:
    """AutoAttack-standard on a batch of float images in [0, 1].

    batch_size: examples per attack call (robust ones only are attacked, so later stages run
    smaller batches). progress: tqdm bars per stage (None: only on a terminal).
    state_path: a .safetensors file to resume from and to save progress to after every batch; one holding another
    evaluation (other settings, images or model weights) is an error, or replaced with `replace_other_state`.
    steps / queries: APGD and FAB iterations / Square queries; anything but 100 / 5000 is off-protocol
    and meant for quick checks. n_target_classes is capped at num_classes − 1.
    """
    check_choice("version", version, VERSIONS)
    y = _check_inputs(model, x, y, eps, norm, batch_size)
    check_integer("steps", steps)
    check_integer("queries", queries)
    x, y = x.detach(), y.detach().to(x.device)
    n = len(x)
    num_classes = 10  # an empty batch: any count lets it through
    if n:
        with attack_mode(model), torch.no_grad():
            logits = model(x[:1])
        check_labels(logits, y)
        num_classes = logits.shape[1]
    n_targets = check_targets(n_target_classes, num_classes, "AutoAttack")
    if n and num_classes < min_classes("dlr-targeted"):  # refused now, not at APGD-T after two stages' work
        raise RobustlabError(f"AutoAttack's APGD-T uses the targeted DLR loss, which needs at least "
                             f"{min_classes('dlr-targeted')} classes; the model has {num_classes}")
    config = {"version": version, "eps": float(eps), "norm": norm, "n": n, "seed": seed, "batch_size": batch_size,
              "n_target_classes": n_targets, "steps": steps, "queries": queries, "data": _fingerprint(x, y),
              "model": checkpoint.weights_digest(model)}  # a state of the model before a resumed training went on
    if distributed.active() and state_path is not None:  # one state file per rank: each holds its own batches
        state_path = Path(state_path).with_suffix(f".rank{distributed.rank()}of{distributed.world_size()}.safetensors")
    state = _State(x, config, state_path, replace_other_state)
    attacks = _attacks(eps, norm, n_targets, steps, queries)
    starts = list(range(0, n, batch_size))
    mine = set(distributed.my_batches(len(starts)))
    _check_ranks_agree(state.stage)
    disable = True if not distributed.is_main() else (None if progress is None else not progress)

    with attack_mode(model):
        for si in range(state.stage, len(STAGES)):
            stage = STAGES[si]
            bar = tqdm(total=len(starts), initial=state.batch, desc=f"AutoAttack {stage}", unit="batch",
                       disable=disable)
            for bi in range(state.batch, len(starts)):
                t0 = time.perf_counter()
                rows = torch.arange(starts[bi], min(starts[bi] + batch_size, n), device=x.device)
                if bi in mine and stage == "clean":
                    with torch.no_grad():
                        wrong = model(x[rows]).argmax(1) != y[rows]
                    state.broken_by[rows[wrong]] = 0
                elif bi in mine:
                    _attack_batch(model, x, y, rows, state, si, attacks[stage], _stage_seed(seed, si, bi), eps, norm)
                state.seconds[stage] += time.perf_counter() - t0
                state.batch = bi + 1
                if state.batch == len(starts):  # the stage is complete (on every rank: the sum is exact)
                    state.stage_accuracy[stage] = _accuracy(distributed.all_max(state.broken_by.clone()))
                    state.stage, state.batch = si + 1, 0
                if bi in mine or state.batch == 0:
                    state.save()
                bar.update(1)
                if not distributed.active():  # a rank's own copy marks the other ranks' rows robust
                    bar.set_postfix(robust=f"{_accuracy(state.broken_by[:rows[-1] + 1]):.1%}")
            bar.close()
            if not starts:
                state.stage_accuracy[stage] = float("nan")
    x_adv, broken_by = _gather(state, starts, mine, batch_size)
    return AutoAttackResult(x_adv, broken_by.cpu(), dict(state.stage_accuracy), dict(state.seconds), config)


def _check_ranks_agree(stage: int):
    """Resumed ranks must stand at the same stage: each stage ends with a collective that all of them join."""
    if distributed.active():
        t = torch.tensor([stage, -stage])
        distributed.all_max(t)
        if t[0] != -t[1]:
            raise RobustlabError("the per-rank AutoAttack states stand at different stages (a rank was killed between "
                                 "two saves); delete the .rank*.safetensors state files and start again")


def _gather(state, starts, mine, batch_size):
    """Every rank's rows put together: each row comes from the rank that attacked its batch."""
    if not distributed.active():
        return state.x_adv, state.broken_by
    owned = torch.zeros(len(state.x_adv), dtype=torch.bool, device=state.x_adv.device)
    for bi in mine:
        owned[starts[bi]:starts[bi] + batch_size] = True
    x_adv = distributed.all_sum(torch.where(owned.view(-1, 1, 1, 1), state.x_adv, 0.0).cpu())
    return x_adv.to(state.x_adv.device), distributed.all_max(state.broken_by.clone())


def _accuracy(broken_by: torch.Tensor) -> float:
    # evaluate.accuracy.fraction's exact k/n; importing it from here would make robustlab.attacks circular
    return int((broken_by == ROBUST).sum()) / len(broken_by) if len(broken_by) else float("nan")


def _attack_batch(model, x, y, rows, state, si, attack, seed, eps, norm):
    """Run one member on the still-robust examples of `rows`; record those it breaks."""
    idx = rows[state.broken_by[rows] == ROBUST]
    if len(idx) == 0:
        return
    g = torch.Generator(device=x.device).manual_seed(seed)
    adv, _ = attack(model, x[idx], y[idx], generator=g)
    if not within_ball(adv, x[idx], norm, eps, tol=1e-5):
        raise RuntimeError(f"{STAGES[si]} returned points outside the {norm} ε-ball or [0, 1]")
    with torch.no_grad():  # the verdict is the model's prediction on the returned point
        hit = model(adv).argmax(1) != y[idx]
    state.x_adv[idx[hit]] = adv[hit]
    state.broken_by[idx[hit]] = si


def autoattack_accuracy(model, data, eps: float, norm: str = "linf", n: int | None = None, *, batch_size: int = 250,
                        seed: int = 0, device=None, progress: bool | None = True, state_path=None,
                        **kwargs) -> AutoAttackResult:
    """AutoAttack-standard on an ImageSet, or on an (images, labels) pair of tensors (uint8, or float in
    [0, 1]), as `accuracy` takes them; the first `n` examples if given.

    Returns the AutoAttackResult; its `robust_accuracy` is the figure to report. The images go to `device`,
    by default the model's.
    """
    if n is not None:
        check_integer("n", n, minimum=0)
        if hasattr(data, "subset"):  # a LazyImageSet (an image folder) then decodes n images, not the whole folder
            data = data.subset(n)
    images, labels = images_and_labels(data, "autoattack_accuracy")
    if n is not None:  # a pair of tensors
        images, labels = images[:n], labels[:n]
    device = device or model_device(model)
    x, y = images.to(device), labels.to(device)
    x = x.float().div_(255) if x.dtype == torch.uint8 else x
    return autoattack(model, x, y, eps=eps, norm=norm, seed=seed, batch_size=batch_size, progress=progress,
                      state_path=state_path, **kwargs)
