"""Pure decisions of the growth loop: what a stage tries and who wins.

Kept free of Ray so they can be tested with made-up trial results.
:func:`stage_children` builds every stage's variants on paper (the real growth
ops on zero weights, no training), so a variant that cannot build is found
before a run starts; torch is imported only there.
"""

from __future__ import annotations

from dataclasses import replace

from runner.config import StageConfig
from runner.errors import RunnerError


def variant_label(variant: dict) -> str:
    """A short, stable, filesystem-safe name for a variant; a ``combine``
    variant is named by its steps joined with ``+``."""
    if variant["op"] == "combine":
        parts = ["+".join(variant_label(step) for step in variant["steps"])]
    else:
        parts = [variant["op"]]
    # A checkpoint's path would make a long name; the stage records it anyway.
    for key in sorted(k for k in variant if k not in ("op", "checkpoint", "steps")):
        value = variant[key]
        parts.append(f"{key}={value['name'] if isinstance(value, dict) else value}")
    return "-".join(parts).replace("/", "_").replace(" ", "")


def trial_name(config: dict) -> str:
    """A trial's name from its Tune config: variant label and learning rate."""
    return f"{variant_label(config['variant'])}-lr{config['lr']:g}"


def stage_variants(stage: StageConfig, index: int) -> list[dict]:
    """The variants a stage runs: for the first stage a fresh model (or the
    weights of its ``init`` checkpoint), the configured ops for every later
    one."""
    if index == 0 and stage.init:
        return [{"op": "load", "checkpoint": stage.init}]
    if index == 0:
        return [{"op": "scratch", "model": stage.model}]
    return [dict(v) for v in stage.variants]


def op_params(variant: dict, seed: int) -> dict:
    """A growth variant's parameters for ``runner.model.growth.apply_op``:
    ``to`` becomes the target spec, ``freeze_epochs`` (a training setting) is
    left out, and the job's seed drives fresh tensors and noise unless the
    variant gives ``rng``."""
    from runner.model import get_spec

    params = {k: v for k, v in variant.items() if k not in ("op", "freeze_epochs")}
    if "to" in params:
        params["target_spec"] = get_spec(params.pop("to"))
    params.setdefault("rng", seed)
    return params


def stage_children(stages: list[StageConfig], first, seed: int) -> list[list]:
    """The architectures (ModelSpecs) each stage may hand on: ``[first]`` for
    the first stage, then every variant of every growth stage applied to every
    architecture the stage before may hand on (its winner is not known yet).
    The real growth ops run on zero weights; nothing trains. Architectures
    that differ only by name count once.

    ``first`` is a spec or a spec name. A variant that does not build raises
    RunnerError naming it (``stages[i] (name).variants[j]``) and its parent.
    """
    from runner.model import ModelSpec, get_spec

    parents = [first if isinstance(first, ModelSpec) else get_spec(first)]
    found = [parents]
    for index, stage in enumerate(stages[1:], 1):
        children = {}
        for j, variant in enumerate(stage.variants):
            where = f"stages[{index}] ({stage.name}).variants[{j}] ({variant['op']})"
            for parent in parents:
                child = _build_on_paper(variant, parent, seed, where)
                children.setdefault(replace(child, name="-"), child)
        parents = list(children.values())
        found.append(parents)
    return found


def _build_on_paper(variant: dict, parent, seed: int, where: str):
    """The child spec ``variant`` grows from ``parent``, as a trial would."""
    import torch

    from runner.model import apply_op, state_shapes

    zeros = {name: torch.zeros(shape) for name, shape in state_shapes(parent).items()}
    try:
        child, _, _ = apply_op(parent, zeros, variant["op"], **op_params(variant, seed))
    except RunnerError as err:
        raise RunnerError(f"{where} does not build from {parent.name}: {err}") from err
    return child


def stage_trials(stage: StageConfig, index: int, default_lr: float) -> int:
    """How many trials stage ``index`` runs: its variants times its learning
    rates."""
    return len(stage_variants(stage, index)) * len(stage.lr or [default_lr])


def best_epoch(epochs: list[dict]) -> dict:
    """The epoch a trial is judged by: its best validation accuracy; among
    equals the earliest (it cost less)."""
    return max(epochs, key=lambda e: (e["val_acc"], -e["epoch"]))


def select_winner(trials: list[dict]) -> dict:
    """Best validation accuracy wins; ties go to the trial that spent less
    compute (training FLOPs up to its best epoch). Only ``val_acc`` and the
    ledger are read: the test set never enters the choice."""
    finished = sorted((t for t in trials if t.get("epochs")), key=lambda t: t["name"])
    if not finished:
        raise ValueError("no trial of this stage reported any epoch")
    # max() keeps the first of equals, so full ties fall to the first name.
    return max(finished, key=lambda t: (t["best"]["val_acc"], -t["best"]["flops"]))


def path_curve(stages: list[dict]) -> list[dict]:
    """Validation accuracy against cumulative training FLOPs along the chosen
    path: each stage's winner, its FLOPs counted on top of all its ancestors'."""
    curve, spent = [], 0.0
    for stage in stages:
        winner = next(t for t in stage["trials"] if t["name"] == stage["winner"])
        for e in winner["epochs"]:
            curve.append({"stage": stage["name"], "epoch": e["epoch"],
                          "flops": spent + e["flops"], "val_acc": e["val_acc"]})
        spent += winner["compute"]["flops"]
    return curve


def verdict(stages: list[dict], baseline: dict) -> dict:
    """Did growing pay? The FLOPs the growth path needed to first reach the
    baseline's best validation accuracy, as a fraction of all the FLOPs the
    baseline spent; ``fraction`` is None when the path never got there."""
    target = baseline["val_acc"]
    spent = baseline["compute"]["flops"]
    reached = next((p for p in path_curve(stages) if p["val_acc"] >= target), None)
    out = {"baseline_best_val_acc": target, "baseline_flops": spent,
           "growth_best_val_acc": max(p["val_acc"] for p in path_curve(stages)),
           "growth_flops_to_match": reached["flops"] if reached else None,
           "fraction": reached["flops"] / spent if reached and spent else None}
    if reached:
        out["text"] = (f"growing reached the baseline's best validation accuracy "
                       f"({target:.4f}) with {100 * out['fraction']:.0f}% of the "
                       f"baseline's compute ({reached['flops'] / 1e12:.2f} of "
                       f"{spent / 1e12:.2f} TFLOP), in stage {reached['stage']}")
    else:
        out["text"] = (f"growing never reached the baseline's best validation "
                       f"accuracy ({target:.4f}); its best was "
                       f"{out['growth_best_val_acc']:.4f}")
    return out


class StageBudget:
    """A stage's budget over all its trials: ``cap`` maps units (flops, cpu_s,
    wall_s) to limits. ``spend(trial, result)`` records a trial's running
    totals (each result carries its cumulative counters) and says whether the
    stage has now spent its budget."""

    def __init__(self, cap: dict):
        self.cap = dict(cap)
        self.spent: dict[str, dict] = {}

    def spend(self, trial: str, result: dict) -> bool:
        self.spent[trial] = {u: result.get(u, 0.0) for u in self.cap}
        return self.exhausted()

    def exhausted(self) -> bool:
        return any(sum(s[u] for s in self.spent.values()) >= limit
                   for u, limit in self.cap.items())
