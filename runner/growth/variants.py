"""Pure decisions of the growth loop: what a stage tries and who wins.

Kept free of Ray so they can be tested with made-up trial results.
"""

from __future__ import annotations

from runner.config import StageConfig


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
